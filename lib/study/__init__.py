"""The synthetic-data study of notebook 05: does synthetic data help segmentation?

Modules: design (held-out patients, training pool, the grid of conditions), run (calibrated
steps, the cells and their records), analysis (tables, paired statistics, verdicts,
figures), cost (what a study trains and its wall-clock), spec (the spec file and the
``msdseg-study`` command), latent (the VAE latent-segmenter baseline).
"""
