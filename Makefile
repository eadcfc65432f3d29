# Two entry points (see README): `make run` (all notebooks on the demo data) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= demo
RUN ?= runs/demo
PRESET ?= demo
IMAGE_SIZE ?=
PARAMS ?=
NOTEBOOKS := 01_data_analysis 02_pspnet 03_fpn 04_unet 05_vae_synthesis

.PHONY: run test test-fast venv publish bench cv lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[test,jupyter]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

## Main job: every notebook in order, executed by papermill into $(RUN)/notebooks/.
run: venv
	mkdir -p $(RUN)/notebooks
	for nb in $(NOTEBOOKS); do \
		$(PY) -m papermill --cwd notebooks -k python3 notebooks/$$nb.ipynb $(RUN)/notebooks/$$nb.ipynb \
			-p data "$(DATA)" -p run_dir "$(abspath $(RUN))" -p preset $(PRESET) $(if $(IMAGE_SIZE),-p image_size $(IMAGE_SIZE)) $(PARAMS) || exit 1; \
	done
	@echo "Executed notebooks, figures, checkpoints and metrics are in $(RUN)/; automatic records of each notebook in $(RUN)/run_log.md"

## Whole test suite: unit tests, notebooks under nbval, one papermill run.
test: venv
	$(PY) -m pytest -q

## The unit tests without the slow ones (local Ray, whole study cells, papermill) and without ../shared data.
test-fast: venv
	$(PY) -m pytest -q tests -m "not slow and not shared_data"

## Publish a run folder's executed notebooks, key figures and JSON results to results/<dataset>/.
publish: venv
	$(PY) tools/publish_results.py $(RUN) $(if $(COMMAND),--command "$(COMMAND)")

bench: venv
	$(PY) bench/benchmark.py $(BENCH_ARGS)

## Patient-level k-fold cross-validation of notebook 04 (FOLDS folds, every patient tested once), folds side by
## side on a local Ray (CV_ARGS="--engine serial", "--address auto", "--fold-cpus 2": see tools/cross_validate.py).
FOLDS ?= 5
cv: venv
	$(PY) tools/cross_validate.py --data "$(DATA)" --root $(RUN) --folds $(FOLDS) $(CV_ARGS) -- -p preset $(PRESET) $(if $(IMAGE_SIZE),-p image_size $(IMAGE_SIZE)) $(PARAMS)

lint: venv
	$(PY) -m ruff check lib tests tools bench notebooks

clean:
	rm -rf runs/demo data/archives
