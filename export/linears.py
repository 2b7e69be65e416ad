"""Find every nn.Linear of the PyTorch model in the exported graph and give it one canonical form.

Canonical form of a Linear named L (weight W, m x n):
    MatMul "L" (x, "L.weight" = Wᵀ [n, m])  ->  tensor "L.out"  [-> Add "L.bias_add" (+ "L.bias")]
so a compressed layer (LowRankLinear) is exactly
    MatMul "L.first" (x, [Bᵀ Y]  [n, r+q]) -> "L.first.out" -> MatMul "L.second" ([A G]ᵀ [r+q, m]) -> + b
(METHOD.md §4, §6: the compensation is folded into one pair of rank r+q, and A·B never
appears as a product of two constants). Linears are found by value (the exporter names
transposed weights arbitrarily), so this works for any exporter; Gemm is rewritten to
MatMul + Add so every Linear, dense or factor, has the same layout for the QDQ and FP16 passes.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict, deque
from dataclasses import dataclass

import numpy as np

from .errors import ExportError
from .gsutil import const_value, to_proto

# Imported inside functions (torch, onnx_graphsurgeon): `import export` stays free of onnx and torch for runtime's
# device side (tests/runtime/test_cli.py).

log = logging.getLogger(__name__)

WEIGHT_OPS = ("MatMul", "Gemm", "Einsum")


@dataclass(frozen=True)
class LinearWeights:
    """One nn.Linear as the graph must hold it: weight [out, in] and optional bias, float32."""
    weight: np.ndarray
    bias: np.ndarray | None = None


@dataclass(frozen=True)
class Pair:
    """A low-rank pair found in a graph: x -> MatMul(n x w) -> MatMul(w x m)."""
    layer: str
    first: str
    second: str
    in_features: int
    width: int
    out_features: int


def linear_weights(model) -> dict[str, LinearWeights]:
    """Every nn.Linear of ``model`` by qualified name, in module order (factors included)."""
    from torch import nn

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().float().cpu().numpy()
            b = None if mod.bias is None else mod.bias.detach().float().cpu().numpy()
            out[name] = LinearWeights(np.ascontiguousarray(w), b)
    return out


def _key(arr: np.ndarray) -> tuple:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr.shape, hashlib.sha1(arr.tobytes()).hexdigest()


def _weight_of(node) -> np.ndarray | None:
    """The [in, out] constant weight of a MatMul / plain Gemm, or None."""
    if node.op == "MatMul" and len(node.inputs) == 2:
        w = const_value(node.inputs[1])
    elif node.op == "Gemm" and len(node.inputs) >= 2:
        a = node.attrs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        w = const_value(node.inputs[1])
        if w is not None and a.get("transB", 0):
            w = w.T
    else:
        return None
    return w if w is not None and w.ndim == 2 and w.dtype == np.float32 else None


def canonicalize_linears(proto, linears: dict[str, LinearWeights]):
    """Rename/rewrite the graph's Linears to the canonical form; returns (proto, names found)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.toposort()
    index: dict[tuple, deque] = defaultdict(deque)
    for name, lw in linears.items():
        index[_key(lw.weight.T)].append(name)
    outputs = {t.name for t in graph.outputs}
    found: list[str] = []
    for node in list(graph.nodes):
        w = _weight_of(node)
        if w is None or not index.get(_key(w)):
            continue
        name = index[_key(w)].popleft()  # identical weights: module order == graph order
        lw = linears[name]
        weight = gs.Constant(f"{name}.weight", np.ascontiguousarray(lw.weight.T))
        if node.op == "Gemm":
            node = _gemm_to_matmul(graph, node, name, weight)
        else:
            node.inputs[1] = weight
        node.name = name
        out = node.outputs[0]
        if out.name not in outputs:
            out.name = f"{name}.out"
        if lw.bias is not None:
            _name_bias(node, name, lw.bias)
        found.append(name)
    missing = [n for n in linears if n not in found]
    if missing:
        log.info("Linears not in the graph (unused in forward?): %s", ", ".join(missing))
    return to_proto(graph, proto), found


def _gemm_to_matmul(graph, gemm, name, weight):
    import onnx_graphsurgeon as gs

    x, result = gemm.inputs[0], gemm.outputs[0]
    bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    gemm.inputs.clear()
    gemm.outputs.clear()
    if bias is None:
        mm = gs.Node("MatMul", name, inputs=[x, weight], outputs=[result])
        graph.nodes.append(mm)
        return mm
    mid = gs.Variable(f"{name}.out", dtype=np.float32)
    mm = gs.Node("MatMul", name, inputs=[x, weight], outputs=[mid])
    add = gs.Node("Add", f"{name}.bias_add", inputs=[mid, bias], outputs=[result])
    graph.nodes.extend([mm, add])
    return mm


