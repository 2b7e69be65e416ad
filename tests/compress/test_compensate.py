import copy

import pytest
import torch

from compress.compensate import compensate_, fit_compensation, sequential_error
from compress.lowrank import LowRankLinear, replace_module_
from compress.models import compressible_layers
from compress.svd import factorise


def problem(n=24, m=20, tokens=800, noise=0.1, seed=0):
    """Original inputs X, drifted inputs X~ (what a compressed network feeds), W, and rank-6 A B."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    X = scales[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    drift = torch.eye(n, dtype=torch.float64) + noise * torch.randn(n, n, generator=g, dtype=torch.float64)
    Xt = drift @ X + 0.01 * torch.randn(n, tokens, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    A, B = factorise(W, X @ X.T, "whiten").factors(6)
    return W, X, Xt, A.double(), B.double()


def direct_error(W, X, Xt, M):
    return float(((W @ X - M @ Xt) ** 2).sum() / ((W @ X) ** 2).sum())


def test_fit_strictly_reduces_the_sequential_error_it_targets():
    W, X, Xt, A, B = problem()
    C, Ct, D = X @ X.T, Xt @ Xt.T, X @ Xt.T
    G, Y, info = fit_compensation(W, A, B, C, Ct, D, 4, steps=100)
    assert G.shape == (20, 4) and Y.shape == (24, 4)
    before = direct_error(W, X, Xt, A @ B)
    after = direct_error(W, X, Xt, A @ B + G.double() @ Y.double().T)
    # the Gram-form bookkeeping equals the error computed from the activations themselves
    assert info.error_before == pytest.approx(before, rel=1e-8)
    assert info.error_after == pytest.approx(after, rel=1e-4)
    assert after < 0.9 * before
    assert info.error_after <= info.error_init <= info.error_before


def test_fit_reaches_the_independent_reduced_rank_optimum():
    W, X, Xt, A, B = problem(seed=1)
    q = 3
    _, _, info = fit_compensation(W, A, B, X @ X.T, Xt @ Xt.T, X @ Xt.T, q, steps=50, damping=1e-10)
    # independent: the best rank-q D X~ approximating T = W X - A B X~ is the rank-q SVD
    # truncation of T projected on the row space of X~
    T = W @ X - A @ B @ Xt
    Q, _ = torch.linalg.qr(Xt.T)                     # orthonormal basis of the row space of X~
    TP = T @ Q @ Q.T
    U, S, Vh = torch.linalg.svd(TP, full_matrices=False)
    best = T - (U[:, :q] * S[:q]) @ Vh[:q]
    optimum = float((best**2).sum() / ((W @ X) ** 2).sum())
    assert info.error_after == pytest.approx(optimum, rel=1e-5)


def test_sequential_error_of_zero_compensation_is_the_svd_error():
    W, X, Xt, A, B = problem(seed=2)
    e = sequential_error(W, A, B, X @ X.T, Xt @ Xt.T, X @ Xt.T)
    assert e == pytest.approx(direct_error(W, X, Xt, A @ B), rel=1e-8)


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_cifar_ref", pretrained=False, depth=3, embed_dim=32, num_heads=2).eval()


def test_sequential_pass_on_a_vit_reduces_every_layer_and_matches_activations():
    dense = _tiny_vit()
    layers = compressible_layers(dense)
    images = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    # Grams of the dense network's inputs
    grams = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for n, l in layers.items()}

    def gram_hook(name):
        def hook(_mod, inp):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            grams[name].add_(x.T @ x)
        return hook

    hooks = [l.register_forward_pre_hook(gram_hook(n)) for n, l in layers.items()]
    with torch.no_grad():
        for x in images:
            dense(x)
    for h in hooks:
        h.remove()
    compressed = copy.deepcopy(dense)
    factors = {}
    for n, l in layers.items():
        A, B = factorise(l.weight, grams[n], "whiten").factors(8)
        factors[n] = (A, B, l.bias.detach().clone())
        replace_module_(compressed, n, LowRankLinear.from_factors(A, B, l.bias.detach()))
    infos = compensate_(dense, compressed, factors, grams, 4, images, steps=20)
    assert set(infos) == set(layers)
    for n, info in infos.items():
        assert info.error_after < info.error_before, n
        mod = compressed.get_submodule(n)
        assert isinstance(mod, LowRankLinear) and (mod.rank, mod.comp_rank) == (8, 4)
    # recompute the first layer of the last block from real activations: its input X~ comes
    # from the earlier, final blocks, exactly as during the pass
    name = "blocks.2.attn.qkv"
    got = {}

    def grab(key):
        def hook(_mod, inp):
            got.setdefault(key, []).append(inp[0])
        return hook

    h1 = dense.get_submodule(name).register_forward_pre_hook(grab("x"))
    h2 = compressed.get_submodule(name).register_forward_pre_hook(grab("xt"))
    with torch.no_grad():
        for x in images:
            dense(x)
            compressed(x)
    h1.remove()
    h2.remove()
    X = torch.cat([t.reshape(-1, 32) for t in got["x"]]).double().T
    Xt = torch.cat([t.reshape(-1, 32) for t in got["xt"]]).double().T
    W = dense.get_submodule(name).weight.detach().double()
    A, B, _ = factors[name]
    M_after = compressed.get_submodule(name).dense_weight().detach().double()
    assert direct_error(W, X, Xt, A.double() @ B.double()) == pytest.approx(infos[name].error_before, rel=1e-4)
    assert direct_error(W, X, Xt, M_after) == pytest.approx(infos[name].error_after, rel=1e-3)


def test_pipeline_compensation_on_a_subset_of_images(tiny_config):
    from compress.pipeline import run

    m = run(tiny_config(num_calib=16, comp_images=8, quant=False)).manifest
    assert m["calibration"]["comp_images"] == 8 and m["calibration"]["images"] == 16
    factorised = [l for l in m["layers"].values() if not l["dense"]]
    assert factorised and all(l["error_seq_after"] < l["error_seq_before"] for l in factorised)



def test_comp_damping_is_a_ridge_that_shrinks_the_correction():
    """--comp-damping: a larger ridge gives a smaller correction G Y^T and a larger fitting error
    (the trade that keeps a fit on few images from chasing low-variance directions)."""
    W, X, Xt, A, B = problem(n=24, tokens=40, noise=0.3, seed=5)
    C, Ct, D = X @ X.T, Xt @ Xt.T, X @ Xt.T
    norms, errors = [], []
    for damping in (1e-6, 1e-2, 1e0, 1e2):
        G, Y, info = fit_compensation(W, A, B, C, Ct, D, 4, steps=0, damping=damping)
        norms.append(float((G.double() @ Y.double().T).norm()))
        errors.append(info.error_after)
    assert norms == sorted(norms, reverse=True) and norms[-1] < 0.2 * norms[0]
    assert errors == sorted(errors) and errors[-1] <= info.error_before


def test_config_checks_comp_damping():
    from compress.errors import CompressError
    from compress.pipeline import Config

    with pytest.raises(CompressError, match="--comp-damping"):
        Config(model="vit_cifar_ref", out="x", ratio=0.5, comp_damping=-1.0)
