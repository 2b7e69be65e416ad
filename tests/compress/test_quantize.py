import copy

import pytest
import torch
from torch import nn

from compress.lowrank import LowRankLinear
from compress.quantize import (RangeObserver, apply_fake_quant_, balance_and_calibrate_, balance_lowrank_,
                               calibrate_activations, fake_quant_act, fake_quant_error, quantize_weight,
                               remove_fake_quant_)


def test_weight_quantization_is_symmetric_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g) * torch.logspace(-3, 1, 16)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (16,)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()      # half a step, per row
    q_neg, _ = quantize_weight(-w)
    assert torch.equal(q_neg, -q)                          # zero point 0


def test_activation_fake_quant_rounds_and_saturates():
    x = torch.linspace(-3, 3, 1001)
    y = fake_quant_act(x, amax=2.0)
    s = 2.0 / 127
    inside = x.abs() <= 2.0
    assert ((y - x).abs()[inside] <= s / 2 + 1e-6).all()
    assert float(y.max()) == pytest.approx(127 * s) and float(y.min()) == pytest.approx(-128 * s)


def test_range_observer_max_and_percentile_across_batches():
    o = RangeObserver()
    o.update(torch.zeros(10))
    o.update(torch.arange(0, 1000, dtype=torch.float32))          # bins laid out at max 999
    o.update(-torch.arange(1000, 10000, dtype=torch.float32))     # larger values extend the bins
    assert o.amax == 9999
    assert o.percentile(50) == pytest.approx(5000, abs=15)
    assert o.percentile(99) == pytest.approx(9900, abs=15)
    assert o.percentile(100) == 9999
    again = RangeObserver.from_state(o.state())
    assert again.percentile(90) == o.percentile(90)


def lowrank_pair(seed=0, unbalanced=True):
    g = torch.Generator().manual_seed(seed)
    n, m, r = 32, 24, 8
    A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) / n**0.5
    if unbalanced:  # intermediate channels spanning 4 decades, compensated in A
        d = torch.logspace(-2, 2, r)
        B, A = B * d[:, None], A / d[None, :]
    return LowRankLinear.from_factors(A, B, torch.randn(m, generator=g))


def test_balancing_preserves_fp32_output_and_reduces_int8_error():
    mod = lowrank_pair()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
    y = mod(x)
    model = nn.Sequential(mod)
    ranges = calibrate_activations(model, [x])
    err_before, _ = fake_quant_error(model, ranges, [x])
    balanced = copy.deepcopy(model)
    ranges_b, y_ref = balance_and_calibrate_(balanced, [x])
    torch.testing.assert_close(balanced(x), y, rtol=1e-5, atol=1e-5)   # gauge: float output unchanged
    torch.testing.assert_close(y_ref, y)
    # the analytic min-max update of the mid range equals a fresh calibration
    fresh = calibrate_activations(balanced, [x])
    assert ranges_b["0"]["mid"] == pytest.approx(fresh["0"]["mid"], rel=1e-5)
    assert ranges_b["0"]["input"] == fresh["0"]["input"]
    err_after, _ = fake_quant_error(balanced, ranges_b, [x])
    assert err_after.rel_error < 0.5 * err_before.rel_error


def test_balance_lowrank_direct():
    mod = lowrank_pair(seed=2)
    x = torch.randn(64, 32)
    y = mod(x)
    h = mod.first(x).abs().amax(0)
    d = balance_lowrank_(mod, h)
    torch.testing.assert_close(mod(x), y, rtol=1e-5, atol=1e-5)
    h2 = mod.first(x).abs().amax(0)
    w2 = mod.second.weight.abs().amax(0)
    torch.testing.assert_close(h2 / w2, (h2 / w2).mean().expand_as(h2), rtol=1e-4, atol=0)  # balanced ratios
    assert float(torch.log(d).mean()) == pytest.approx(0.0, abs=1e-9)


def test_fake_quant_on_a_vit_is_bounded_and_removable():
    import timm

    import compress  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_ref", pretrained=False, depth=2, embed_dim=64, num_heads=2).eval()
    from compress.lowrank import replace_module_

    lin = model.blocks[0].mlp.fc1
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    replace_module_(model, "blocks.0.mlp.fc1", LowRankLinear.from_factors(u[:, :16] * s[:16], vh[:16],
                                                                          lin.bias.detach()))
    x = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ranges = calibrate_activations(model, x)
    assert ranges["blocks.0.mlp.fc1"]["mid"] is not None and ranges["head"]["mid"] is None
    assert set(ranges) >= {"blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"}
    with torch.no_grad():
        y0 = model(x[0])
        apply_fake_quant_(model, ranges)
        yq = model(x[0])
        remove_fake_quant_(model)
        y1 = model(x[0])
    assert torch.equal(y0, y1)                      # fully removed, bit for bit
    rel = float((yq - y0).norm() / y0.norm())
    assert 0 < rel < 0.1


def test_pipeline_percentile_ranges_are_within_minmax(tiny_config, tmp_path):
    from compress.pipeline import run

    mm = run(tiny_config(out=str(tmp_path / "mm"))).manifest["quant"]
    pc = run(tiny_config(out=str(tmp_path / "pc"), quant_calib="percentile", percentile=99.0)).manifest["quant"]
    assert pc["calibration"] == "percentile 99.0"
    for name, r in pc["act_ranges"].items():
        assert 0 < r["input"] <= mm["act_ranges"][name]["input"] + 1e-6
    smaller = [n for n, r in pc["dense_act_ranges"].items() if r["input"] < mm["dense_act_ranges"][n]["input"]]
    assert smaller, "a 99th percentile should clip some layer's range"
