"""Test-wide settings, applied before any notebook kernel starts (kernels inherit them).

Tests write their run folders (run logs included) and data to a temporary folder, never the repo's.
"""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="msdseg-tests-")
os.environ["MSDSEG_RUN_DIR"] = os.path.join(_TMP, "run")
os.environ["MSDSEG_DATA_ROOT"] = os.path.join(_TMP, "data")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MPLBACKEND"] = "Agg"


def pytest_sessionfinish(session, exitstatus):
    """Remove the temporary run folder and data of this test session."""
    import shutil

    shutil.rmtree(_TMP, ignore_errors=True)
