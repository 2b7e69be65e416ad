"""FP16 variant of an fp32 or QDQ graph: weights and compute in half, float32 I/O, LayerNorm in fp32.

Every float32 initializer and intermediate becomes float16; Cast nodes at the boundaries keep
the file's interface ("input"/"logits" float32) unchanged, so runtimes and parity checks
feed it like the fp32 file. LayerNormalization is wrapped in Cast(fp32) ... Cast(fp16) with
fp32 scale/bias: its mean/variance reduction is where fp16 overflows (x² > 65504 for
|x| > 256, common in ViT residual streams). Written here (a few dozen lines) instead of
adding onnxconverter-common for one function.

A QDQ (int8) graph converts too, into what a strongly typed TensorRT network runs as INT8
GEMMs with FP16 everywhere else (ModelOpt's default): Q/DQ scales become float16, which
QuantizeLinear/DequantizeLinear accept from opset 19 on. A scale below float16's smallest
normal number (6.1e-5) is raised to it; a weight channel with such a scale is re-quantized
to the raised scale (error <= 3.1e-5 absolute), so no scale underflows to zero. Before that,
``fp16_gauge`` moves a power of two between the factors of each low-rank pair, which is exact
for the int8 graph (every int8 value stays the same), so pair scales rarely need raising.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import ExportError
from .gsutil import replace_tensor, to_proto
from .qdq import AMAX_EPS, QMAX

log = logging.getLogger(__name__)

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16
KEEP_FP32_OPS = ("LayerNormalization",)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QDQ_FP16_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear take float16 scales


def to_fp16(proto):
    """Return a float16 copy of an fp32 or QDQ ``proto`` (see module docstring)."""
    graph = gs.import_onnx(proto)
    qdq = [n for n in graph.nodes if n.op in QDQ_OPS]
    if qdq:
        opset = graph_opset(proto)
        if opset < QDQ_FP16_OPSET:
            raise ExportError(f"a QDQ graph needs opset >= {QDQ_FP16_OPSET} for float16 scales, this one "
                              f"is opset {opset} (onnx.version_converter.convert_version it first)")
        _half_qdq_scales(qdq)
    kept = [n for n in graph.nodes if n.op in KEEP_FP32_OPS]
    for node in kept:  # an fp32 parameter shared with a half-precision op gets its own copy
        for i, t in enumerate(node.inputs[1:], start=1):
            if isinstance(t, gs.Constant) and any(c.op not in KEEP_FP32_OPS for c in t.outputs):
                node.inputs[i] = gs.Constant(f"{t.name}.fp32.{node.name}", np.array(t.values))
    keep_consts = {id(t) for n in kept for t in n.inputs[1:]}
    boundary = {id(t) for t in graph.inputs + graph.outputs}

    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if t.values.dtype == np.float32 and id(t) not in keep_consts:
                t.values = _half(np.asarray(t.values), t.name)
        elif t.dtype == np.float32 and id(t) not in boundary:
            t.dtype = np.float16
    for node in graph.nodes:
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        elif node.op in ("Constant", "ConstantOfShape") and "value" in node.attrs:
            val = node.attrs["value"]
            if isinstance(val, gs.Constant) and val.values.dtype == np.float32:
                val.values = _half(np.asarray(val.values), node.name)
        elif node.op in ("RandomNormal", "RandomUniform", "EyeLike") and "dtype" in node.attrs:
            raise ExportError(f"fp16 conversion does not handle op {node.op}")

    for node in kept:
        if any(o.outputs for o in node.outputs[1:]):
            raise ExportError(f"{node.name}: extra LayerNormalization outputs are not supported in fp16")
        x, y = node.inputs[0], node.outputs[0]
        x32 = gs.Variable(f"{node.name}.input_fp32", dtype=np.float32)
        y32 = gs.Variable(f"{node.name}.output_fp32", dtype=np.float32)
        graph.nodes.append(_cast(f"{node.name}.cast_in", x, x32, onnx.TensorProto.FLOAT))
        graph.nodes.append(_cast(f"{node.name}.cast_out", y32, y, onnx.TensorProto.FLOAT16))
        node.inputs[0], node.outputs[0] = x32, y32
        while len(node.outputs) > 1:
            node.outputs.pop()

    for inp in graph.inputs:
        if inp.dtype != np.float32:
            continue
        half = gs.Variable(f"{inp.name}.fp16", dtype=np.float16, shape=inp.shape)
        for cons in list(inp.outputs):
            replace_tensor(cons.inputs, inp, half)
        graph.nodes.append(_cast(f"{inp.name}.cast_fp16", inp, half, onnx.TensorProto.FLOAT16))
    for out in graph.outputs:
        if out.dtype != np.float32:
            continue
        half = gs.Variable(f"{out.name}.fp16", dtype=np.float16, shape=out.shape)
        prod = out.inputs[0]
        replace_tensor(prod.outputs, out, half)
        graph.nodes.append(_cast(f"{out.name}.cast_fp32", half, out, onnx.TensorProto.FLOAT))
    return to_proto(graph, proto)


def fp16_gauge(proto, specs: list) -> tuple:
    """(proto, specs) with, for each low-rank pair, first -> 2^k first, h -> 2^k h, second -> second 2^-k
    (float weights in a copy of ``proto`` and int8 scales in the specs), k chosen so the weight scales of
    both factors are float16 normals where one shift can do it.

    Exact in the int8 graph: per-row weight scales and the per-tensor scale of h scale by 2^k with the
    values, so every int8 value and every dequantized product stays the same (the fp32 graph's factors
    are free to sit at any such gauge; SVD leaves the first factor's rows small for large inputs).
    Rows at compress.quantize's zero floor (all-zero weights) are ignored: their scale multiplies 0.
    """
    graph = gs.import_onnx(proto)
    nodes = {n.name: n for n in graph.nodes}
    floor = 2 * AMAX_EPS / QMAX  # above the scale of an all-zero row
    out = []
    for q in specs:
        first, second = f"{q.layer}.first", f"{q.layer}.second"
        if first not in q.weights or q.mid_amax is None:
            out.append(q)
            continue
        (w1, s1), (w2, s2) = q.weights[first], q.weights[second]
        live1, live2 = s1[s1 > floor], s2[s2 > floor]
        if not live1.size or not live2.size:
            out.append(q)
            continue
        lo = int(np.ceil(np.log2(FP16_TINY / live1.min())))        # first's rows need k >= lo
        hi = int(np.floor(np.log2(live2.min() / FP16_TINY)))       # second's rows allow k <= hi
        top = int(np.floor(np.log2(FP16_MAX / 2 / max(q.mid_amax, AMAX_EPS))))  # h stays in range
        k = max(0, min(lo, hi, top))
        if k == 0:
            out.append(q)
            continue
        c = np.float32(2.0 ** k)
        for name, f in ((first, c), (second, 1 / c)):
            w = nodes[name].inputs[1] if name in nodes else None
            if not isinstance(w, gs.Constant):
                raise ExportError(f"low-rank factor {name} is not a MatMul by a constant in the exported graph")
            nodes[name].inputs[1] = gs.Constant(w.name, (np.asarray(w.values) * f).astype(w.values.dtype))
        out.append(replace(q, mid_amax=q.mid_amax * float(c),
                           weights={**q.weights, first: (w1, s1 * c), second: (w2, s2 / c)}))
    return to_proto(graph, proto), out


def graph_opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _half_qdq_scales(nodes) -> None:
    """Q/DQ scales -> float16, none below FP16_TINY; weights re-quantized where theirs was raised."""
    done = set()
    for node in nodes:
        scale = node.inputs[1]
        if not isinstance(scale, gs.Constant):
            raise ExportError(f"{node.name}: Q/DQ scale {scale.name} is not a constant")
        if id(scale) in done or scale.values.dtype != np.float32:
            continue
        done.add(id(scale))
        s32 = np.asarray(scale.values, dtype=np.float32)
        s16 = _half(s32, scale.name)
        low = s16.astype(np.float32) < FP16_TINY
        if np.any(low):
            s16 = np.where(low, np.float16(FP16_TINY), s16).astype(np.float16)
            data = node.inputs[0]
            if node.op == "DequantizeLinear" and isinstance(data, gs.Constant):  # an int8 weight
                axis = node.attrs.get("axis", 1)
                shape = [1] * data.values.ndim
                shape[axis] = -1
                ratio = (s32 / s16.astype(np.float32)).reshape(shape) if s32.ndim else s32 / np.float32(s16)
                q = np.asarray(data.values)
                data.values = np.clip(np.round(q * ratio), -127, 127).astype(q.dtype)
            log.warning("%s: %d scale(s) below float16's smallest normal %.3g raised to it",
                        scale.name, int(low.sum()), FP16_TINY)
        scale.values = s16


def _cast(name, x, y, to):
    return gs.Node("Cast", name, attrs={"to": to}, inputs=[x], outputs=[y])


def _half(values: np.ndarray, what: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > FP16_MAX:
        raise ExportError(f"{what} holds values beyond the fp16 range (|x| <= {FP16_MAX:g})")
    return values.astype(np.float16)
