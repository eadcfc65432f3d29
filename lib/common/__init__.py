"""Shared by every stage of the pipeline.

Modules: paths (data and run folders), atomic (atomic writes, locked JSON), env (device,
precision, seeds, hardware report), presets (the demo/cpu/gpu budgets), viz (figures
and GIFs), diary (the run log), engine (jobs on a local Ray, a cluster or serially),
statistics (paired bootstrap, t-intervals over seeds, power).
"""
