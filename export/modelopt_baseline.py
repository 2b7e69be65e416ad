"""The peer baseline: NVIDIA ModelOpt's ONNX INT8 PTQ of the dense model, ``dense.modelopt-int8.onnx``.

What a user would pick instead of this project's INT8 export: ModelOpt
(``modelopt.onnx.quantization.quantize``, PyPI ``nvidia-modelopt``) quantizes the dense
``dense.onnx`` on its own, calibrating on CPU with ONNX Runtime, on the same calibration images
compress used (the manifest's folder, count and seed, preprocessed the same way). Its settings
are its defaults (entropy calibration, its own choice of ops and of Q/DQ placement) except two:
the calibration runs on the CPU execution provider, and everything left unquantized stays
float32 (``high_precision_dtype="fp32"``) so ONNX Runtime's CPU kernels take it like
``dense.int8.onnx``; ModelOpt's default there is float16, for TensorRT.

The package is an optional extra (``pip install 'vit-edge[modelopt]'``, imported here only): its
``[onnx]`` extra pins onnx/onnxruntime-gpu versions that replace the project's, so the extra
installs ``nvidia-modelopt`` without it plus the modules its ONNX PTQ imports.

    python -m export --compressed runs/x/compressed --out runs/x/onnx --modelopt
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from calibration_data import CalibrationDataError, load_image_set, make_loader

from .errors import ExportError
from .files import BASELINE, onnx_name
from .onnx_export import INPUT_NAME

log = logging.getLogger(__name__)

FILENAME = onnx_name("dense", BASELINE)   # export.files: the peer baseline's row
INSTALL_HINT = "pip install 'vit-edge[modelopt]'"


@dataclass(frozen=True)
class ModeloptSettings:
    """The ModelOpt arguments that differ from its defaults (see the module docstring)."""
    calibration_method: str = "entropy"    # ModelOpt's default for int8
    high_precision_dtype: str = "fp32"     # ModelOpt's default is fp16 (TensorRT); fp32 for ORT CPU
    calibration_eps: tuple[str, ...] = ("cpu",)


def quantize_arguments(onnx_path, calibration: np.ndarray, out_path,
                       settings: ModeloptSettings = ModeloptSettings()) -> dict:
    """The keyword arguments of ``modelopt.onnx.quantization.quantize`` for one file."""
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ExportError(f"ModelOpt calibration needs a non-empty NCHW image batch, got shape {calibration.shape}")
    if not np.isfinite(calibration).all():
        raise ExportError("ModelOpt calibration images contain NaN/Inf")

    return {"onnx_path": str(onnx_path), "quantize_mode": "int8", "output_path": str(out_path),
            "calibration_data": {INPUT_NAME: calibration},
            "calibration_method": settings.calibration_method,
            "calibration_eps": list(settings.calibration_eps),
            "high_precision_dtype": settings.high_precision_dtype,
            "log_level": "WARNING"}


def calibration_images(manifest: dict, model) -> np.ndarray:
    """The images compress calibrated on (manifest ``calibration``: folder, count, seed), preprocessed
    for ``model`` as one float32 NCHW array."""
    cal = manifest.get("calibration") or {}
    if not cal.get("path") or not cal.get("images"):
        raise ExportError("the manifest does not record its calibration images (calibration.path/images); "
                          "re-run compress")
    try:
        images = load_image_set(cal["path"], num=int(cal["images"]), seed=int(cal.get("seed") or 0))
        return np.concatenate([x.numpy() for x, _ in make_loader(images, model, batch_size=64)])
    except CalibrationDataError as e:
        raise ExportError(f"ModelOpt calibration images: {e}") from None


def modelopt_version() -> str:
    """The installed nvidia-modelopt version; ExportError (one line, with the install command) if missing."""
    try:
        import modelopt
        import modelopt.onnx.quantization  # noqa: F401  (its ONNX PTQ needs more modules than the base)
    except ImportError as e:
        raise ExportError(f"the ModelOpt baseline needs nvidia-modelopt ({INSTALL_HINT}): "
                          f"{type(e).__name__}: {e}") from None
    return modelopt.__version__


def modelopt_int8(onnx_path, calibration: np.ndarray, out_path,
                  settings: ModeloptSettings = ModeloptSettings()) -> dict:
    """Quantize ``onnx_path`` with ModelOpt into ``out_path``; returns what it did (version, settings,
    its quantized MatMul/Gemm count) for the export report."""
    version = modelopt_version()
    from modelopt.onnx.quantization import quantize

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    log.info("ModelOpt %s: quantizing %s on %d calibration images", version, onnx_path.name, len(calibration))
    # ModelOpt rewrites its input file (it names unnamed nodes) and leaves files beside it: it works on
    # a copy in a folder of its own, so dense.onnx stays the file export checked
    with tempfile.TemporaryDirectory(prefix=".modelopt-", dir=out_path.parent) as work:
        src, dst = Path(work) / onnx_path.name, Path(work) / out_path.name
        shutil.copyfile(onnx_path, src)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as said:   # ONNX Runtime's calibrator prints per batch
                quantize(**quantize_arguments(src, calibration, dst, settings))
            log.debug("%s", said.getvalue())
        except Exception as e:  # a third-party tool: whatever it raises is reported in one line
            raise ExportError(f"ModelOpt {version} failed on {onnx_path.name}: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not dst.is_file():
            raise ExportError(f"ModelOpt {version} wrote no {out_path.name}")
        os.replace(dst, out_path)

    return {"tool": f"nvidia-modelopt {version}", "settings": dataclasses.asdict(settings),
            "calibration_images": len(calibration), **qdq_summary(onnx.load(str(out_path)))}


def qdq_summary(proto) -> dict:
    """MatMul/Gemm nodes, those fed by a DequantizeLinear (quantized), and the Q/DQ node counts.
    ModelOpt keeps weights float32 behind a QuantizeLinear unless ``dq_only``: the initializer
    bytes by dtype (export.stats) say how the weights are stored."""
    g = proto.graph
    dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    gemms = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    return {"matmuls": len(gemms), "matmuls_quantized": sum(any(i in dq_out for i in n.input) for n in gemms),
            "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in g.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in g.node)}
