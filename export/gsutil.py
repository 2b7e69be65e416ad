"""Small onnx-graphsurgeon helpers shared by the graph passes (linears, qdq, fp16)."""
from __future__ import annotations

import numpy as np

# Imported inside functions (onnx_graphsurgeon): `import export` stays free of onnx and torch for runtime's
# device side (tests/runtime/test_cli.py).


def const_value(tensor) -> np.ndarray | None:
    """Value of a tensor that is an initializer, possibly behind Identity, a 2-D Transpose or a
    Constant node (the forms exporters use for weights); None for anything computed from inputs."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1:
        prod = tensor.inputs[0]
        if prod.op == "Identity":
            return const_value(prod.inputs[0])
        if prod.op == "Transpose" and list(prod.attrs.get("perm", [1, 0])) == [1, 0]:
            val = const_value(prod.inputs[0])
            return None if val is None or val.ndim != 2 else val.T
        if prod.op == "Constant" and "value" in prod.attrs:
            return np.asarray(prod.attrs["value"].values)
    return None


def replace_tensor(tensors, old, new) -> None:
    """Swap ``old`` for ``new`` in a node's inputs or outputs (gs lists refuse slice assignment)."""
    for i, t in enumerate(tensors):
        if t is old:
            tensors[i] = new


def to_proto(graph, like):
    """gs graph -> ModelProto (cleaned, topologically sorted), keeping ``like``'s IR version and producer."""
    import onnx_graphsurgeon as gs

    proto = gs.export_onnx(graph.cleanup().toposort())
    proto.ir_version = like.ir_version
    proto.producer_name, proto.producer_version = like.producer_name, like.producer_version
    return proto
