"""What an ONNX file holds: tensor bytes by dtype, ops, low-rank pairs, Q/DQ; the one place these
facts are computed (export's report and runtime.memory's OnnxStats both read them). onnx is
imported inside the functions: runtime's core imports this module on machines without it."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from .linears import find_pairs

_FOUR_BIT = ("int4", "uint4", "float4")


def tensor_bytes(tensor) -> tuple[str, int, int]:
    """(dtype name, bytes, elements) of a TensorProto from its dims, wherever its data lives."""
    import onnx

    count = math.prod(tensor.dims)
    if tensor.data_type == onnx.TensorProto.STRING:
        return "string", sum(len(s) for s in tensor.string_data), count
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if dtype.name.startswith(_FOUR_BIT):
        return dtype.name, (count + 1) // 2, count
    return dtype.name, count * dtype.itemsize, count


def graph_tensors(graph):
    """Initializers and Constant-node tensors of ``graph`` and of its subgraphs (If/Loop bodies)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graph_tensors(g)


def initializer_bytes(proto) -> dict[str, int]:
    """Bytes of the graph's initializers by element type name (e.g. {"float32": ..., "int8": ...})."""
    out: Counter = Counter()
    for init in proto.graph.initializer:
        dtype, nbytes, _ = tensor_bytes(init)
        out[dtype] += nbytes
    return dict(sorted(out.items()))


def quantized_tensors(proto) -> dict[str, list[str]]:
    """Names of the tensors that pass through Q/DQ: activations (Q inputs) and weights (DQ of an
    int8 initializer), and which nodes consume the dequantized tensors."""
    inits = {i.name for i in proto.graph.initializer}
    acts = [n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    weights = [n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return {"activations": acts, "weights": weights}


def graph_stats(path) -> dict:
    """Summary of one file for export_report.json."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    q = quantized_tensors(proto)
    return {
        "bytes": path.stat().st_size,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": len(proto.graph.node),
        "ops": dict(sorted(ops.items())),
        "initializers": len(proto.graph.initializer),
        "initializer_bytes": initializer_bytes(proto),
        "lowrank_pairs": len(find_pairs(proto)),
        "qdq": {"quantize_linear": ops.get("QuantizeLinear", 0),
                "dequantize_linear": ops.get("DequantizeLinear", 0),
                "quantized_activations": len(q["activations"]),
                "int8_weights": len(q["weights"])},
    }
