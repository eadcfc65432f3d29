"""msd-synth-seg: 2D segmentation of MSD tasks with synthetic training data.

Packages follow the pipeline from volume to published result, one package per stage:

- ``lib.common``:  what every stage uses (paths, atomic writes, device and precision, presets,
                   figures, the run diary, the job engine, paired statistics); imports no stage
- ``lib.data``:    a task and its volumes -> cached slices and a patient split (notebook 01);
                   ``lib.data.run`` also sets up a run's augmentation pairs, post-processing
                   thresholds and region of interest from ``lib.seg``
- ``lib.seg``:     slices -> trained segmentation models -> predictions and metrics (notebooks
                   02-04, cross-validation, the ``msdseg-predict`` command)
- ``lib.synth``:   synthetic image/mask pairs: generators, mask sources, filter, quality
- ``lib.study``:   the synthetic-data study of notebook 05 (design, run, analysis, cost, the
                   ``msdseg-study`` spec, the latent-segmenter baseline); uses all of the above
- ``lib.publish``: a run folder -> ``results/<dataset>/`` for readers

No module imports one that imports it back (``tests/test_imports.py``). Each package's
``__init__`` only names its modules: import a module by its path, ``from lib.seg import train``.
"""

__version__ = "0.1.0"
