"""PyTorch module -> plain ONNX graph: input "input" (N,3,H,W), output "logits", dynamic batch.

Uses torch's torch.export-based ("dynamo") exporter, the default since torch 2.9: it emits a
clean graph (no Constant/Identity clutter, attention as MatMul/Softmax, weights already
transposed into MatMul layout, about half the nodes of the TorchScript exporter on a ViT)
and is the exporter torch keeps maintaining. It translates natively at opset 18; lower
targets are converted with ONNX's version converter, as torch itself would do.
"""
from __future__ import annotations

import re

from .errors import ExportError

# Imported inside functions (onnx, torch): `import export` stays free of onnx and torch for runtime's
# device side (tests/runtime/test_cli.py).

MIN_OPSET = 17       # LayerNormalization is one op from opset 17 on (METHOD.md §6)
EXPORTER_OPSET = 18  # the opset torch's exporter translates to without conversion
INPUT_NAME, OUTPUT_NAME, BATCH_DIM = "input", "logits", "batch"


def check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than this onnx {onnx.__version__} knows (<= {newest})")
    return opset


def export_onnx(model, input_size: tuple[int, int, int], opset: int = MIN_OPSET, device: str = "cpu"):
    """Trace ``model`` (eval mode) to an onnx.ModelProto with a dynamic batch axis."""
    import onnx
    import torch

    check_opset(opset)
    model = model.eval().to(device)
    example = torch.zeros(2, *input_size, device=device)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=65536)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, verbose=False, optimize=True,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=max(opset, EXPORTER_OPSET), dynamic_shapes=({0: batch},))
    except torch.onnx.OnnxExporterError as e:
        raise ExportError(_one_line(e)) from None
    proto = program.model_proto
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    if opset < EXPORTER_OPSET:
        proto = convert_down(proto, opset)
    _strip_metadata(proto)
    check_standard_ops(proto)
    onnx.checker.check_model(proto)
    return proto


_HIDDEN = "vit_edge.unchanged"   # a domain the version converter leaves alone


def convert_down(proto, opset: int):
    """ONNX's version converter from the exporter's opset 18 down to ``opset``.

    It has no adapter for two ops that Swin (Pad) and EVA (Split) export as: a Pad without the
    ``axes`` input means the same at opset 13-17, and a Split into ``num_outputs`` equal parts is
    opset 13's Split without ``split``. Those nodes are hidden from the converter and restored in
    their lower-opset form (Split only when its axis divides evenly); anything else it cannot
    convert is a one-line ExportError naming the op and the opset that works.
    """
    import onnx

    shapes = {}
    if any(n.op_type == "Split" for n in proto.graph.node):
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    hidden = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Pad" and len(node.input) <= 3:
            hidden.append(node)
        elif node.op_type == "Split" and len(node.input) == 1 and _equal_split(node, shapes):
            hidden.append(node)
    for node in hidden:
        node.domain = _HIDDEN
    proto.opset_import.append(onnx.helper.make_opsetid(_HIDDEN, 1))
    try:
        out = onnx.version_converter.convert_version(proto, opset)
    except RuntimeError as e:
        m = re.search(r"for (\w+)", str(e))
        what = m.group(1) if m else "an op"
        raise ExportError(f"opset {opset}: ONNX's version converter cannot convert {what} from opset "
                          f"{EXPORTER_OPSET}; export with --opset {EXPORTER_OPSET}") from None
    finally:
        for node in hidden:
            node.domain = ""
        del proto.opset_import[-1]
    for node in out.graph.node:
        _drop_default_noop_(node, opset)
        if node.domain == _HIDDEN:
            node.domain = ""
            if node.op_type == "Split":
                keep = [a for a in node.attribute if a.name != "num_outputs"]
                del node.attribute[:]
                node.attribute.extend(keep)
    keep = [o for o in out.opset_import if o.domain != _HIDDEN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _drop_default_noop_(node, opset: int) -> None:
    """The converter turns opset-18 Reduce* ops' axes input back into an attribute but keeps their
    ``noop_with_empty_axes``, which ReduceMean/Max/... do not have below 18; at 0 (its default, the
    only value that matches the lower opset) it is dropped."""
    import onnx

    if node.domain not in ("", "ai.onnx") or not node.op_type.startswith("Reduce"):
        return
    if "noop_with_empty_axes" in onnx.defs.get_schema(node.op_type, opset).attributes:
        return
    keep = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)


def _equal_split(node, shapes) -> bool:
    """A Split into ``num_outputs`` parts of one size (what opset 13's Split does without ``split``)."""
    attrs = {a.name: a for a in node.attribute}
    if "num_outputs" not in attrs:
        return False
    n = attrs["num_outputs"].i
    axis = attrs["axis"].i if "axis" in attrs else 0
    shape = shapes.get(node.input[0])
    if not shape:
        return False
    dim = shape[axis]
    return dim is not None and dim % n == 0


def check_standard_ops(proto) -> None:
    """Every node must be a standard ai.onnx op: contrib/custom domains do not reach TensorRT."""
    odd = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if odd:
        raise ExportError(f"unsupported op(s) {', '.join(odd)}: only standard ONNX ops can be exported")


def _strip_metadata(proto) -> None:
    """Drop exporter stack traces and FX dumps (local paths, megabytes on big models)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for coll in (proto.graph.input, proto.graph.output, proto.graph.initializer, proto.graph.value_info):
        for item in coll:
            del item.metadata_props[:]


def _one_line(err: Exception) -> str:
    text = str(err)
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if m:
        return f"unsupported op {m.group(1)}: torch's ONNX exporter has no translation for it"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith("<class")), lines[0] if lines else type(err).__name__)
    return f"ONNX export failed: {detail[:300]}"
