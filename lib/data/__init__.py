"""Data: from a task folder to cached slices and a patient split (notebook 01).

Modules: task (dataset.json and the shared types Task, Case, Volume, MSDDataError), nifti
(NIfTI volumes, canonical orientation), images2d (2D image folders), volumes (one case,
either format), download (MSD archives), demo (the phantom task), source (the ``data``
parameter -> a task), slices (volume -> cached slices), splits (patient-level split.json),
run (all of the above for a run folder), fingerprint (what a dataset looks like, cached per run),
plan (a run's settings from the fingerprint and a preset's budget), tables (the data-analysis
tables and figures).
"""
