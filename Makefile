# vit-edge: compress a timm ViT, export it to ONNX (low-rank pairs + INT8 QDQ), benchmark it.
# Every stage is a CLI (python -m compress | export | runtime); these targets only wire them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= vit_cifar_ref
CHECKPOINT ?=
CALIB ?=
VAL ?=
NUM_CALIB ?= 256
RATIO ?= 0.6
METHOD ?= whiten
ALLOCATION ?= mixed
COMP_RANK ?= 8
GRANULE ?= 8
OUT ?= runs/$(MODEL)-r$(RATIO)
BACKEND ?= ort
BATCH_SIZES ?= 1,8,32
PRECISION ?= fp16
EPOCHS ?= 16

opt = $(if $(strip $(2)),$(1) $(2),)
MODEL_ARGS = --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT))

.PHONY: setup test test-slow reference-model compress export engine bench eval bench-compress demo all sweep study clean

setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

reference-model: setup
	$(PY) -m compress.train_reference --epochs $(EPOCHS)

compress: setup
	$(PY) -m compress $(MODEL_ARGS) $(call opt,--calib,$(CALIB)) --num-calib $(NUM_CALIB) \
	  --ratio $(RATIO) --method $(METHOD) --allocation $(ALLOCATION) --comp-rank $(COMP_RANK) \
	  --granule $(GRANULE) --out $(OUT)/compressed

export: setup
	$(PY) -m export --compressed $(OUT)/compressed --out $(OUT)/onnx

engine: setup
	$(PY) -m runtime engine --onnx-dir $(OUT)/onnx --precision $(PRECISION) --out $(OUT)/engines

bench: setup
	$(PY) -m runtime bench --onnx-dir $(OUT)/onnx --backend $(BACKEND) --batch-sizes $(BATCH_SIZES) --out $(OUT)/bench

eval: setup
	$(PY) -m runtime eval --compressed $(OUT)/compressed $(call opt,--onnx-dir,$(wildcard $(OUT)/onnx)) \
	  $(call opt,--data,$(VAL)) --out $(OUT)/eval.json

clean:
	rm -rf runs
