"""msd-synth-seg: 2D segmentation of MSD tasks with synthetic training data.

Modules follow the data from volume to metric, one module per pipeline stage:

- data:         download (MSD archives), demo (phantom task), data_source (the ``data``
                parameter), msd (dataset.json + NIfTI), slices (volume -> cached slices),
                splits (patient-level split.json), pipeline (all of the above for a run)
- segmentation: models (smp factory), augment, train (fit), checkpoint, inference,
                postprocess, metrics, evaluate, segment (the workflow of notebooks 02-04)
- synthesis:    vae, diffusion, generative (their shared helpers), synth_quality, study
- reporting:    stats, viz, diary, env, paths, atomic
"""

__version__ = "0.1.0"
