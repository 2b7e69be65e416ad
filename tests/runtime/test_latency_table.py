"""runtime.latency_table: one-layer graphs as the exporter lays them out, a measured table, and compress using it."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.latency import LatencyTarget, load_table
from runtime.latency_table import format_markdown, layer_graph, layer_shapes, measure_table, table_widths

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}  # as tests/runtime/conftest.py


def run(proto, x):
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


@pytest.mark.parametrize("width", [None, 16])
def test_layer_graph_computes_the_layer_and_quantizes_like_the_exporter(width):
    from onnx import numpy_helper

    x = np.random.default_rng(1).standard_normal((2, 5, 32)).astype(np.float32)
    proto = layer_graph(48, 32, 5, width, "fp32")
    w = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    ref = x
    for name in (["layer"] if width is None else ["layer.first", "layer.second"]):
        ref = ref @ w[f"{name}.weight"]
    ref = ref + w["layer.bias"]
    np.testing.assert_allclose(run(proto, x), ref, rtol=1e-4, atol=1e-5)
    q = layer_graph(48, 32, 5, width, "int8")
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DequantizeLinear") == (2 if width is None else 4)   # input + weights (+ mid)
    assert ops.count("QuantizeLinear") == (1 if width is None else 2)
    y8 = run(q, x)
    assert np.corrcoef(y8.ravel(), ref.ravel())[0, 1] > 0.99


def test_table_widths_stop_at_the_parameter_break_even():
    assert table_widths(384, 384, 16) == list(range(16, 193, 16))   # break-even 191 -> up to 192
    assert table_widths(64, 64, 8)[-1] == 32


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    import timm

    import compress.zoo  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_ref", pretrained=False, **TINY_VIT).eval()
    table = measure_table("vit_cifar_ref", model, "ort", threads=1, batches=(1,), step=16, warmup=1, repeats=2)
    return table, table.save(tmp_path_factory.mktemp("lt") / "table.json"), model


def test_measured_table_covers_every_layer_shape(tiny_table):
    table, path, model = tiny_table
    shapes = set(layer_shapes(model).values())
    assert shapes == {(192, 64, 65), (64, 64, 65), (256, 64, 65), (64, 256, 65)}
    for m, n, rows in shapes:
        for p in ("fp32", "int8"):
            e = table.entry(m, n, rows, p, 1)
            assert e.dense_ms > 0 and all(t > 0 for t in e.pair_ms) and e.widths == tuple(table_widths(m, n, 16))
    assert set(table.rest_ms) == {"fp32@1", "int8@1"} and table.dense_model_ms["int8@1"] > 0
    assert load_table(path) == table
    assert table.machine["cpu_flags"] and table.versions["onnxruntime"] == ort.__version__
    md = format_markdown(table)
    assert "| 256x64, 65 | int8 | 1 |" in md


def test_compress_with_the_table_records_predicted_latency(tiny_table, tiny_base_config, tmp_path):
    import dataclasses

    from compress.pipeline import run as compress_run

    measured, _, _ = tiny_table
    # the measured shapes with deterministic pair times (every pair faster than dense, slower with width):
    # the tiny graphs' timings are noise-dominated, and this test is about compress reading a table
    table = dataclasses.replace(measured, layers=tuple(dataclasses.replace(
        e, pair_ms=tuple(e.dense_ms * (0.2 + 0.5 * k / e.widths[-1]) for k in e.widths)) for e in measured.layers))
    path = table.save(tmp_path / "table.json")
    lt = LatencyTarget(table, "int8", 1)
    res = compress_run(tiny_base_config(out=str(tmp_path / "c"), latency_table=str(path), quant=False,
                                        seq_refit=False, recon_steps=0, heldout=0))
    lat = res.manifest["latency"]
    assert lat["precision"] == "int8" and lat["backend"] == "ort"
    for lp in res.plan.layers:   # every factorised width is one the table says is faster
        assert lp.dense or lp.width in lt.break_even(lp.out_features, lp.in_features, lp.tokens, [lp.width])
    assert lat["predicted_ms"]["1"] == pytest.approx(lt.predict(res.plan.layers))
    saved = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert saved["plan"]["latency"]["predicted_ms"] == lat["predicted_ms"]
    # a latency-only budget: met as predicted
    target = 0.5 * (lat["dense_predicted_ms"]["1"] + lt.rest_ms() + sum(
        min(lt.layer_states(l.out_features, l.in_features, l.tokens, [16])) for l in res.plan.layers))
    res2 = compress_run(tiny_base_config(out=str(tmp_path / "c2"), ratio=None, target_latency_ms=target,
                                         latency_table=str(path), quant=False, seq_refit=False, recon_steps=0,
                                         heldout=0))
    assert res2.manifest["latency"]["predicted_ms"]["1"] <= target + 1e-9
    assert res2.manifest["budget"]["kind"] == "latency"
