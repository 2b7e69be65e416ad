"""INT8 QDQ layout: what is quantized, how (TensorRT explicit quantization), and file size."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compress.quantize import quantize_weight
from export.errors import ExportError
from export.pipeline import quantized_linears
from export.qdq import QuantizedLinear, insert_qdq
from export.stats import initializer_bytes, quantized_tensors


def _graph(path):
    proto = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    produced = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return proto, inits, produced, consumers


@pytest.mark.parametrize("stem", ["model", "dense"])
def test_exactly_the_linears_in_the_ranges_are_quantized(tiny, tiny_onnx, stem):
    proto, inits, produced, consumers = _graph(tiny_onnx[f"{stem}.int8.onnx"])
    ranges = tiny["ranges" if stem == "model" else "dense_ranges"]
    nodes = {n.name: n for n in proto.graph.node}
    want_acts, want_weights = set(), set()
    for layer, r in ranges.items():
        pair = f"{layer}.first" in nodes
        matmuls = [f"{layer}.first", f"{layer}.second"] if pair else [layer]
        want_weights |= {f"{m}.weight_quantized" for m in matmuls}
        entry = nodes[matmuls[0]]
        want_acts.add(produced[produced[entry.input[0]].input[0]].input[0])  # DQ <- Q <- x
        assert produced[entry.input[0]].op_type == "DequantizeLinear"
        scale = inits[f"{layer}.input_scale"]
        assert scale.shape == () and scale.dtype == np.float32
        assert scale == np.float32(r["input"] / 127)
        if pair:
            second = nodes[f"{layer}.second"]
            assert produced[second.input[0]].op_type == "DequantizeLinear"
            assert produced[produced[second.input[0]].input[0]].input[0] == f"{layer}.first.out"
            want_acts.add(f"{layer}.first.out")
            assert inits[f"{layer}.mid_scale"] == np.float32(r["mid"] / 127)
    got = quantized_tensors(proto)
    assert set(got["activations"]) == want_acts and len(got["activations"]) == len(want_acts)
    assert set(got["weights"]) == want_weights
    # everything else stays float: LayerNorm, Softmax, GELU (Erf), residual Adds, attention MatMuls
    dq_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    for n in proto.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Erf", "Add", "Mul", "Div", "Conv"):
            assert not set(n.input) & dq_outputs, n.name
        if n.op_type == "MatMul" and n.input[1] not in dq_outputs:  # q·kᵀ and attn·v
            assert n.input[0] not in dq_outputs, n.name


@pytest.mark.parametrize("stem", ["model", "dense"])
def test_tensorrt_layout_int8_weights_per_channel_zero_points_zero(tiny, tiny_onnx, stem):
    proto, inits, produced, consumers = _graph(tiny_onnx[f"{stem}.int8.onnx"])
    model = tiny[stem]
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":  # Q feeds exactly one DQ with the same scale/zero point
            (dq,) = consumers[n.output[0]]
            assert dq.op_type == "DequantizeLinear" and dq.input[1:] == n.input[1:]
            assert inits[n.input[2]].dtype == np.int8 and inits[n.input[2]] == 0
        if n.op_type != "DequantizeLinear":
            continue
        (user,) = consumers[n.output[0]]  # DQ directly into the MatMul it serves
        assert user.op_type == "MatMul"
        if n.input[0] not in inits:
            continue
        q, scale, zero = (inits[i] for i in n.input)
        axis = {a.name: a.i for a in n.attribute}.get("axis")
        assert q.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
        assert axis == 1 and scale.shape == zero.shape == (q.shape[1],) and scale.dtype == np.float32
        assert user.input[1] == n.output[0]
        w = model.get_submodule(user.name).weight.detach()
        q_ref, s_ref = quantize_weight(w)  # the compress stage's int8 weights, bit for bit
        np.testing.assert_array_equal(q, q_ref.numpy().T)
        np.testing.assert_array_equal(scale, s_ref.numpy())
    assert not [i.name for i in proto.graph.initializer
                if i.name.endswith(".weight") and i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]


def test_int8_file_is_smaller_by_the_expected_factor(tiny_onnx):
    for stem in ("model", "dense"):
        fp32, int8 = onnx.load(tiny_onnx[f"{stem}.onnx"]), onnx.load(tiny_onnx[f"{stem}.int8.onnx"])
        f_inits = {i.name: i for i in fp32.graph.initializer}
        expected = initializer_bytes(fp32)["float32"]
        for i in int8.graph.initializer:
            if i.name.endswith(".weight_quantized"):
                n, m = i.dims
                w = f_inits[i.name.replace(".weight_quantized", ".weight")]
                assert tuple(w.dims) == (n, m)
                expected -= 4 * n * m - 4 * m  # int8 values (counted below) + float32 scales
            elif i.name.endswith(("input_scale", "mid_scale")):
                expected += 4
        got = initializer_bytes(int8)
        assert got["float32"] == expected
        q_names = [i.name for i in int8.graph.initializer if i.name.endswith(".weight_quantized")]
        weights_int8 = sum(numpy_helper.to_array(i).size for i in int8.graph.initializer if i.name in q_names)
        weights_fp32 = sum(4 * np.prod(f_inits[n.replace("_quantized", "")].dims) for n in q_names)
        assert weights_fp32 == 4 * weights_int8  # quantized weights: exactly 1 byte instead of 4
        assert got["int8"] - weights_int8 < 0.05 * weights_int8  # + zero points (1 byte per channel)
        # the file is the initializers plus the graph; the graph grows only by the Q/DQ nodes
        size32 = tiny_onnx[f"{stem}.onnx"].stat().st_size
        size8 = tiny_onnx[f"{stem}.int8.onnx"].stat().st_size
        graph32 = size32 - sum(initializer_bytes(fp32).values())
        graph8 = size8 - sum(got.values())
        added = len(int8.graph.node) - len(fp32.graph.node)
        assert added > 0 and 0 < graph8 - graph32 < 600 * added, (stem, graph32, graph8, added)
        assert size8 < 0.65 * size32  # tiny model: the unquantized patch/pos embeddings dominate


def test_insert_qdq_refuses_wrong_weights_and_ranges(tiny, tiny_onnx):
    proto = onnx.load(tiny_onnx["model.onnx"])
    specs = quantized_linears(tiny["model"], tiny["ranges"])
    qkv = next(s for s in specs if s.layer == "blocks.0.attn.qkv")
    swapped = dict(qkv.weights)
    fc1 = quantized_linears(tiny["model"], {"blocks.0.mlp.fc1": tiny["ranges"]["blocks.0.mlp.fc1"]})[0]
    swapped["blocks.0.attn.qkv.first"] = fc1.weights["blocks.0.mlp.fc1.first"]  # same shape, other layer
    with pytest.raises(ExportError, match="does not quantize its float weight"):
        insert_qdq(proto, [QuantizedLinear(qkv.layer, qkv.input_amax, qkv.mid_amax, swapped)])
    with pytest.raises(ExportError, match="invalid activation range"):
        insert_qdq(proto, [QuantizedLinear(qkv.layer, float("nan"), qkv.mid_amax, qkv.weights)])
    with pytest.raises(ExportError, match="no 'mid' activation range"):
        insert_qdq(proto, [QuantizedLinear(qkv.layer, qkv.input_amax, None, qkv.weights)])
    with pytest.raises(ExportError, match="not a MatMul"):
        insert_qdq(proto, [QuantizedLinear("blocks.0.norm1", 1.0, None, {})])
