"""Segmentation: slices -> trained models -> predictions and metrics (notebooks 02-04).

Modules: models (segmentation-models-pytorch factory), augment, forward (batched inference),
train (fit), checkpoint, roi (region-of-interest locator), inference (back to the original
geometry), postprocess, metrics, evaluate, predict (the ``msdseg-predict`` command),
cross_validation, workflow (train, reload, test and show a model of a run), tables (the
comparison of a run's models, cross-validation tables), figures.
"""
