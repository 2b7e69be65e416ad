import torch
from torch import nn

from compress.lowrank import LowRankLinear, lowrank_layers, replace_module_


def test_forward_is_the_two_matmuls_by_hand():
    g = torch.Generator().manual_seed(0)
    m, n, r, q = 12, 10, 3, 2
    A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    G, Y = torch.randn(m, q, generator=g), torch.randn(n, q, generator=g)
    b = torch.randn(m, generator=g)
    mod = LowRankLinear.from_factors(A, B, b, G, Y)
    assert (mod.rank, mod.comp_rank, mod.num_params) == (r, q, (r + q) * (m + n) + m)
    x = torch.randn(4, 7, n, generator=g)
    by_hand = (x @ B.T) @ A.T + (x @ Y) @ G.T + b
    torch.testing.assert_close(mod(x), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.dense_weight(), A @ B + G @ Y.T, rtol=1e-5, atol=1e-5)


def test_compressed_vit_layer_output_by_hand(tiny_config):
    """In the pipeline's compressed model every factorised layer computes (x B^T) A^T + (x Y) G^T + b."""
    from compress.pipeline import run

    result = run(tiny_config(quant=False))
    model = result.model
    lr = lowrank_layers(model)
    assert lr, "the plan factorised nothing"
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
             for n, m in lr.items()]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    for name, mod in lr.items():
        x, out = seen[name]
        r, q = mod.rank, mod.comp_rank
        B, Yt = mod.first.weight[:r], mod.first.weight[r:]
        A, G = mod.second.weight[:, :r], mod.second.weight[:, r:]
        by_hand = (x @ B.T) @ A.T + (x @ Yt.T) @ G.T + mod.second.bias
        torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-5)
        assert result.manifest["layers"][name]["rank"] == r and result.manifest["layers"][name]["comp_rank"] == q


def test_replace_and_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 3)))
    replace_module_(model, "1.0", LowRankLinear(4, 3, 2))
    assert list(lowrank_layers(model)) == ["1.0"]
    assert model(torch.randn(2, 4)).shape == (2, 3)
