"""INT8 explicit quantization (QDQ) of the canonical graph, in the layout TensorRT expects.

For each quantized layer L (METHOD.md §5), with scales from the compress stage (amax / 127):
  * weights: real int8 initializers "N.weight_quantized" [in, out] + DequantizeLinear
    "N.weight_dq" (axis=1, the output channel of a MatMul weight; per-channel float32
    scales; zero point 0) feeding the MatMul directly, for N in L / L.first / L.second;
  * activations: per-tensor QuantizeLinear -> DequantizeLinear ("L.input_q/_dq") on the
    input of the layer, and ("L.mid_q/_dq") on h = x Bᵀ between the two MatMuls of a pair.
Nothing else is touched: LayerNorm, Softmax, GELU and the residual Adds stay float, and so
do the attention MatMuls (q·kᵀ, attn·v) and every Linear without ranges. Which Linears have
ranges is the compress stage's choice: today compress.quantize calibrates the classifier head
too, so the head is quantized (ModelOpt leaves the output layer float).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ExportError
from .gsutil import const_value, to_proto

# Imported inside functions (onnx_graphsurgeon): `import export` stays free of onnx and torch for runtime's
# device side (tests/runtime/test_cli.py).

QMAX = 127  # symmetric int8: scale = amax / 127, zero point 0
AMAX_EPS = 1e-12  # compress.quantize's floor for a range


@dataclass(frozen=True)
class QuantizedLinear:
    """What the INT8 graph needs for one layer: activation ranges and int8 weights per MatMul."""
    layer: str
    input_amax: float
    mid_amax: float | None = None
    # MatMul node name (L, L.first, L.second) -> (int8 weight [out, in], float32 scale [out])
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def activation_scale(amax: float, what: str) -> np.ndarray:
    """amax / 127 as float32, exactly as compress.quantize.fake_quant_act computes it (an
    all-zero tensor, amax 0, gets the same tiny positive scale there and here)."""
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ExportError(f"invalid activation range for {what}: amax={amax} (must be finite and >= 0)")
    return np.array(max(amax, AMAX_EPS) / QMAX, dtype=np.float32)


def insert_qdq(proto, layers: list[QuantizedLinear]):
    """Return a copy of ``proto`` with Q/DQ nodes for ``layers`` (see module docstring)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    nodes = {n.name: n for n in graph.nodes}
    for q in layers:
        pair = f"{q.layer}.first" in nodes
        entry = nodes.get(f"{q.layer}.first" if pair else q.layer)
        if entry is None or entry.op != "MatMul":
            raise ExportError(f"quantized layer {q.layer} is not a MatMul in the exported graph")
        _quantize_activation(graph, entry, f"{q.layer}.input", q.input_amax)
        if pair:
            if q.mid_amax is None:
                raise ExportError(f"{q.layer} is a low-rank pair but has no 'mid' activation range")
            _quantize_activation(graph, nodes[f"{q.layer}.second"], f"{q.layer}.mid", q.mid_amax)
        expected = {f"{q.layer}.first", f"{q.layer}.second"} if pair else {q.layer}
        if set(q.weights) != expected:
            raise ExportError(f"{q.layer}: int8 weights given for {sorted(q.weights)}, expected {sorted(expected)}")
        for name, (wq, ws) in q.weights.items():
            _quantize_weight(graph, nodes[name], name, np.asarray(wq), np.asarray(ws))
    return to_proto(graph, proto)


def _quantize_activation(graph, node, prefix: str, amax: float) -> None:
    import onnx_graphsurgeon as gs

    scale = gs.Constant(f"{prefix}_scale", activation_scale(amax, prefix))
    zero = gs.Constant(f"{prefix}_zero_point", np.array(0, dtype=np.int8))
    q = gs.Variable(f"{prefix}_quantized", dtype=np.int8)
    dq = gs.Variable(f"{prefix}_dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{prefix}_q", inputs=[node.inputs[0], scale, zero], outputs=[q]))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{prefix}_dq", inputs=[q, scale, zero], outputs=[dq]))
    node.inputs[0] = dq


def _quantize_weight(graph, node, name: str, wq: np.ndarray, ws: np.ndarray) -> None:
    import onnx_graphsurgeon as gs

    w = const_value(node.inputs[1])  # float [in, out]
    if w is None or wq.dtype != np.int8 or wq.T.shape != w.shape or ws.shape != (w.shape[1],):
        raise ExportError(f"int8 weight of {name} has shape {wq.shape}/{wq.dtype}, graph weight is "
                          f"{None if w is None else w.shape[::-1]}")
    ws = ws.astype(np.float32)
    if not np.all(np.isfinite(ws)) or np.any(ws <= 0):
        raise ExportError(f"weight scales of {name} must be finite and > 0")
    # the int8 tensor must be this layer's weight: round-to-nearest error <= scale / 2 where
    # the weight is inside the clipping range, saturated (+-127, same sign) where it is not
    wt = wq.T.astype(np.float32)
    inside = np.abs(w) <= QMAX * ws * (1 + 1e-6)
    err = np.abs(wt * ws - w)
    bad = (inside & (err > 0.5 * ws * (1 + 1e-3) + 1e-12)) | (~inside & (wt != QMAX * np.sign(w)))
    if np.any(bad):
        raise ExportError(f"int8 weight of {name} does not quantize its float weight "
                          f"({int(bad.sum())} of {bad.size} values off by more than half a step)")
    out = w.shape[1]
    dq = gs.Variable(f"{name}.weight_dequantized", dtype=np.float32)
    graph.nodes.append(gs.Node("DequantizeLinear", f"{name}.weight_dq", attrs={"axis": 1}, inputs=[
        gs.Constant(f"{name}.weight_quantized", np.ascontiguousarray(wq.T)),
        gs.Constant(f"{name}.weight_scale", ws),
        gs.Constant(f"{name}.weight_zero_point", np.zeros(out, dtype=np.int8)),
    ], outputs=[dq]))
    node.inputs[1] = dq
