# vit-edge: every stage is a CLI (python -m compress | export | runtime); these targets only chain them.
# Defaults live in the CLIs (`python -m compress --help`, `python -m runtime sweep --help`, ...): a variable
# left empty passes nothing, and every value is passed single-quoted, as one argument.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# SETUP= runs the targets with $(PYTHON) as it is (e.g. a Jetson's JetPack torch, which setup would replace)
SETUP ?= $(STAMP)
PY ?= $(if $(SETUP),$(VPY),$(PYTHON))
MODEL ?= vit_cifar_ref
OUT ?= runs/$(MODEL)$(if $(RATIO),-r$(RATIO))

q = '$(subst ','\'',$(1))'
# $(call flags,flag:VAR ...): --flag 'value' for each VAR that is set
flags = $(foreach p,$(1),$(if $(strip $($(lastword $(subst :, ,$(p))))),--$(firstword $(subst :, ,$(p))) \
  $(call q,$(strip $($(lastword $(subst :, ,$(p))))))))
MODEL_ARGS = --model $(call q,$(MODEL)) $(if $(PRETRAINED),--pretrained) $(call flags,checkpoint:CHECKPOINT \
  calib:CALIB num-calib:NUM_CALIB method:METHOD allocation:ALLOCATION comp-rank:COMP_RANK granule:GRANULE threads:THREADS)
BENCH = $(call flags,backend:BACKEND batch-sizes:BATCH_SIZES threads:THREADS warmup:WARMUP repeats:REPEATS)
RUNS = $(MODEL_ARGS) $(call flags,backend:BACKEND)

.PHONY: setup test test-slow all compress export bench eval report engine demo sweep fit study \
	reference-model real-model bench-compress clean
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

# One run directory (runtime/workflows/layout.py); each stage reruns its CLI (compress reads its statistics cache).
all: report
compress: | $(SETUP)
	$(PY) -m compress $(MODEL_ARGS) $(call flags,ratio:RATIO finetune-steps:FINETUNE_STEPS) --out $(call q,$(OUT)/compressed)
export: compress
	$(PY) -m export --compressed $(call q,$(OUT)/compressed) --out $(call q,$(OUT)/onnx) \
	  $(call flags,calib:CALIB num-parity:NUM_PARITY threads:THREADS)
bench: export
	$(PY) -m runtime bench --onnx-dir $(call q,$(OUT)/onnx) $(BENCH) --out $(call q,$(OUT)/bench)
eval: export
	$(PY) -m runtime eval --compressed $(call q,$(OUT)/compressed) --onnx-dir $(call q,$(OUT)/onnx) \
	  $(call flags,backend:BACKEND data:VAL num:NUM_EVAL) --out $(call q,$(OUT)/eval.json)
report: bench eval
	$(PY) -m runtime report --run-dir $(call q,$(OUT))
engine: export
	$(PY) -m runtime engine --onnx-dir $(call q,$(OUT)/onnx) $(call flags,precision:PRECISION) --out $(call q,$(OUT)/engines)

# The bundled trained vit_cifar_ref, bundled CIFAR-10 images, a short benchmark: minutes on a 2-core CPU.
DEMO_OUT ?= runs/demo
demo:
	$(MAKE) all MODEL=vit_cifar_ref CHECKPOINT= CALIB= VAL= NUM_EVAL= RATIO=0.6 OUT=$(call q,$(DEMO_OUT)) \
	  BATCH_SIZES=1,8 WARMUP=3 REPEATS=10 NUM_PARITY=32
	@echo "report: $(DEMO_OUT)/report.md"

# The workflows (runtime/workflows): many budgets, the budget that meets a target, every compress step on/off.
sweep: | $(SETUP)
	$(PY) -m runtime sweep $(RUNS) $(call flags,ratios:RATIOS data:VAL num-eval:NUM_EVAL warmup:WARMUP repeats:REPEATS) \
	  --out $(call q,$(or $(SWEEP_OUT),runs/sweep-$(MODEL)))
fit: | $(SETUP)
	$(PY) -m runtime fit $(RUNS) $(call flags,target-latency-ms:TARGET_LATENCY_MS target-size-mb:TARGET_SIZE_MB) \
	  --out $(call q,$(or $(FIT_OUT),runs/fit-$(MODEL)))
study: | $(SETUP)
	$(PY) -m runtime study --model $(call q,$(MODEL)) $(if $(PRETRAINED),--pretrained) $(call flags,checkpoint:CHECKPOINT \
	  calib:CALIB num-calib:NUM_CALIB data:VAL num:NUM_EVAL ratios:STUDY_RATIOS variants:STUDY_VARIANTS \
	  threads:THREADS finetune-steps:FINETUNE_STEPS) $(foreach b,$(BASELINE),--baseline $(call q,$(b))) \
	  --out $(call q,$(or $(STUDY_OUT),runs/study-$(MODEL)))

# Retrains into runs/ (the bundled weights stay as shipped); the real ViT-S/14 is converted into ~/.cache/vit-edge.
reference-model: | $(SETUP)
	$(PY) -m compress.zoo.train_reference $(call flags,arch:ARCH epochs:EPOCHS) \
	  --out $(call q,$(or $(REF_OUT),runs/reference/$(or $(ARCH),vit_cifar_ref).safetensors))
real-model: | $(SETUP)
	$(PY) -m compress.zoo
bench-compress: | $(SETUP)
	$(PY) -m compress.benchmark $(call flags,models:BENCH_MODELS images:BENCH_IMAGES ratio:RATIO) --out runs/bench-compress
clean:
	rm -rf runs
