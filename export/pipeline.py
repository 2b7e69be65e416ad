"""Compressed directory -> the eight ONNX files + export_report.json, each checked against PyTorch.
With ``modelopt``, a ninth: dense.modelopt-int8.onnx, NVIDIA ModelOpt's INT8 of dense.onnx, the
peer baseline (export.modelopt_baseline; its parity is reported, not gated).

    dense.onnx / dense.int8.onnx / dense.fp16.onnx / dense.int8-fp16.onnx   the original model (the baseline)
    model.onnx / model.int8.onnx / model.fp16.onnx / model.int8-fp16.onnx   the compressed model (low-rank pairs)

*.int8.onnx keeps float32 outside the quantized MatMuls (what ONNX Runtime's CPU kernels
take); *.int8-fp16.onnx is the same QDQ graph with float16 everywhere else, at opset >= 19
(float16 Q/DQ scales), for TensorRT: a strongly typed engine runs its INT8 GEMMs with FP16
elsewhere instead of FP32/TF32. It is written when both int8 and fp16 are on.

Everything is built in a temporary sibling folder that replaces ``out`` in one swap
(cliutil.staging_dir, as compress publishes), so a failure part-way leaves the old
folder whole and never a mix; on a parity failure the new folder holds only the report (so
nothing downstream picks up a wrong or stale file) and ParityError is raised. The report
records the compressed model's fingerprint and each file's sha256 (checked by runtime eval).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon
import onnxruntime
import polygraphy
import timm
import timm.data
import torch
from torch import nn

from calibration_data import CalibrationDataError, default_calibration_for, load_image_set, make_loader
from cliutil import staging_dir
from compress import (CompressError, LowRankLinear, apply_fake_quant_, excluded_linears, fingerprint, load_compressed,
                      load_dense, lowrank_layers, model_outputs, quantize_weight, remove_fake_quant_)

from .errors import ExportError, ParityError
from .files import BY_FILENAME, REPORT, STEMS, onnx_name
from .fp16 import QDQ_FP16_OPSET, fp16_gauge, graph_opset, to_fp16
from .linears import canonicalize_linears, check_pairs, linear_weights
from .modelopt_baseline import FILENAME as MODELOPT_FILE, calibration_images, modelopt_int8, modelopt_version
from .onnx_export import MIN_OPSET, check_opset, export_onnx
from .parity import TOLERANCES, check_parity, cpu_int8_saturates
from .qdq import QuantizedLinear, insert_qdq
from .stats import graph_stats

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExportOptions:
    """How to export: target opset, which variants, and the parity images."""
    opset: int = MIN_OPSET
    int8: bool = True
    fp16: bool = True
    calib: str | None = None   # image folder for parity; default: the model's bundled calibration set
    num_parity: int = 64
    batch_size: int = 32
    threads: int = 1           # ONNX Runtime intra-op threads for the parity runs
    device: str = "cpu"
    modelopt: bool = False     # also write the peer baseline dense.modelopt-int8.onnx (export.modelopt_baseline)

    def __post_init__(self):
        check_opset(self.opset)
        if self.num_parity < 1:
            raise ExportError(f"--num-parity must be >= 1, got {self.num_parity}")
        if self.batch_size < 1:
            raise ExportError(f"batch size must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------- loading
def load_artifacts(compressed_dir) -> tuple[object, dict, object]:
    """(compressed model, manifest, dense model) from a compress output directory alone."""
    d = Path(compressed_dir)
    if not d.is_dir():
        raise ExportError(f"compressed directory {d} does not exist (run `make compress` first)")
    try:
        model, manifest = load_compressed(d)
    except CompressError as e:
        raise ExportError(f"cannot load {d}: {e}") from None
    spec = manifest["model"]
    try:
        dense = load_dense(manifest)
    except CompressError as e:
        raise ExportError(f"cannot rebuild the dense model {spec.get('name')}: {e}") from None
    check_architecture(model, dense, manifest)
    if not same_origin(model, dense):
        log.warning("the rebuilt dense %s differs from the compressed model outside its factorised layers "
                    "(weights: %s): dense.* files are not the model that was compressed",
                    spec.get("name"), spec.get("weights"))
    return model.eval(), manifest, dense.eval()


def same_origin(model, dense) -> bool:
    """True when every parameter outside the LowRankLinears equals the dense model's (the
    embeddings, norms and head are never changed by compress)."""
    inside = tuple(f"{n}." for n in lowrank_layers(model))
    dense_params = dict(dense.named_parameters())
    return all(torch.equal(p, dense_params[n]) for n, p in model.named_parameters()
               if not n.startswith(inside) and n in dense_params)


def check_architecture(model, dense, manifest: dict) -> None:
    """The compressed model, the dense model and the manifest must describe one architecture."""
    def fail(msg):
        raise ExportError(f"architecture mismatch: {msg}")

    lowrank = lowrank_layers(model)
    for name, info in manifest["layers"].items():
        try:
            d = dense.get_submodule(name)
        except AttributeError:
            fail(f"layer {name} of the manifest is not in the dense {manifest['model'].get('name')}")
        if not isinstance(d, nn.Linear) or (d.out_features, d.in_features) != (info["out"], info["in"]):
            fail(f"{name} is {tuple(getattr(d, 'weight', d).shape)} in the dense model, "
                 f"manifest says {info['out']}x{info['in']}")
        if info.get("dense"):
            continue
        m = lowrank.get(name)
        if not isinstance(m, LowRankLinear):
            fail(f"{name} is compressed in the manifest but not a LowRankLinear in the loaded model")
        got = (m.in_features, m.out_features, m.rank, m.comp_rank)
        want = (info["in"], info["out"], info["rank"], info.get("comp_rank", 0))
        if got != want:
            fail(f"{name} is (in, out, rank, comp_rank) {got}, manifest says {want}")
    inside = {f"{n}." for n in lowrank}
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in inside):
            continue
        q = dense_params.get(name)
        if q is None or q.shape != p.shape:
            fail(f"parameter {name} {tuple(p.shape)} has no counterpart of that shape in the dense model")


def quantized_linears(model, ranges: dict[str, dict]):
    """QuantizedLinear specs (int8 weights from compress.quantize) for the layers in ``ranges``."""
    def int8(lin):
        q, s = quantize_weight(lin.weight)
        return q.cpu().numpy(), s.cpu().numpy()

    out = []
    for name, r in ranges.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"architecture mismatch: quantized layer {name} is not in the model") from None
        if isinstance(mod, LowRankLinear):
            weights = {f"{name}.first": int8(mod.first), f"{name}.second": int8(mod.second)}
        elif isinstance(mod, nn.Linear):
            weights = {name: int8(mod)}
        else:
            raise ExportError(f"architecture mismatch: quantized layer {name} is a {type(mod).__name__}, not a Linear")
        out.append(QuantizedLinear(name, r["input"], r.get("mid"), weights))
    return out


# ----------------------------------------------------------------------------- export
def export_variant(model, input_size, opset: int, expect_pairs: bool) -> object:
    """fp32 ONNX of one model with canonical Linears (and, for the compressed one, checked pairs)."""
    proto = export_onnx(model, input_size, opset)
    proto, _ = canonicalize_linears(proto, linear_weights(model))
    expected = {n: (m.in_features, m.rank + m.comp_rank, m.out_features)
                for n, m in lowrank_layers(model).items()}
    if expect_pairs and not expected:
        raise ExportError("the compressed model has no LowRankLinear layers")
    check_pairs(proto, expected, excluded_linears(model))
    return proto


def parity_batches(images_dir, model, num: int, batch_size: int) -> list:
    """Real images preprocessed with the model's timm data config, as float32 numpy batches."""
    try:
        images = load_image_set(images_dir, num=num)
        return [x.numpy() for x, _ in make_loader(images, model, batch_size=batch_size)]
    except CalibrationDataError as e:
        raise ExportError(str(e)) from None


