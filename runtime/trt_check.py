"""`python -m runtime trt-check`: proof, on the first machine with a GPU and TensorRT, that the
TensorRT INT8 path does what the export promises.

    python -m runtime trt-check --onnx-dir runs/x/onnx --out runs/x/trt_check

For dense.int8-fp16.onnx and model.int8-fp16.onnx (the real exported graphs) it
  1. builds an engine with ProfilingVerbosity.DETAILED and one optimization profile per timed
     batch (opt = that batch, default 1 and 32);
  2. dumps every layer with the engine inspector (IEngineInspector, JSON; the inspector gets an
     execution context with a concrete input shape, or formats read "N/A due to dynamic
     shapes") and finds the layer of every quantized MatMul (the low-rank factors L.first /
     L.second and the dense Linears) by its ONNX node name; the check fails if any of them
     runs in a precision other than INT8, or cannot be found (e.g. hidden inside a Myelin
     ForeignNode, whose inner kernels the inspector does not list; --allow-hidden reports those
     instead of failing);
  3. compares the engine's logits with ONNX Runtime's on the same file (CPU, Q/DQ run as float
     ops: the graph's meaning) on real images; the gate is export's INT8 gate: the engine's distance
     to the float model (ORT on the fp32 sibling file) at most 1.25x ORT's own, plus 0.005;
  4. times batch 1 and 32 with CUDA events, each on its own profile.
Writes trt_check.json, trt_check.md and the inspector dumps (<file>.layers.json). Without
TensorRT or a GPU it prints one line and exits 3; a failed check exits 1. Nothing in the
output is estimated: every number is measured by this command.

The parsing (``parse_inspector``, ``matmul_precisions``) needs no TensorRT and is tested on
hand-written samples in TensorRT's documented JSON layout.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cliutil import atomic_write_text, write_json
from export import REPORT as EXPORT_REPORT
from export import STEMS, TOLERANCES, onnx_name, quant_accuracy
from runtime.backends.ort import OrtBackend
from runtime.backends.trt import TrtBackend, build_serialized, onnx_input_spec
from runtime.backends.trt_build import TensorRTUnavailable, opt_batch_list, require_cuda, require_tensorrt
from runtime.benchmark import latency_stats
from runtime.errors import RuntimeStageError
from runtime.machine import machine_info

log = logging.getLogger(__name__)

EXIT_FAILED, EXIT_USAGE, EXIT_NO_TENSORRT = 1, 2, 3
FILES = tuple(onnx_name(s, "int8-fp16") for s in STEMS)
# logits of the engine vs ORT on the same QDQ file: a fraction of max|ORT logit| (TensorRT fuses
# differently and accumulates INT8 GEMMs in int32, so one-step rounding flips propagate as in export)
ATOL_FRACTION, MIN_TOP1 = 0.1, 0.9

_DTYPES = (("int8", ("int8",)), ("fp16", ("half", "fp16", "float16")), ("bf16", ("bf16", "bfloat16")),
           ("fp8", ("fp8", "e4m3")), ("int4", ("int4",)), ("int32", ("int32",)), ("int64", ("int64",)),
           ("bool", ("bool",)), ("fp32", ("float", "fp32", "float32")))


def tensor_dtype(tensor: dict) -> str | None:
    """Data type of one inspector tensor entry: "Format/Datatype" (TensorRT 10: "Row major linear
    FP16 format", "Thirty-two wide channel vectorized row major Int8 format.", "Float"), or a
    separate "DataType"; None where the inspector could not say ("N/A due to dynamic shapes")."""
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or "").lower()
    if not text or text.startswith("n/a"):
        return None
    for name, keys in _DTYPES:
        if any(re.search(rf"(?<![a-z0-9]){k}(?![a-z0-9])", text) for k in keys):
            return name
    return None


@dataclass(frozen=True)
class Layer:
    """One engine layer as the inspector reports it."""
    name: str
    layer_type: str
    nodes: tuple[str, ...]            # ONNX node names fused into it (from Name and Metadata)
    inputs: tuple[str | None, ...]    # data type per input tensor
    outputs: tuple[str | None, ...]
    tactic: str | None = None

    @property
    def foreign(self) -> bool:
        """A Myelin region: its inner kernels (and their precisions) are not listed."""
        return self.layer_type.lower() == "myelin" or self.name.startswith("{ForeignNode[")


_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def parse_inspector(text: str) -> list[Layer]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    {"Layers": [{"Name", "LayerType", "Inputs"/"Outputs": [{"Name", "Dimensions",
    "Format/Datatype"}], "TacticName", "Metadata", ...}], "Bindings" | "I/O Tensors": ...}.
    An engine built without DETAILED verbosity lists names only: refused, it proves nothing.
    """
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise RuntimeStageError(f"engine inspector output is not JSON: {e}") from None
    layers = doc.get("Layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise RuntimeStageError("engine inspector JSON has no \"Layers\" list")
    if layers and all(isinstance(x, str) for x in layers):
        raise RuntimeStageError("the engine lists layer names only: build it with ProfilingVerbosity.DETAILED")
    out = []
    for raw in layers:
        name = str(raw.get("Name", ""))
        nodes = [n.strip() for n in name.split(" + ")]
        nodes += _ONNX_LAYER.findall(str(raw.get("Metadata", "")))
        out.append(Layer(
            name=name, layer_type=str(raw.get("LayerType", "")),
            nodes=tuple(dict.fromkeys(n for n in nodes if n)),
            inputs=tuple(tensor_dtype(t) for t in raw.get("Inputs", []) if isinstance(t, dict)),
            outputs=tuple(tensor_dtype(t) for t in raw.get("Outputs", []) if isinstance(t, dict)),
            tactic=raw.get("TacticName") or raw.get("TacticValue")))
    return out


@dataclass(frozen=True)
class MatMulPrecision:
    """Where a quantized ONNX MatMul ended up in the engine and at what input precision."""
    matmul: str
    status: str          # "int8" | "not-int8" | "unknown" (no datatype reported) | "hidden" | "missing"
    layer: str | None = None
    layer_type: str | None = None
    inputs: tuple = ()
    tactic: str | None = None


def matmul_precisions(layers: list[Layer], matmuls) -> list[MatMulPrecision]:
    """For each MatMul node name: the layer it was fused into and whether that layer reads its
    activation as INT8 (the first input: the quantized activation; an INT8 GEMM takes int8 in).
    Not found: "hidden" if the engine has Myelin regions (it may be inside one), else "missing"."""
    by_node = {}
    for layer in layers:
        for n in layer.nodes:
            by_node.setdefault(n, layer)
    foreign = any(layer.foreign for layer in layers)
    out = []
    for m in matmuls:
        layer = by_node.get(m)
        if layer is None:
            out.append(MatMulPrecision(m, "hidden" if foreign else "missing"))
            continue
        first = layer.inputs[0] if layer.inputs else None
        status = "unknown" if first is None else "int8" if first == "int8" else "not-int8"
        out.append(MatMulPrecision(m, status, layer.name, layer.layer_type, layer.inputs, layer.tactic))
    return out


def quantized_matmuls(onnx_path) -> list[str]:
    """Names of the MatMul nodes whose weight is a DequantizeLinear of an int8 initializer."""
    import onnx  # lazy: runtime's device side imports this module without onnx (tests/runtime/test_cli.py)

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    dq_weights = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return [n.name for n in g.node if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in dq_weights]


STATUSES = ("int8", "not-int8", "unknown", "hidden", "missing")


@dataclass
class PrecisionCheck:
    """Per-file result of step 2; truthy when every quantized MatMul is INT8 (or hidden, if allowed)."""
    file: str
    results: list[MatMulPrecision]
    allow_hidden: bool = False
    counts: dict = field(init=False)

    def __post_init__(self):
        self.counts = {s: sum(r.status == s for r in self.results) for s in STATUSES}

    def __bool__(self) -> bool:
        c = self.counts
        bad = c["not-int8"] + c["unknown"] + c["missing"] + (0 if self.allow_hidden else c["hidden"])
        return bool(self.results) and bad == 0

    def __str__(self) -> str:
        c = self.counts
        return (f"{self.file}: {c['int8']}/{len(self.results)} quantized MatMuls INT8, {c['not-int8']} not, "
                f"{c['unknown']} without a datatype, {c['hidden']} hidden in Myelin regions, {c['missing']} "
                f"missing: {'PASS' if self else 'FAIL'}")


def compare_logits(engine_out: np.ndarray, ort_out: np.ndarray, float_out: np.ndarray | None = None) -> dict:
    """max/mean abs difference (and as a fraction of max|ORT logit|), top-1 agreement, pass/fail.

    With ``float_out`` (the float model's logits: ORT on the file's fp32 sibling) the gate is export's
    INT8 gate: the engine must be about as close to the float model as ONNX Runtime's run of the same
    QDQ file is (rounding flips make two exact INT8 runs of a deep network differ element-wise; see
    export.parity.TOLERANCES); the element-wise figures are then reported, not gated.
    """
    d = np.abs(engine_out.astype(np.float64) - ort_out)
    scale = float(np.abs(ort_out).max()) or 1.0
    top1 = float(np.mean(engine_out.argmax(1) == ort_out.argmax(1)))
    out = {"images": int(ort_out.shape[0]), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
           "max_abs_fraction": float(d.max()) / scale, "top1_agreement": top1,
           "tolerance": {"atol_fraction": ATOL_FRACTION, "min_top1": MIN_TOP1},
           "passed": bool(float(d.max()) / scale <= ATOL_FRACTION and top1 >= MIN_TOP1)}
    if float_out is not None:
        acc = quant_accuracy(engine_out, ort_out, float_out, TOLERANCES["int8"])
        out["accuracy"] = {**asdict(acc), "reference": "onnxruntime on the fp32 file", "passed": acc.passed}
        out["passed"] = acc.passed
    return out


# ---------------------------------------------------------------- on a GPU with TensorRT

def inspect_engine(trt, engine, batch: int, chw) -> str:
    """The inspector's JSON for ``engine`` with a context whose input shape is (batch, *chw)."""
    context = engine.create_execution_context()
    context.set_input_shape("input", (batch, *chw))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    del inspector, context
    return text


def check_file(onnx_path: Path, images: np.ndarray, batches, out: Path, *, allow_hidden: bool,
               repeats: int, warmup: int, workspace_mb: int) -> dict:
    trt = require_tensorrt()
    _, chw = onnx_input_spec(onnx_path)
    data, info = build_serialized(onnx_path, precision="int8", min_batch=1, opt_batches=batches,
                                  max_batch=max(batches), workspace_mb=workspace_mb, detailed=True)
    plan = out / (onnx_path.name[:-len(".onnx")] + ".engine")
    plan.write_bytes(data)
    with TrtBackend(plan, precision="int8", onnx_path=onnx_path) as be:
        text = inspect_engine(trt, be._engine, max(batches), chw)
        (out / (onnx_path.name[:-len(".onnx")] + ".layers.json")).write_text(text)
        precision = PrecisionCheck(onnx_path.name, matmul_precisions(parse_inspector(text),
                                                                     quantized_matmuls(onnx_path)), allow_hidden)
        log.info("%s", precision)
        trt_logits = be.run(images)
        timing = {}
        for b in batches:
            x = images[:b] if images.shape[0] >= b else np.resize(images, (b, *images.shape[1:]))
            if warmup:
                be.time_runs(x, warmup)
            timing[str(b)] = {**latency_stats(be.time_runs(x, repeats), b), "profile_opt": be._batches[b]}
        describe = be.describe()
    with OrtBackend(onnx_path, kind="ort", intra_op_threads=0) as ort_be:
        ort_logits = ort_be.run(images)
    fp32 = onnx_path.with_name(onnx_path.name.replace(".int8-fp16.onnx", ".onnx"))
    float_logits = None
    if fp32.is_file():
        with OrtBackend(fp32, kind="ort", intra_op_threads=0) as ort_be:
            float_logits = ort_be.run(images)
    parity = compare_logits(trt_logits, ort_logits, float_logits)
    return {"onnx": str(onnx_path), "build": info, "engine": describe, "precision": {
                "passed": bool(precision), "counts": precision.counts, "allow_hidden": allow_hidden,
                "matmuls": [asdict(r) for r in precision.results]},
            "parity_vs_onnxruntime": parity, "latency": timing,
            "passed": bool(precision) and parity["passed"]}


def render_markdown(report: dict) -> str:
    lines = ["# TensorRT check", "", f"TensorRT {report['tensorrt']} on {report['gpu']}; every figure measured "
             "by `python -m runtime trt-check`.", ""]
    lines += ["| file | INT8 MatMuls | not INT8 | no datatype | hidden | missing | max abs vs ORT | top-1 vs ORT | "
              + " | ".join(f"b{b} p50 ms" for b in report["batches"]) + " | result |",
              "|" + "---|" * (8 + len(report["batches"]))]
    for name, f in report["files"].items():
        c, p = f["precision"]["counts"], f["parity_vs_onnxruntime"]
        lat = " | ".join(f"{f['latency'][str(b)]['p50_ms']:.3f}" for b in report["batches"])
        lines.append(f"| {name} | {c['int8']} | {c['not-int8']} | {c['unknown']} | {c['hidden']} | {c['missing']} | "
                     f"{p['max_abs']:.3g} | {p['top1_agreement']:.1%} | {lat} | "
                     f"{'PASS' if f['passed'] else 'FAIL'} |")
    lines += ["", "Each batch ran on its own optimization profile (opt = that batch); latency is GPU time "
              "between CUDA events around execute_async_v3.", ""]
    for name, f in report["files"].items():
        bad = [m for m in f["precision"]["matmuls"] if m["status"] != "int8"]
        if bad:
            lines.append(f"{name}: " + ", ".join(f"{m['matmul']} ({m['status']}"
                                                 f"{', ' + '/'.join(map(str, m['inputs'])) if m['inputs'] else ''})"
                                                 for m in bad[:20]))
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", type=Path, required=True, help="export directory with *.int8-fp16.onnx")
    p.add_argument("--out", type=Path, required=True, help="folder for trt_check.json/.md and the layer dumps")
    p.add_argument("--batches", default="1,32", help="timed batch sizes, one profile each (default 1,32)")
    p.add_argument("--images", type=int, default=64, help="real calibration images for the ORT comparison")
    p.add_argument("--calib", default=None, help="image folder (default: the model's bundled calibration set)")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--workspace-mb", type=int, default=1024)
    p.add_argument("--allow-hidden", action="store_true",
                   help="report quantized MatMuls hidden inside Myelin regions instead of failing on them")


def _images(args, onnx_dir: Path) -> np.ndarray:
    """Real images, preprocessed as the export's parity check did (its report names the folder)."""
    from calibration_data import load_image_set, make_loader   # torch: only for these images (a device may lack it)
    from compress import load_dense

    report = onnx_dir / EXPORT_REPORT
    doc = json.loads(report.read_text()) if report.is_file() else {}
    folder = args.calib or (doc.get("parity_images") or {}).get("folder")
    if folder is None or "model" not in doc:
        raise RuntimeStageError(f"{onnx_dir} has no export_report.json naming the model and its parity images")

    images = load_image_set(folder, num=args.images)
    return np.concatenate([x.numpy() for x, _ in make_loader(images, load_dense(doc), batch_size=32)])


def main(args: argparse.Namespace) -> int:
    try:
        trt = require_tensorrt()
        cuda = require_cuda()
        batches = opt_batch_list(args.batches)
        files = [args.onnx_dir / f for f in FILES]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise RuntimeStageError(f"{args.onnx_dir} has no {', '.join(missing)} (run `make export` first)")
        args.out.mkdir(parents=True, exist_ok=True)
        images = _images(args, args.onnx_dir)
        results = {f.name: check_file(f, images, batches, args.out, allow_hidden=args.allow_hidden,
                                      repeats=args.repeats, warmup=args.warmup, workspace_mb=args.workspace_mb)
                   for f in files}
    except TensorRTUnavailable as e:
        print(f"runtime trt-check: {e}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    except RuntimeStageError as e:
        print(f"runtime trt-check: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = {"tensorrt": trt.__version__, "gpu": cuda.device_properties(0)["name"],
              "cuda_device": cuda.device_properties(0), "cuda_runtime": cuda.runtime_version(),
              "machine": machine_info(), "batches": list(batches), "files": results,
              "passed": all(f["passed"] for f in results.values())}
    write_json(args.out / "trt_check.json", report)
    md = render_markdown(report)
    atomic_write_text(args.out / "trt_check.md", md)
    print(md)
    return 0 if report["passed"] else EXIT_FAILED
