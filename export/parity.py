"""Parity of an exported ONNX file against its PyTorch reference, through polygraphy's Comparator.

Both sides run on the same real images: a small PyTorch runner (polygraphy's PytRunner
is CUDA-only) and polygraphy's OnnxrtRunner. polygraphy compares the logits element-wise
(an element fails when it exceeds both the absolute and the relative tolerance); top-1
agreement is read from the same run results. Absolute tolerances are stated as a fraction
of the reference logits' largest magnitude, so one table serves trained and random models.
A headless model's outputs are features (``outputs="features"``): there is no top-1 to agree on,
so its gate is the element-wise tolerance and a minimum per-image cosine. Outputs of any layout
are compared flattened per image.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .onnx_export import INPUT_NAME, OUTPUT_NAME

# Imported inside functions (torch, polygraphy, onnxruntime): `import export` stays free of onnx and torch for runtime's
# device side (tests/runtime/test_cli.py).

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """atol: fraction of max|reference logit|; rtol: relative; min_top1: top-1 agreement in [0, 1]
    on the images whose reference top-1 margin exceeds 2 atol (a near-tie may flip legitimately)."""
    atol: float
    rtol: float
    min_top1: float
    min_cosine: float = 0.99   # features (headless models): per-image cosine to the reference
    # INT8 only: the file's rel. L2 distance to the float model may exceed the fake-quant model's by this
    # factor (plus 0.005); this, not the element-wise comparison with fake-quant, is the INT8 gate
    max_error_ratio: float | None = None


# fp32: same math, different kernels. fp16: half weights/compute against fp32 PyTorch.
# int8: the same int8 weights and scales as PyTorch fake-quant, but float accumulation order differs
# between ORT and PyTorch, so a few values per layer land on the other side of a rounding boundary and
# the one-step flips propagate through the later quantizers. On a deep trained network this is chaotic:
# on the real ViT-S/14 a 1e-6 relative input perturbation moves the fake-quant model's logits by 9.6%
# rel. L2, about as much as INT8 itself moves them (11.4%; python -m compress.quant_noise), so the file and fake-quant are two draws of
# the same rounding noise and cannot agree element-wise. The INT8 gate is therefore accuracy against
# the float model: the file must be about as close to it as the fake-quant model is (wrong scales,
# weights or layouts are many times worse). Layer by layer the file equals fake-quant to float
# rounding (tests/export/test_export_parity.py); the element-wise comparison is reported, not gated.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_top1=0.99, min_cosine=0.9999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_top1=0.95, min_cosine=0.999),
    "int8": Tolerance(atol=0.1, rtol=0.1, min_top1=0.9, min_cosine=0.95, max_error_ratio=1.25),
}
ERROR_SLACK = 0.005   # absolute rel. L2 slack of the INT8 gate (models whose INT8 error is ~0)


def rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    y, ref = y.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def _top1(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(y.reshape(len(y), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)))


@dataclass(frozen=True)
class QuantAccuracy:
    """The INT8 gate: the file's and the fake-quant model's distance to the float model, same images."""
    images: int
    file_error: float               # rel. L2 of the file's outputs to the float model's
    fake_quant_error: float         # rel. L2 of PyTorch fake-quant's outputs to the float model's
    file_top1: float | None         # top-1 agreement with the float model (None for features)
    fake_quant_top1: float | None
    max_ratio: float

    @property
    def passed(self) -> bool:
        return self.file_error <= self.max_ratio * self.fake_quant_error + ERROR_SLACK

    def __str__(self) -> str:
        top1 = ("" if self.file_top1 is None else
                f", top-1 agreement {self.file_top1:.1%} vs {self.fake_quant_top1:.1%}")
        return (f"rel. L2 to the float model {self.file_error:.4f} vs fake-quant's {self.fake_quant_error:.4f} "
                f"(max {self.max_ratio:g}x + {ERROR_SLACK:g}){top1}")


def quant_accuracy(file_out: np.ndarray, fake_quant_out: np.ndarray, float_out: np.ndarray,
                   tolerance: Tolerance, outputs: str = "logits") -> QuantAccuracy:
    logits = outputs == "logits"
    return QuantAccuracy(images=len(float_out), file_error=rel_l2(file_out, float_out),
                         fake_quant_error=rel_l2(fake_quant_out, float_out),
                         file_top1=_top1(file_out, float_out) if logits else None,
                         fake_quant_top1=_top1(fake_quant_out, float_out) if logits else None,
                         max_ratio=float(tolerance.max_error_ratio))


@dataclass(frozen=True)
class ParityResult:
    """Exported file vs PyTorch reference; truthy when within tolerance."""
    file: str
    reference: str
    images: int
    max_abs: float
    max_rel: float
    mean_abs: float
    rel_l2: float
    logit_scale: float
    top1_agreement: float | None      # None for features
    decisive_images: int
    top1_decisive: float | None
    tolerance: Tolerance
    within_tolerance: bool
    outputs: str = "logits"           # or "features" (headless model)
    cosine_min: float = 1.0           # smallest per-image cosine to the reference
    accuracy: QuantAccuracy | None = None   # INT8 files: the gate (see TOLERANCES)

    @property
    def passed(self) -> bool:
        if self.accuracy is not None:
            return self.accuracy.passed
        if self.outputs == "features":
            return self.within_tolerance and self.cosine_min >= self.tolerance.min_cosine
        return self.within_tolerance and self.top1_decisive >= self.tolerance.min_top1

    def agreement(self) -> str:
        """'top-1 agreement 99.00%' or, for features, 'min feature cosine 0.99990'."""
        if self.outputs == "features":
            return f"min feature cosine {self.cosine_min:.5f}"
        return f"top-1 agreement {self.top1_agreement:.2%}"

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        t = self.tolerance
        gate = (f"min {t.min_cosine:g}" if self.outputs == "features" else
                f"{self.top1_decisive:.2%} of {self.decisive_images} non-tied (min {t.min_top1:.0%})")
        head = f"{self.file} vs {self.reference} on {self.images} images: max abs {self.max_abs:.3g} "
        if self.accuracy is not None:
            return (head + f"(reported), rel L2 {self.rel_l2:.3g}, {self.agreement()}; gate: {self.accuracy}: "
                    f"{'PASS' if self.passed else 'FAIL'}")
        return (head + f"(scale {self.logit_scale:.3g}, tol {t.atol:g}x), max rel {self.max_rel:.3g} "
                f"(tol {t.rtol:g}), rel L2 {self.rel_l2:.3g}, {self.agreement()}, {gate}: "
                f"{'PASS' if self.passed else 'FAIL'}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        if self.accuracy is not None:
            d["accuracy"]["passed"] = self.accuracy.passed
        return d


def _torch_runner(model, input_shape, name: str):
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        """Runs a torch.nn.Module on the CPU (or its device) for polygraphy's Comparator."""

        def __init__(self):
            super().__init__(name=name, prefix="pytorch-runner")

        def activate_impl(self):
            self.device = next(model.parameters()).device

        def get_input_metadata_impl(self):
            return TensorMetadata().add(INPUT_NAME, np.float32, (-1, *input_shape))

        def infer_impl(self, feed_dict):
            x = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT_NAME])).to(self.device)
            start = time.perf_counter()
            with torch.no_grad():
                y = model(x)
            self.inference_time = time.perf_counter() - start
            # contiguous: a model may return a view (a headless ViT's CLS slice), which polygraphy cannot read
            return {OUTPUT_NAME: np.ascontiguousarray(y.float().cpu().numpy())}

        def deactivate_impl(self):
            pass

    return TorchRunner()