def export_compressed(compressed_dir, out_dir, options: ExportOptions | None = None) -> dict:
    """Write the ONNX files and export_report.json to ``out_dir``; returns the report."""
    options = options or ExportOptions()
    if options.modelopt:   # before any work: a missing optional extra is one line
        modelopt_version()
    model, manifest, dense = load_artifacts(compressed_dir)
    quant = manifest.get("quant") or {}
    ranges = {"model": quant.get("act_ranges"), "dense": quant.get("dense_act_ranges")}
    if options.int8 and not all(ranges.values()):
        raise ExportError("the manifest has no INT8 calibration (quant.act_ranges / dense_act_ranges); "
                          "re-run compress with quantization or pass --no-int8")
    models = {"dense": dense, "model": model}
    qspecs = {k: quantized_linears(models[k], ranges[k]) for k in STEMS} if options.int8 else {}
    input_size = tuple(timm.data.resolve_data_config({}, model=dense)["input_size"])
    calib = options.calib or default_calibration_for(dense)
    batches = parity_batches(calib, dense, options.num_parity, options.batch_size)
    outputs = manifest["model"].get("outputs", "logits")

    source = {"compressed": str(Path(compressed_dir).absolute()), "fingerprint": fingerprint(compressed_dir)}
    out = Path(out_dir)
    with staging_dir(out) as tmp:
        files: dict[str, dict] = {}
        for stem in STEMS:
            m = models[stem]
            proto = export_variant(m, input_size, options.opset, expect_pairs=stem == "model")
            jobs = [(onnx_name(stem), proto, "fp32", None)]
            if options.int8:
                jobs.append((onnx_name(stem, "int8"), insert_qdq(proto, qspecs[stem]), "int8", ranges[stem]))
            if options.fp16:
                jobs.append((onnx_name(stem, "fp16"), to_fp16(proto), "fp16", None))
            if options.int8 and options.fp16:
                jobs.append((onnx_name(stem, "int8-fp16"), int8_fp16(proto, qspecs[stem]), "int8", ranges[stem]))
            for fname, p, precision, r in jobs:
                onnx.checker.check_model(p)
                onnx.save(p, str(tmp / fname))
                files[fname] = check_file(tmp / fname, m, precision, r, batches, options.threads,
                                          ort_kernels=BY_FILENAME[fname].precision != "int8-fp16", outputs=outputs)
        if options.modelopt:
            files.update(modelopt_file(tmp, manifest, dense, batches, options.threads, outputs))
        for fname in files:
            files[fname]["sha256"] = _sha256(tmp / fname)
        report = dict(build_report(manifest, models, options, calib, files), source=source)
        failed = [f for f, s in files.items() if not s["parity"]["passed"] and "baseline" not in s]
        for fname in files if failed else ():
            (tmp / fname).unlink()
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=_json_default))
    if failed:
        p = files[failed[0]]["parity"]
        a = p.get("accuracy")
        agree = (f"top-1 {p['top1_agreement']:.1%}" if p.get("outputs", "logits") == "logits"
                 else f"min feature cosine {p['cosine_min']:.4f}")
        what = (f"rel. L2 to the float model {a['file_error']:.3g}, fake-quant's {a['fake_quant_error']:.3g}" if a
                else f"max abs {p['max_abs']:.3g}, {agree}")
        raise ParityError(f"parity failed for {', '.join(failed)} (e.g. {failed[0]}: {what}); no ONNX written, "
                          f"see {out / REPORT}")
    return report


