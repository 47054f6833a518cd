# `make demo` and `make test` create or reuse .venv/ with the pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynaseg-installed
DEMO_DATA := datasets/synth
# 1600 training images rather than 400: +2.7-2.9 box / +2.4-2.6 mask AP at the same 2000 iterations,
# for 13 s more of synthesis (docs/one_stage_accuracy.md, "More training images"). The stamp names the
# count, so a folder written with another count is rewritten.
DEMO_TRAIN_IMAGES := 1600
DEMO_DATA_STAMP := $(DEMO_DATA)/.synth-$(DEMO_TRAIN_IMAGES)-train-images

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# Test-only oracle for PQ (the COCO panoptic API); its metadata pins numpy<2, which it does not need.
	$(BIN)/python -m pip install -q --no-deps panopticapi-lite==0.2.0
	# Test-only oracle for Cityscapes (official instance AP, instance reader); its metadata pulls in
	# matplotlib, requests, coloredlogs, appdirs and the old `typing` backport, none of which its
	# evaluation imports. pyquaternion is imported by its helpers.
	$(BIN)/python -m pip install -q --no-deps cityscapesscripts==2.3.0 pyquaternion==0.9.9
	# Test-only oracle for LVIS AP (the official LVIS API); its pins (opencv, Cython) serve its visualiser only.
	$(BIN)/python -m pip install -q --no-deps lvis==0.5.3
	# Test-only: headless Chromium for the page test (Playwright drives Debian's package; root, as CI).
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	touch $(STAMP)

install: $(STAMP)

$(DEMO_DATA_STAMP): | $(STAMP)
	$(BIN)/dynaseg data synth --out $(DEMO_DATA) --num-train $(DEMO_TRAIN_IMAGES) --num-val 50 \
		--image-size 256 --max-objects 6
	touch $@

demo: $(STAMP) $(DEMO_DATA_STAMP)
	rm -rf runs/demo
	$(BIN)/dynaseg train --config blendmask_r18_synth_cpu output_dir=runs/demo
	$(BIN)/dynaseg predict --config runs/demo/config.yaml --weights runs/demo/model_final.safetensors \
		--input $(DEMO_DATA)/val --output runs/demo/predictions model.fcos.class_agnostic_nms=true
	@# What the overlays show at predict's default threshold (0.5): right instances, found objects.
	$(BIN)/dynaseg eval --gt $(DEMO_DATA)/annotations/instances_val.json \
		--results runs/demo/predictions/results.json --drawn-at 0.5
	@echo "demo run folder: runs/demo (metrics.json, loss_curve.png, predictions/*.png)"

test: $(STAMP)
	$(BIN)/ruff check dynaseg tests
	$(BIN)/ruff format --check dynaseg tests
	@# One worker per core (at most 4), one thread each: the suite is mostly single-threaded Python and
	@# subprocess start-ups, so two workers on CI's two cores take about 5.7 min instead of 8.9.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4

clean:
	rm -rf runs/demo runs/tiny .pytest_cache
