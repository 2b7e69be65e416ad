"""What an exported ONNX file holds: size, ops, initializer bytes by dtype, low-rank pairs, Q/DQ."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path


def initializer_bytes(proto) -> dict[str, int]:
    """Bytes of initializers by element type name (e.g. {"float32": ..., "int8": ...})."""
    import numpy as np
    from onnx import helper

    out: Counter = Counter()
    for init in proto.graph.initializer:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        out[dtype.name] += dtype.itemsize * math.prod(init.dims)
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

    from .linears import find_pairs

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
