"""The data pipeline on the real MSD data in ../shared/data (skipped when absent)."""

import numpy as np
import pytest

from lib.data.slices import SliceConfig, build_cache, load_slices
from lib.data.splits import make_split
from lib.data.task import read_task
from lib.data.volumes import load_volume
from tests.helpers import SHARED

pytestmark = pytest.mark.shared_data  # reads ../shared/data; skipped where absent

HEART = SHARED / "Task02_Heart_dev"
HIPPO = SHARED / "Task04_Hippocampus"


@pytest.mark.skipif(not HEART.is_dir(), reason="../shared/data/Task02_Heart_dev not present")
def test_heart_dev_pipeline(tmp_path):
    task = read_task(HEART)
    assert len(task.cases) == 10 and task.num_classes == 2
    vol = load_volume(task, task.cases[0])
    assert vol.image.shape[0] == 1 and vol.image.shape[1:] == vol.label.shape
    assert vol.spacing == pytest.approx((1.25, 1.25, 1.37), abs=0.01)
    ids = [c.case_id for c in task.cases[:4]]
    sub = read_task(HEART)
    sub.cases = task.cases[:4]
    out = build_cache(sub, tmp_path, SliceConfig(image_size=64), workers=2, progress=False)
    s = load_slices(out, ids)
    assert s.images.shape[1:] == (1, 64, 64) and set(np.unique(s.masks)) == {0, 1}
    assert len(s) == sum(s.cases[i].shape[2] for i in ids)
    split = make_split([c.case_id for c in task.cases], 0)
    assert sum(len(split[k]) for k in ("train", "val", "test")) == 10


@pytest.mark.skipif(not HIPPO.is_dir(), reason="../shared/data/Task04_Hippocampus not present")
def test_hippocampus_multiclass_pipeline(tmp_path):
    task = read_task(HIPPO)
    assert task.num_classes == 3 and len(task.cases) == 260
    task.cases = task.cases[:6]
    out = build_cache(task, tmp_path, SliceConfig(image_size=32), workers=2, progress=False)
    s = load_slices(out, [c.case_id for c in task.cases])
    assert set(np.unique(s.masks)) == {0, 1, 2}
    assert s.images.dtype == np.float16 and np.isfinite(s.images.astype(np.float32)).all()