def _name_bias(node, name, bias) -> None:
    import onnx_graphsurgeon as gs

    for cons in node.outputs[0].outputs:
        if cons.op != "Add" or len(cons.inputs) != 2:
            continue
        j = 1 if cons.inputs[0] is node.outputs[0] else 0
        val = const_value(cons.inputs[j])
        if val is not None and val.shape == bias.shape and np.array_equal(val, bias):
            cons.name = f"{name}.bias_add"
            if cons.inputs[j].name != f"{name}.bias":   # else already it (the exporter may share an
                cons.inputs[j] = gs.Constant(f"{name}.bias", np.ascontiguousarray(bias))  # all-zero one)
            return
    # an all-zero bias (random init) is legitimately optimised away by the exporter
    (log.debug if not np.any(bias) else log.warning)("bias of %s was not found as an Add after its MatMul", name)


def constant_tensors(graph_proto) -> set[str]:
    """Tensors that do not depend on any graph input (what an optimizer may precompute)."""
    const = {i.name for i in graph_proto.initializer}
    for node in graph_proto.node:  # ONNX graphs are topologically sorted
        ins = [i for i in node.input if i]
        if all(i in const for i in ins):
            const.update(o for o in node.output if o)
    return const


def foldable_products(proto) -> list[str]:
    """MatMul/Gemm/Einsum nodes whose operands are all constants: a refolded dense weight."""
    const = constant_tensors(proto.graph)
    return [n.name or n.output[0] for n in proto.graph.node
            if n.op_type in WEIGHT_OPS and all(i in const for i in n.input if i)]


def find_pairs(proto) -> list[Pair]:
    """Low-rank pairs by structure: MatMul with constant weight whose output (through an optional
    Q/DQ or Cast) feeds only another MatMul with constant weight. Works on fp32/int8/fp16 files."""
    g = proto.graph
    const = constant_tensors(g)
    shapes = _const_shapes(g)
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    pairs = []
    for n1 in g.node:
        if n1.op_type != "MatMul" or n1.input[1] not in const or n1.input[0] in const:
            continue
        t = n1.output[0]
        nxt = consumers.get(t, [])
        while len(nxt) == 1 and nxt[0].op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            t = nxt[0].output[0]
            nxt = consumers.get(t, [])
        if len(nxt) != 1 or nxt[0].op_type != "MatMul" or nxt[0].input[0] != t:
            continue
        n2 = nxt[0]
        if n2.input[1] not in const:
            continue
        s1, s2 = shapes.get(n1.input[1]), shapes.get(n2.input[1])
        if s1 is None or s2 is None or s1[1] != s2[0]:
            continue
        layer = n1.name[: -len(".first")] if n1.name.endswith(".first") else n1.name
        pairs.append(Pair(layer, n1.name, n2.name, s1[0], s1[1], s2[1]))
    return pairs


def _const_shapes(g) -> dict[str, tuple[int, ...]]:
    """Shapes of initializers and of the tensors derived from one by DQ/Cast/Identity."""
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    for n in g.node:
        if n.op_type in ("DequantizeLinear", "Cast", "Identity") and n.input and n.input[0] in shapes:
            shapes[n.output[0]] = shapes[n.input[0]]
    return shapes


def check_pairs(proto, expected: dict[str, tuple[int, int, int]], constant_linears=()) -> list[Pair]:
    """Every compressed layer L -> (in, r+q, out) must be exactly the pair L.first -> L.second.
    ``constant_linears``: Linears that multiply a constant table by design (Swin-v2's position-bias
    MLP, compress.models.excluded_linears); their constant products are not refolded factors."""
    pairs = {p.layer: p for p in find_pairs(proto)}
    for layer, (n, w, m) in expected.items():
        p = pairs.get(layer)
        if p is None or (p.first, p.second) != (f"{layer}.first", f"{layer}.second"):
            raise ExportError(f"{layer} is not exported as a pair of MatMuls {layer}.first -> {layer}.second")
        if (p.in_features, p.width, p.out_features) != (n, w, m):
            raise ExportError(f"{layer}: exported pair is {p.in_features}x{p.width}x{p.out_features}, "
                              f"expected {n}x{w}x{m}")
    folded = [n for n in foldable_products(proto) if n not in set(constant_linears)]
    if folded:
        raise ExportError(f"constant products an optimizer would fold into dense weights: {', '.join(folded[:5])}")
    return [pairs[k] for k in expected]