# x86 flags of an int8 dot product that accumulates in int32 (no int16 intermediate)
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_saturates(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True where ONNX Runtime's fused int8 GEMMs are not exact: x86 CPUs without VNNI/AMX.

    There MLAS multiplies u8 x s8 pairs with vpmaddubsw, whose int16 pair sums saturate
    for large activations and weights (ORT's quantization docs: use VNNI or reduce_range).
    ARM and VNNI CPUs accumulate in int32, as TensorRT's INT8 kernels are documented to; how close a
    TensorRT engine comes to the QDQ graph has not been measured here (``runtime trt-check`` does it).
    """
    machine = machine or platform.machine()
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return bool(flags) and not flags.intersection(_VNNI_FLAGS)


def _ort_session(path: str, threads: int, int8_kernels: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    if not int8_kernels:                 # Q/DQ run as float ops: the graph's exact meaning
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def check_parity(onnx_path, model, batches: list[np.ndarray], tolerance: Tolerance,
                 reference: str = "pytorch", threads: int = 1, int8_kernels: bool = False,
                 outputs: str = "logits", float_outputs: np.ndarray | None = None) -> ParityResult:
    """Run ``model`` and the ONNX file on ``batches`` (float32 NCHW) and compare the logits.

    By default ORT keeps QuantizeLinear/DequantizeLinear as float ops, so an INT8 file is checked
    for what it computes on any exact int8 engine (TensorRT, VNNI/ARM CPUs); ``int8_kernels``
    lets ORT fuse them into its int8 GEMMs instead, to see what this CPU's kernels give.
    ``float_outputs`` (INT8 files, ``model`` fake-quantized): the float model's outputs on the same
    batches, for the INT8 gate (``QuantAccuracy``); without them the element-wise comparison gates.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    path = str(onnx_path)
    model = model.eval()
    feeds = [{INPUT_NAME: np.ascontiguousarray(b, dtype=np.float32)} for b in batches]
    runners = [_torch_runner(model, feeds[0][INPUT_NAME].shape[1:], reference),
               OnnxrtRunner(lambda: _ort_session(path, threads, int8_kernels), name=Path(path).name)]
    # polygraphy's own [E] lines would repeat (and, for the reported-only kernel check, alarm) what
    # the ParityResult below says; callers log or raise it
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(runners, data_loader=feeds)
        ref = np.concatenate([it[OUTPUT_NAME] for it in results[runners[0].name]])
        out = np.concatenate([it[OUTPUT_NAME] for it in results[runners[1].name]])
        scale = float(np.abs(ref).max())
        compare = SimpleCompareFunc(atol=tolerance.atol * scale, rtol=tolerance.rtol,
                                    check_error_stat="elemwise")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    # polygraphy >= 0.53 returns one AccuracyResult per compare function, older ones a single one
    pairs = accuracy if hasattr(accuracy, "values") else accuracy[0]
    per_iter = [it[OUTPUT_NAME] for it in next(iter(pairs.values()))]
    ref2, out2 = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    cosine = (ref2 * out2).sum(1) / (np.linalg.norm(ref2, axis=1) * np.linalg.norm(out2, axis=1) + 1e-30)
    if outputs == "features":
        agree, decisive = None, np.zeros(len(ref2), dtype=bool)
    else:
        agree = out2.argmax(1) == ref2.argmax(1)
        top2 = np.sort(ref2, axis=1)[:, -2:]
        decisive = (top2[:, 1] - top2[:, 0]) > 2 * tolerance.atol * scale
    result = ParityResult(
        file=Path(path).name, reference=reference, images=int(ref.shape[0]),
        max_abs=float(max(r.max_absdiff for r in per_iter)),
        max_rel=float(max(r.max_reldiff for r in per_iter)),
        mean_abs=float(np.abs(out.astype(np.float64) - ref).mean()),
        rel_l2=rel_l2(out, ref),
        logit_scale=scale,
        top1_agreement=None if agree is None else float(np.mean(agree)),
        decisive_images=int(decisive.sum()),
        top1_decisive=None if agree is None else float(np.mean(agree[decisive])) if decisive.any() else 1.0,
        tolerance=tolerance, within_tolerance=bool(accuracy), outputs=outputs,
        cosine_min=float(cosine.min()),
        accuracy=None if float_outputs is None else quant_accuracy(out, ref, float_outputs, tolerance, outputs))
    log.info("%s", result)
    return result
