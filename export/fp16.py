"""FP16 variant of an fp32 graph: weights and compute in half, float32 I/O, LayerNorm in fp32.

Every float32 initializer and intermediate becomes float16; Cast nodes at the boundaries keep
the file's interface ("input"/"logits" float32) unchanged, so runtimes and parity checks
feed it like the fp32 file. LayerNormalization is wrapped in Cast(fp32) ... Cast(fp16) with
fp32 scale/bias: its mean/variance reduction is where fp16 overflows (x² > 65504 for
|x| > 256, common in ViT residual streams). Written here (a few dozen lines) instead of
adding onnxconverter-common for one function.
"""
from __future__ import annotations


import numpy as np

from .errors import ExportError
from .gsutil import replace_tensor, to_proto

FP16_MAX = float(np.finfo(np.float16).max)
KEEP_FP32_OPS = ("LayerNormalization",)


def to_fp16(proto):
    """Return a float16 copy of an fp32 ``proto`` (see module docstring)."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
        raise ExportError("fp16 conversion expects an fp32 graph, not a QDQ (int8) one")
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


def _cast(name, x, y, to):
    import onnx_graphsurgeon as gs

    return gs.Node("Cast", name, attrs={"to": to}, inputs=[x], outputs=[y])


def _half(values: np.ndarray, what: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > FP16_MAX:
        raise ExportError(f"{what} holds values beyond the fp16 range (|x| <= {FP16_MAX:g})")
    return values.astype(np.float16)
