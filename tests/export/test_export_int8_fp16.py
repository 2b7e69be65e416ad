"""*.int8-fp16.onnx, the TensorRT INT8 file: the same Q/DQ and int8 weights as *.int8.onnx, float16
everywhere else (LayerNorm islands in fp32), opset >= 19, and the fake-quant model's logits."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.quantize import apply_fake_quant_, remove_fake_quant_
from export.errors import ExportError
from export.fp16 import FP16_TINY, QDQ_FP16_OPSET, to_fp16
from export.parity import TOLERANCES, check_parity
from export.stats import quantized_tensors

STEMS = ["model", "dense"]


def _inits(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _run(model, x, name="input"):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # Q/DQ as float ops: the graph's meaning
    model = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


@pytest.mark.parametrize("stem", STEMS)
def test_same_quantization_as_the_int8_file_in_half_precision(tiny_onnx, stem):
    int8, h = onnx.load(tiny_onnx[f"{stem}.int8.onnx"]), onnx.load(tiny_onnx[f"{stem}.int8-fp16.onnx"])
    assert h.opset_import[0].version == QDQ_FP16_OPSET and int8.opset_import[0].version == 17
    assert quantized_tensors(h) == quantized_tensors(int8)          # the same tensors pass through Q/DQ
    a, b = _inits(int8), _inits(h)
    for name, q in a.items():
        if q.dtype == np.int8:                                      # int8 weights and zero points, bit for bit
            np.testing.assert_array_equal(b[name], q)
        if name.endswith("_scale"):                                 # every Q/DQ scale: float16 of the fp32 one
            assert b[name].dtype == np.float16 and b[name].shape == q.shape
            np.testing.assert_array_equal(b[name], np.maximum(q, FP16_TINY).astype(np.float16))
    # float32 is left only in the LayerNorm islands (their scale/bias) and at the float32 interface
    ln = [n for n in h.graph.node if n.op_type == "LayerNormalization"]
    ln_params = {i for n in ln for i in n.input[1:]}
    assert ln and [k for k, v in b.items() if v.dtype == np.float32 and k not in ln_params] == []
    assert h.graph.input[0].type.tensor_type.elem_type == h.graph.output[0].type.tensor_type.elem_type == \
        TensorProto.FLOAT
    # typed like TensorRT's strongly typed network will type it: every MatMul and every DQ output is
    # float16 (INT8 GEMMs, FP16 elsewhere), every Q input float16
    inferred = onnx.shape_inference.infer_shapes(h, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({k: helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in b.items()})
    for n in h.graph.node:
        if n.op_type in ("MatMul", "Softmax", "Erf", "Conv"):
            assert {types[i] for i in n.input} == {TensorProto.FLOAT16}, n.name
        if n.op_type == "DequantizeLinear":
            assert types[n.output[0]] == TensorProto.FLOAT16, n.name
        if n.op_type == "QuantizeLinear":
            assert types[n.input[0]] == TensorProto.FLOAT16 and types[n.output[0]] == TensorProto.INT8, n.name


@pytest.mark.parametrize("stem", STEMS)
def test_matches_the_fake_quant_model_and_the_fp32_int8_file(tiny, tiny_onnx, cifar_batches, stem):
    model = tiny[stem]
    ranges = tiny["ranges" if stem == "model" else "dense_ranges"]
    apply_fake_quant_(model, ranges)
    try:
        r16 = check_parity(tiny_onnx[f"{stem}.int8-fp16.onnx"], model, cifar_batches, TOLERANCES["int8"])
        r32 = check_parity(tiny_onnx[f"{stem}.int8.onnx"], model, cifar_batches, TOLERANCES["int8"])
    finally:
        remove_fake_quant_(model)
    assert r16 and r16.images == 16, str(r16)
    x = np.concatenate(cifar_batches)
    y16, y32 = _run(tiny_onnx[f"{stem}.int8-fp16.onnx"], x), _run(tiny_onnx[f"{stem}.int8.onnx"], x)
    assert y16.dtype == np.float32 and y16.shape == (16, 10)
    # FP16 elsewhere moves the logits a little (not silently float32), far less than INT8 itself does
    assert 0 < np.abs(y16 - y32).max() < 0.5 * TOLERANCES["int8"].atol * r32.logit_scale
    assert np.mean(y16.argmax(1) == y32.argmax(1)) >= 0.9


def _dq_matmul_graph(q: np.ndarray, scale: np.ndarray, opset: int):
    """x [N, 4] -> MatMul with DequantizeLinear(int8 weight [4, m], per-column scale) -> y."""
    m = q.shape[1]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=1),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"),
             numpy_helper.from_array(np.zeros(m, np.int8), "Wz")]
    g = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_scales_below_the_fp16_normal_range_are_raised_and_their_weights_requantized():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(4, 3)).astype(np.int8)
    q[0] = 127
    scale = np.array([1e-2, 2e-6, 0.0], np.float32)   # normal; would underflow to a subnormal; to zero
    scale[2] = 1e-9
    half = to_fp16(_dq_matmul_graph(q, scale, QDQ_FP16_OPSET))
    onnx.checker.check_model(half)
    b = _inits(half)
    assert b["Ws"].dtype == np.float16 and b["Ws"][0] == np.float16(1e-2)
    assert list(b["Ws"][1:]) == [np.float16(FP16_TINY)] * 2
    np.testing.assert_array_equal(b["Wq"][:, 0], q[:, 0])        # a normal channel is left alone
    np.testing.assert_array_equal(b["Wq"][:, 1:], np.round(q[:, 1:] * (scale[1:] / FP16_TINY)).astype(np.int8))
    w = q.astype(np.float64) * scale
    w16 = b["Wq"].astype(np.float64) * b["Ws"].astype(np.float64)
    assert np.abs(w16 - w)[:, 1:].max() <= FP16_TINY / 2 + 1e-12  # re-quantized: half a (raised) step
    x = rng.standard_normal((2, 4)).astype(np.float32)
    y = _run(half, x, "x")
    assert np.isfinite(y).all() and np.abs(y - x @ w).max() < 2e-3 * np.abs(x @ w).max() + 1e-4


def test_a_qdq_graph_below_opset_19_is_refused():
    q, s = np.ones((4, 2), np.int8), np.full(2, 0.1, np.float32)
    with pytest.raises(ExportError, match="needs opset >= 19"):
        to_fp16(_dq_matmul_graph(q, s, 17))


def test_fp16_gauge_makes_pair_scales_normal_and_keeps_every_product():
    """A pair whose first factor has float16-subnormal row scales (small rows for large inputs) gets a
    power of two moved into it from the second factor: int8 values untouched, the float graph's output
    unchanged, the QDQ graph built from both equal to float rounding."""
    from export.fp16 import fp16_gauge
    from export.qdq import QuantizedLinear, insert_qdq

    rng = np.random.default_rng(0)
    f1 = (rng.standard_normal((8, 16)) * 1e-4).astype(np.float32)
    f1[0] = 0                                             # an all-zero row: its floor scale is ignored
    f2 = rng.standard_normal((12, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["h"], name="l.first"),
             helper.make_node("MatMul", ["h", "w2"], ["logits"], name="l.second")]
    g = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4, 12])],
                          [numpy_helper.from_array(f1.T.copy(), "w1"), numpy_helper.from_array(f2.T.copy(), "w2")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    def int8(w):
        s = np.maximum(np.abs(w).max(1), 1e-12) / 127
        return np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8), s.astype(np.float32)

    x = (rng.standard_normal((4, 16)) * 50).astype(np.float32)
    (w1, s1), (w2, s2) = int8(f1), int8(f2)
    assert s1[1:].max() < FP16_TINY
    q = QuantizedLinear("l", float(np.abs(x).max()), float(np.abs(x @ f1.T).max()),
                        {"l.first": (w1, s1), "l.second": (w2, s2)})
    gauged, (g,) = fp16_gauge(proto, [q])
    (g1, t1), (g2, t2) = g.weights["l.first"], g.weights["l.second"]
    assert g1 is w1 and g2 is w2 and g.input_amax == q.input_amax
    assert t1[1:].min() >= FP16_TINY and t2.min() >= FP16_TINY
    c = t1[1] / s1[1]
    assert c == 2.0 ** round(np.log2(c)) and c > 1          # an exact power of two
    np.testing.assert_allclose(g.mid_amax, q.mid_amax * c)
    np.testing.assert_array_equal(t2 * c, s2)
    np.testing.assert_allclose(_run(gauged, x), _run(proto, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_run(insert_qdq(gauged, [g]), x), _run(insert_qdq(proto, [q]), x), rtol=1e-5, atol=1e-6)
    dense = QuantizedLinear("d", 1.0, None, {"d": (w2, s2)})
    assert fp16_gauge(proto, [dense])[1] == [dense]       # plain layers and healthy pairs are left alone
