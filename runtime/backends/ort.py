"""ONNX Runtime backend: "ort" (CPUExecutionProvider) and "ort-cuda" (CUDAExecutionProvider).

Thread counts, graph optimization level, IO binding and the CPU memory arena are options.
onnxruntime is imported when a session is made, never at module import.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.backends.base import INPUT_NAME, OUTPUT_NAME, Backend
from runtime.errors import RuntimeStageError
from runtime.memory import inspect_onnx

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
_PROVIDERS = {"ort": ["CPUExecutionProvider"],
              "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _import_ort():
    import onnxruntime

    return onnxruntime


class OrtBackend(Backend):
    """An onnxruntime.InferenceSession over one ONNX file.

    Options: intra_op_threads / inter_op_threads (0 = onnxruntime's default), optimization
    (one of OPT_LEVELS), io_binding (bind input/output buffers instead of run()), mem_arena
    (CPU memory arena), mem_pattern (pre-planned activation buffers), prepacking (kernels keep a
    re-laid-out copy of each weight; off: ``session.disable_prepacking``), allow_spinning (idle worker threads spin; turn off on a machine shared
    with other jobs, where spinning threads fight them), device_id (ort-cuda), providers
    (overrides the kind's default list).
    """

    def __init__(self, path, *, kind: str = "ort", intra_op_threads: int = 0, inter_op_threads: int = 0,
                 optimization: str = "all", io_binding: bool = False, mem_arena: bool = True,
                 mem_pattern: bool = True, prepacking: bool = True, allow_spinning: bool = True, device_id: int = 0, providers: Sequence[str] | None = None):
        if kind not in _PROVIDERS:
            raise RuntimeStageError(f"OrtBackend serves {', '.join(_PROVIDERS)}, not {kind!r}")
        if optimization not in OPT_LEVELS:
            raise RuntimeStageError(f"optimization must be one of {', '.join(OPT_LEVELS)}, got {optimization!r}")
        if intra_op_threads < 0 or inter_op_threads < 0:
            raise RuntimeStageError("thread counts must be >= 0 (0 = onnxruntime default)")
        ort = _import_ort()
        self.name, self.path = kind, Path(path)
        self._stats = inspect_onnx(self.path)
        self.precision = self._stats.precision
        self._options = dict(intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                             optimization=optimization, io_binding=io_binding, mem_arena=mem_arena,
                             mem_pattern=mem_pattern, prepacking=prepacking, allow_spinning=allow_spinning)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        so.enable_cpu_mem_arena = mem_arena
        so.enable_mem_pattern = mem_pattern
        so.add_session_config_entry("session.disable_prepacking", "0" if prepacking else "1")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        so.log_severity_level = 3  # errors only: ORT's warnings would go to stderr unasked
        wanted = list(providers) if providers else _PROVIDERS[kind]
        provider_args = [(p, {"device_id": device_id}) if p == "CUDAExecutionProvider" else p for p in wanted]
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for bad files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeStageError(f"onnxruntime cannot load {self.path}: {first}") from None
        if wanted[0] not in self._session.get_providers():
            # ORT silently falls back to CPU when CUDA cannot start; a benchmark must not.
            raise RuntimeStageError(f"{wanted[0]} did not start for {self.path.name} "
                                    f"(session providers: {', '.join(self._session.get_providers())})")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeStageError(f"{self.path.name} has {len(inputs)} inputs; expected one named {INPUT_NAME!r}")
        self._input = inputs[0]
        if self._input.name != INPUT_NAME:
            log.warning("%s: input is named %r, not %r", self.path.name, self._input.name, INPUT_NAME)
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0]
        self._device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._device_id = device_id
        self._binding = self._session.io_binding() if io_binding else None

    @classmethod
    def unavailable_reason(cls, kind: str) -> str | None:
        try:
            ort = _import_ort()
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        if kind == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu and a CUDA GPU driver); "
                    f"available: {', '.join(ort.get_available_providers())}")
        return None

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._binding is None:
            return self._session.run([self._output], {self._input.name: x})[0]
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_cpu_input(self._input.name, x)
        b.bind_output(self._output, self._device, self._device_id)
        self._session.run_with_iobinding(b)
        return b.copy_outputs_to_cpu()[0]

    def input_shape(self) -> tuple:
        return tuple(d if isinstance(d, int) else -1 for d in self._input.shape)

    def memory(self) -> dict[str, int]:
        # onnxruntime exposes no arena or activation statistics in Python; process RSS
        # (runtime.memory.measure_in_subprocess) is the honest figure for those.
        return self._stats.as_memory()

    def describe(self) -> dict:
        ort = _import_ort()
        return {"backend": self.name, "library": "onnxruntime", "version": ort.__version__,
                "providers": self._session.get_providers(), "precision": self.precision,
                "file": self.path.name, "input": {"name": self._input.name, "shape": list(self.input_shape())},
                "output": self._output, **self._options}

    def close(self) -> None:
        self._binding = None
        self._session = None
