import logging

import pytest
import torch

from compress.errors import CompressError
from compress.svd import METHODS, damped_cholesky, factorise, output_error


def anisotropic(n=24, m=16, tokens=600, seed=0):
    """W (m x n) and inputs X (n x tokens) whose directions carry energies over 4 decades, rotated."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -4, n, dtype=torch.float64)
    X = Q @ (scales[:, None] * torch.randn(n, tokens, generator=g, dtype=torch.float64))
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, X


def stats_of(X):
    return dict(mean_abs=X.abs().mean(1), mean_input=X.mean(1))


def test_whitened_svd_reaches_the_exact_optimum():
    W, X = anisotropic()
    C = X @ X.T
    f = factorise(W, C, "whiten", damping=0.0, **stats_of(X))
    # independent optimum: the best rank-r approximation of the outputs Y = W X is Y_r =
    # U_r U_r^T Y (Eckart-Young), and it is reachable as (U_r U_r^T W) X, so
    # min_r ||(W - W')X||^2 = sum_{i>r} s_i(WX)^2.
    s = torch.linalg.svdvals(W @ X)
    total = float((s**2).sum())
    for r in (1, 3, 6, 10, 15):
        optimum = float((s[r:] ** 2).sum()) / total
        A, B = f.factors(r)
        achieved = output_error(W, A.double() @ B.double(), C)
        assert achieved == pytest.approx(optimum, rel=1e-4, abs=1e-9)
        assert f.error(r) == pytest.approx(optimum, rel=1e-4, abs=1e-9)


def test_whitened_beats_plain_by_a_large_margin():
    W, X = anisotropic()
    C = X @ X.T
    white = factorise(W, C, "whiten", **stats_of(X))
    plain = factorise(W, C, "plain", **stats_of(X))
    for r in (4, 8, 12):  # ~20x, ~150x, ~3000x on this data
        assert plain.error(r) > 10 * white.error(r)


@pytest.mark.parametrize("method", METHODS)
def test_curves_are_honest_monotone_and_complete(method):
    W, X = anisotropic(n=20, m=28, seed=1)
    C = X @ X.T
    f = factorise(W, C, method, **stats_of(X))
    curve = f.curve
    assert curve.shape == (21,)
    assert torch.isfinite(curve).all()
    assert curve[0] == pytest.approx(1.0, abs=1e-9)
    assert float(curve[-1]) == 0.0
    assert (curve[1:] <= curve[:-1]).all(), "error must not grow with rank"
    # the curve is the true output error of the method's own truncation, under the same C
    for r in (1, 5, 12, 19):
        A, B = f.factors(r)
        assert output_error(W, A.double() @ B.double(), C) == pytest.approx(f.error(r), rel=1e-4, abs=1e-8)


def test_whiten_is_never_worse_than_the_other_variants():
    W, X = anisotropic(seed=3)
    C = X @ X.T
    curves = {m: factorise(W, C, m, **stats_of(X)).curve for m in METHODS}
    for m in METHODS:
        assert (curves["whiten"] <= curves[m] + 1e-6).all()


def test_rank_deficient_gram_is_damped_without_nan(caplog):
    W, X = anisotropic(n=32, m=20, tokens=5)   # 5 tokens: Gram of rank 5 in 32 dimensions
    C = X @ X.T
    with caplog.at_level(logging.WARNING, logger="compress.svd"):
        f = factorise(W, C, "whiten", damping=0.0, name="deficient")
    assert "damping grown" in caplog.text
    assert f.damping > 0
    for t in (f.left, f.right, f.curve, f.sigma):
        assert torch.isfinite(t).all()
    # only 5 input directions exist, so rank 5 already reproduces the outputs
    assert f.error(5) < 1e-6
    A, B = f.factors(5)
    assert output_error(W, A.double() @ B.double(), C) < 1e-5


def test_zero_inputs_give_zero_error_not_nan():
    W = torch.randn(8, 6, dtype=torch.float64)
    f = factorise(W, torch.zeros(6, 6, dtype=torch.float64), "whiten")
    assert torch.isfinite(f.curve).all() and float(f.curve.abs().max()) == 0.0
    assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all()


def test_damped_cholesky_grows_and_reports_lambda():
    C = torch.zeros(4, 4, dtype=torch.float64)
    C[0, 0] = 2.0
    L, lam = damped_cholesky(C, 0.0)
    assert lam > 0 and torch.allclose(L @ L.T, C + lam * torch.eye(4, dtype=torch.float64))


def test_bad_inputs_raise_compress_error():
    W, X = anisotropic(n=6, m=4, tokens=50)
    with pytest.raises(CompressError, match="unknown method"):
        factorise(W, X @ X.T, "nope")
    C = X @ X.T
    C[0, 0] = float("nan")
    with pytest.raises(CompressError, match="non-finite"):
        factorise(W, C, "whiten")


def test_float32_gram_products_match_float64_on_real_activations():
    """--gram-precision float32 (float32 batch products, float64 sums) changes the curves negligibly."""
    import timm

    import compress  # noqa: F401
    from calibration_data import load_image_set, make_loader
    from compress.models import compressible_layers
    from compress.stats import collect

    torch.manual_seed(0)
    model = timm.create_model("vit_cifar_ref", pretrained=False, depth=1, embed_dim=64, num_heads=2).eval()
    loader = make_loader(load_image_set("cifar10-calib", num=16), model, batch_size=8)
    layers = list(compressible_layers(model))
    s64 = collect(model, layers, loader, precision="float64")
    s32 = collect(model, layers, loader, precision="float32")
    for n in layers:
        g64, g32 = s64.layers[n].gram, s32.layers[n].gram
        assert float((g32 - g64).abs().max() / g64.abs().max()) < 1e-5
        W = model.get_submodule(n).weight
        c64, c32 = factorise(W, g64).curve, factorise(W, g32).curve
        assert float((c64 - c32).abs().max()) < 1e-4
