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
        proto = onnx.version_converter.convert_version(proto, opset)
    _strip_metadata(proto)
    check_standard_ops(proto)
    onnx.checker.check_model(proto)
    return proto


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
