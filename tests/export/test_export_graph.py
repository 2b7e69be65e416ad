"""Graph structure of the fp32/fp16 exports: pairs, names, no refold, bytes, dynamic batch."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from export_testlib import expected_pairs
from export.errors import ExportError
from export.linears import check_pairs, find_pairs, foldable_products
from export.stats import initializer_bytes


def _inits(proto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _ort_optimized(path, tmp_path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


def test_every_compressed_linear_is_one_named_pair(tiny, tiny_onnx):
    model, proto = tiny["model"], onnx.load(tiny_onnx["model.onnx"])
    expected = expected_pairs(model)
    assert len(expected) == 7  # 8 block Linears, one left dense
    pairs = {p.layer: p for p in find_pairs(proto)}
    assert set(pairs) == set(expected)
    inits = _inits(proto)
    nodes = {n.name: n for n in proto.graph.node}
    for layer, (n, w, m) in expected.items():
        p = pairs[layer]
        assert (p.in_features, p.width, p.out_features) == (n, w, m)
        mod = model.get_submodule(layer)
        # names map back to the PyTorch factors; values are the factors (MatMul layout = Wᵀ)
        np.testing.assert_array_equal(inits[f"{layer}.first.weight"], mod.first.weight.detach().numpy().T)
        np.testing.assert_array_equal(inits[f"{layer}.second.weight"], mod.second.weight.detach().numpy().T)
        np.testing.assert_array_equal(inits[f"{layer}.second.bias"], mod.second.bias.detach().numpy())
        assert nodes[f"{layer}.first"].op_type == nodes[f"{layer}.second"].op_type == "MatMul"
        assert nodes[f"{layer}.second"].input[0] == nodes[f"{layer}.first"].output[0]
        assert nodes[f"{layer}.second.bias_add"].op_type == "Add"
    # the layer kept dense and the head are one MatMul each, no pair
    assert {"blocks.1.attn.proj", "head"} <= set(nodes) and "blocks.1.attn.proj" not in pairs


def test_dense_export_has_no_pairs_and_full_weights(tiny, tiny_onnx):
    proto = onnx.load(tiny_onnx["dense.onnx"])
    assert find_pairs(proto) == []
    inits = _inits(proto)
    w = tiny["dense"].get_submodule("blocks.0.mlp.fc1").weight.detach().numpy()
    np.testing.assert_array_equal(inits["blocks.0.mlp.fc1.weight"], w.T)


@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx"])
def test_no_dense_weight_reappears_after_ort_optimisation(tiny, tiny_onnx, tmp_path, name):
    opt = _ort_optimized(tiny_onnx[name], tmp_path)
    arrays = [numpy_helper.to_array(i).astype(np.float32) for i in opt.graph.initializer if len(i.dims) == 2]
    for layer, (n, w, m) in expected_pairs(tiny["model"]).items():
        mod = tiny["model"].get_submodule(layer)
        first = mod.first.weight.detach().numpy().T
        second = mod.second.weight.detach().numpy().T
        product = first @ second  # the dense n x m weight an optimizer could have folded
        tol = dict(rtol=1e-2, atol=1e-3)
        assert any(a.shape == first.shape and np.allclose(a, first, **tol) for a in arrays), layer
        assert any(a.shape == second.shape and np.allclose(a, second, **tol) for a in arrays), layer
        assert not any((a.shape == product.shape and np.allclose(a, product, **tol)) or
                       (a.shape == product.T.shape and np.allclose(a, product.T, **tol))
                       for a in arrays), f"{layer}: dense {m}x{n} weight refolded"
    assert foldable_products(opt) == []
    assert len(find_pairs(opt)) == len(expected_pairs(tiny["model"]))


def test_graphsurgeon_fold_constants_keeps_the_factors(tiny, tiny_onnx):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(tiny_onnx["model.onnx"]))
    folded = gs.export_onnx(graph.fold_constants().cleanup())
    assert {p.layer for p in find_pairs(folded)} == set(expected_pairs(tiny["model"]))


def test_float_weight_bytes_equal_the_compressed_parameter_count(tiny, tiny_onnx):
    for stem in ("model", "dense"):
        proto = onnx.load(tiny_onnx[f"{stem}.onnx"])
        params = sum(p.numel() for p in tiny[stem].parameters())
        tensors = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
        weights = sum(t.nbytes for t in tensors if t.size > 1)  # scalars: attention scale, GELU constants
        assert weights == 4 * params, stem
        assert initializer_bytes(proto)["float32"] - weights < 64
    m, d = onnx.load(tiny_onnx["model.onnx"]), onnx.load(tiny_onnx["dense.onnx"])
    assert initializer_bytes(m)["float32"] < initializer_bytes(d)["float32"]


def test_check_pairs_rejects_a_refolded_or_missing_pair(tiny, tiny_onnx):
    import onnx_graphsurgeon as gs

    proto = onnx.load(tiny_onnx["model.onnx"])
    expected = expected_pairs(tiny["model"])
    assert len(check_pairs(proto, expected)) == len(expected)
    with pytest.raises(ExportError, match="not exported as a pair"):
        check_pairs(proto, {**expected, "blocks.1.attn.proj": (64, 8, 64)})
    with pytest.raises(ExportError, match="expected 64x999x192"):
        check_pairs(proto, {"blocks.0.attn.qkv": (64, 999, 192)})
    # a graph that computes A·B from two constants is what an optimizer folds: refused
    graph = gs.import_onnx(proto)
    nodes = {n.name: n for n in graph.nodes}
    first, second = nodes["blocks.0.attn.qkv.first"], nodes["blocks.0.attn.qkv.second"]
    prod = gs.Variable("AB", dtype=np.float32)
    graph.nodes.append(gs.Node("MatMul", "AB", inputs=[first.inputs[1], second.inputs[1]], outputs=[prod]))
    second.inputs[1] = prod
    second.inputs[0] = first.inputs[0]
    bad = gs.export_onnx(graph.cleanup())
    assert foldable_products(bad) == ["AB"]
    with pytest.raises(ExportError):
        check_pairs(bad, {"blocks.0.attn.qkv": expected["blocks.0.attn.qkv"]})


def test_io_names_and_dynamic_batch(tiny_onnx, cifar_batches):
    x = np.concatenate(cifar_batches)
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx", "dense.onnx"):
        proto = onnx.load(tiny_onnx[name])
        assert [i.name for i in proto.graph.input] == ["input"]
        assert [o.name for o in proto.graph.output] == ["logits"]
        assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert proto.opset_import[0].version == 17
        sess = ort.InferenceSession(str(tiny_onnx[name]), providers=["CPUExecutionProvider"])
        for n in (1, 5):
            assert sess.run(None, {"input": x[:n]})[0].shape == (n, 10)


def test_fp16_keeps_layernorm_in_fp32_and_everything_else_in_half(tiny_onnx):
    proto = onnx.load(tiny_onnx["model.fp16.onnx"])
    inits = {i.name: i for i in proto.graph.initializer}
    produced = {o: n for n in proto.graph.node for o in n.output}
    lns = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 5
    for ln in lns:
        cast = produced[ln.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
        assert all(inits[i].data_type == onnx.TensorProto.FLOAT for i in ln.input[1:])
    ln_params = {i for n in lns for i in n.input[1:]}
    floats = [i.name for i in proto.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and i.name not in ln_params]
    assert floats == []
    assert inits["blocks.0.mlp.fc1.first.weight"].data_type == onnx.TensorProto.FLOAT16
    size16 = tiny_onnx["model.fp16.onnx"].stat().st_size
    assert size16 < 0.6 * tiny_onnx["model.onnx"].stat().st_size