def modelopt_file(tmp: Path, manifest: dict, dense, batches, threads: int, outputs: str) -> dict:
    """ModelOpt's INT8 of ``tmp/dense.onnx`` (the peer baseline): its stats, and its parity against
    PyTorch FP32 at the INT8 tolerance, reported but not gated (it is not this project's quantizer)."""
    baseline = modelopt_int8(tmp / onnx_name("dense"), calibration_images(manifest, dense), tmp / MODELOPT_FILE)
    stats = check_file(tmp / MODELOPT_FILE, dense, "int8", None, batches, threads, outputs=outputs)
    if not stats["parity"]["passed"]:
        log.warning("%s is further from PyTorch FP32 than the INT8 tolerance (max abs %.3g): kept, it is "
                    "the baseline as ModelOpt makes it", MODELOPT_FILE, stats["parity"]["max_abs"])
    return {MODELOPT_FILE: {**stats, "baseline": baseline}}


def int8_fp16(proto, qspecs):
    """The INT8 QDQ graph of an fp32 ``proto`` with float16 everywhere else, for TensorRT (opset >= 19)."""
    if graph_opset(proto) < QDQ_FP16_OPSET:
        proto = onnx.version_converter.convert_version(proto, QDQ_FP16_OPSET)
    return to_fp16(insert_qdq(*fp16_gauge(proto, qspecs)))


