"""The export stage's files, in one table: which model at which precision is which file, and the
name the benchmark, the evaluation and the reports give it (standard library only).

    stem    model                               precision   file                  variant
    dense   the original model (the baseline)   fp32        dense.onnx            dense-fp32
            ...                                  int8        dense.int8.onnx       dense-int8
                                                 fp16        dense.fp16.onnx       dense-fp16
                                                 int8-fp16   dense.int8-fp16.onnx  dense-int8-fp16
    model   the compressed model (low-rank)     ...         model.onnx ...        lowrank-fp32 ...
    dense   NVIDIA ModelOpt's INT8 of dense.onnx  modelopt-int8  dense.modelopt-int8.onnx  (export --modelopt:
            the peer baseline, export.modelopt_baseline)

*.int8-fp16.onnx (INT8 GEMMs, FP16 elsewhere) is TensorRT's file: ONNX Runtime's CPU provider has no
fused int8 kernels for float16 Q/DQ and runs it as float ops (docs/tensorrt.md), so the benchmark
times it on TensorRT only unless asked (``ExportFile.backends``).
A TensorRT engine of a file has the same name with ``.engine`` (runtime engine).
"""
from __future__ import annotations

from dataclasses import dataclass

STEMS = {"dense": "the original model (the baseline)", "model": "the compressed model (low-rank pairs)"}
FAMILIES = {"dense": "dense", "model": "lowrank"}       # stem -> the variant family
PRECISIONS = ("fp32", "int8", "fp16", "int8-fp16")
BASELINE = "modelopt-int8"    # dense only: the peer baseline's precision tag
TENSORRT_ONLY = frozenset({"trt"})
REPORT = "export_report.json"


def onnx_name(stem: str, precision: str = "fp32") -> str:
    return f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"


def engine_name(stem: str, precision: str = "fp32") -> str:
    return onnx_name(stem, precision)[:-len(".onnx")] + ".engine"


@dataclass(frozen=True)
class ExportFile:
    """One file of an export directory."""
    stem: str        # "dense" or "model"
    precision: str   # one of PRECISIONS

    @property
    def filename(self) -> str:
        return onnx_name(self.stem, self.precision)

    @property
    def engine(self) -> str:
        return engine_name(self.stem, self.precision)

    @property
    def family(self) -> str:
        return FAMILIES[self.stem]

    @property
    def backends(self) -> frozenset[str] | None:
        """The backends that time this file by default (None: every backend)."""
        return TENSORRT_ONLY if self.precision == "int8-fp16" else None

    @property
    def name(self) -> str:
        """The variant name of benchmarks, evaluations and reports: dense-fp32, lowrank-int8, ..."""
        return f"{self.family}-{self.precision}"


_ORDER = ("fp32", "int8", "int8-fp16", BASELINE, "fp16")   # the benchmark's and the reports' row order
FILES = tuple(ExportFile(s, p) for s in STEMS for p in _ORDER if p in PRECISIONS or s == "dense")
BY_NAME = {f.name: f for f in FILES}
BY_FILENAME = {f.filename: f for f in FILES}