def check_file(path: Path, model, precision: str, ranges: dict | None, batches, threads: int,
               ort_kernels: bool = True, outputs: str = "logits") -> dict:
    """Stats + parity of one written file; int8 files are compared with the fake-quant model (and,
    with ``ort_kernels``, ONNX Runtime's own int8 kernels are reported beside the graph's meaning)."""
    reference = "pytorch " + ("fake-quant int8" if ranges is not None else "fp32")
    kernels = float_out = None
    if ranges is not None:   # the INT8 gate is accuracy against the float model (export.parity.TOLERANCES)
        float_out = model_outputs(model, [torch.from_numpy(b) for b in batches]).flatten(1).numpy()
        apply_fake_quant_(model, ranges)
    try:
        parity = check_parity(path, model, batches, TOLERANCES[precision], reference, threads, outputs=outputs,
                              float_outputs=float_out)
        if ranges is not None and ort_kernels:   # what ORT's int8 kernels give on this CPU: reported, not gated
            kernels = check_parity(path, model, batches, TOLERANCES[precision], reference, threads,
                                   int8_kernels=True, outputs=outputs, float_outputs=float_out)
    finally:
        if ranges is not None:
            remove_fake_quant_(model)
    log.info("%s", parity)
    stats = {"precision": precision, **graph_stats(path), "parity": parity.to_dict()}
    if kernels is not None:
        saturates = cpu_int8_saturates()
        stats["ort_int8_kernels"] = {**kernels.to_dict(), "cpu_saturates": saturates}
        if not kernels:
            log.warning("%s: ONNX Runtime's int8 kernels on this CPU deviate from the graph (max abs %.3g, "
                        "%s)%s", path.name, kernels.max_abs, kernels.agreement(),
                        "; x86 without VNNI: their int16 pair sums saturate, TensorRT and VNNI/ARM CPUs "
                        "are exact" if saturates else "")
    return stats


def build_report(manifest, models, options, calib, files) -> dict:
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    return {
        "model": manifest["model"],
        "opset": options.opset,
        "options": asdict(options),
        "parity_images": {"folder": str(calib), "count": next(iter(files.values()))["parity"]["images"]},
        "params": params,
        "dense_is_compressed_origin": same_origin(models["model"], models["dense"]),
        "fp32_param_bytes": {k: 4 * v for k, v in params.items()},
        "lowrank_layers": {n: {"in": m.in_features, "width": m.rank + m.comp_rank, "rank": m.rank,
                               "comp_rank": m.comp_rank, "out": m.out_features}
                           for n, m in lowrank_layers(models["model"]).items()},
        "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
        "files": files,
        "passed": all(f["parity"]["passed"] for f in files.values() if "baseline" not in f),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "onnx_graphsurgeon": onnx_graphsurgeon.__version__,
                     "polygraphy": polygraphy.__version__, "numpy": np.__version__,
                     "exporter": "torch.onnx.export(dynamo=True)"},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
