"""Sequential refit and block reconstruction, each validated on held-out images (compress/refine.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.lowrank import LowRankLinear, lowrank_layers, replace_module_
from compress.refine import RefineConfig, fit_sequential, output_cosine, refine_


def test_fit_sequential_is_the_reduced_rank_least_squares_optimum():
    """svd_r(T L) L^-1 is the best rank-r W' for ||W X - W' X~||: no other rank-r map does better,
    and it beats the plain whitened SVD (fitted on X) on the shifted inputs X~."""
    g = torch.Generator().manual_seed(0)
    m, n, N, r = 12, 10, 400, 3
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, n, dtype=torch.float64)[:, None]
    Xt = X + 0.3 * torch.randn(n, N, generator=g, dtype=torch.float64)    # the compressed prefix's inputs
    A, B = fit_sequential(W, Xt @ Xt.T, X @ Xt.T, r, damping=0.0)
    err = lambda M: float(((W @ X - M @ Xt) ** 2).sum())
    best = err(A.double() @ B.double())
    # brute check against the explicit solution: whitened SVD of the least-squares map in the X~ metric
    T = torch.linalg.lstsq(Xt.T, (W @ X).T).solution.T
    L = torch.linalg.cholesky(Xt @ Xt.T)
    U, S, Vh = torch.linalg.svd(T @ L)
    explicit = (U[:, :r] * S[:r]) @ Vh[:r] @ torch.linalg.inv(L)
    assert best == pytest.approx(err(explicit), rel=1e-4)
    A, B = A.double(), B.double()
    for _ in range(20):   # perturbed rank-r factors never do better
        dA = 1e-2 * torch.randn(m, r, generator=g, dtype=torch.float64)
        dB = 1e-2 * torch.randn(r, n, generator=g, dtype=torch.float64)
        assert err((A + dA) @ (B + dB)) >= best * (1 - 1e-6)
    from compress.svd import factorise
    f = factorise(W.float(), (X @ X.T), "whiten", damping=0.0)
    Aw, Bw = f.factors(r)
    assert best < err(Aw.double() @ Bw.double())


def _compressed_pair(rank=8, depth=2):
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("vit_cifar_ref", pretrained=False, depth=depth, embed_dim=64, num_heads=2).eval()
    comp = copy.deepcopy(dense)
    for name, mod in list(comp.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks."):
            U, S, Vh = torch.linalg.svd(mod.weight.detach(), full_matrices=False)
            replace_module_(comp, name, LowRankLinear.from_factors(U[:, :rank] * S[:rank], Vh[:rank], mod.bias.detach()))
    return dense, comp


def test_refinement_is_kept_only_where_held_out_images_say_it_pays():
    dense, comp = _compressed_pair()
    g = torch.Generator().manual_seed(1)
    fit = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    held = [torch.randn(8, 3, 32, 32, generator=g)]
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    report = refine_(dense, comp, fit, held, RefineConfig(seq=True, recon_steps=20, recon_batch=4))
    assert report["fit_images"] == 16 and report["heldout_images"] == 8
    for stage, info in report["blocks"].items():
        assert info["kept"] in ("plain", "seq", "recon", "seq+recon")
        errors = [info[k] for k in ("plain", "seq", "recon") if k in info]
        kept_error = info[info["kept"].split("+")[-1]] if info["kept"] != "plain" else info["plain"]
        assert kept_error == min(errors)        # the held-out best of the candidates tried
    after, plain = report["heldout_output_cosine_refined"], report["heldout_output_cosine_plain"]
    if report["kept"]:
        assert after["mean"] >= plain["mean"]
        assert any(not torch.equal(before[k], v) for k, v in comp.state_dict().items())
    else:   # reverted: exactly the plain factors
        assert all(torch.equal(before[k], v) for k, v in comp.state_dict().items())
    assert set(lowrank_layers(comp)) == {k for k in lowrank_layers(comp)}   # plan unchanged: same layers
    for name, mod in lowrank_layers(comp).items():
        assert mod.first.weight.shape[0] == 8


def test_a_refinement_that_hurts_end_to_end_is_reverted(monkeypatch):
    """Force every block to take a harmful candidate: the end-to-end held-out check restores the plain factors."""
    import compress.refine as refine

    dense, comp = _compressed_pair()
    plain = {k: v.clone() for k, v in comp.state_dict().items()}

    def harmful(dense_block, block, prefix, layers, inputs, ht, damping):
        block.harmed = True
        for mod in lowrank_layers(block).values():
            mod.second.weight.mul_(-3.0)
    monkeypatch.setattr(refine, "_seq_refit_", harmful)   # ... which a fooled block check accepts
    monkeypatch.setattr(refine, "_block_error", lambda block, hs, ts, readout=None: 0.0 if getattr(block, "harmed", False) else 1.0)
    g = torch.Generator().manual_seed(2)
    report = refine_(dense, comp, [torch.randn(4, 3, 32, 32, generator=g)], [torch.randn(4, 3, 32, 32, generator=g)],
                     RefineConfig(seq=True))
    assert report["kept"] is False
    assert report["heldout_output_cosine_refined"]["mean"] < report["heldout_output_cosine_plain"]["mean"]
    assert all(torch.equal(plain[k], v) for k, v in comp.state_dict().items())


def test_output_cosine_mean_and_min():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert output_cosine(a, b) == (pytest.approx(0.5), pytest.approx(0.0))


def test_pipeline_holds_out_images_and_records_the_refinement(tiny_config):
    from compress.pipeline import run

    res = run(tiny_config(comp_rank=0, seq_refit=True, recon_steps=4, heldout=8, quant=False))
    ref = res.manifest["refine"]
    assert ref["fit_images"] == 16 and ref["heldout_images"] == 8
    assert set(ref["blocks"]) == {"blocks.0", "blocks.1"}
    assert res.manifest["config"]["seq_refit"] is True and "refinement" in res.manifest["timings"]


def test_refinement_needs_held_out_images(tiny_config):
    from compress.errors import CompressError

    with pytest.raises(CompressError, match="held-out"):
        tiny_config(seq_refit=True, heldout=0)


def test_compensation_is_dropped_when_the_svd_at_full_width_does_better_on_held_out_images(tiny_config, monkeypatch):
    """The check compares with the whitened SVD at width r + q (same parameters) and keeps the better."""
    import compress.refine as refine
    from compress.pipeline import run

    res = run(tiny_config(comp_rank=8, heldout=8, quant=False))
    check = res.manifest["compensation_check"]
    better = check["heldout_cosine_compensated"]["mean"] >= check["heldout_cosine_svd_full_width"]["mean"]
    assert check["kept"] is better
    calls = iter([(0.5, 0.1), (0.9, 0.5)])     # compensated worse than the SVD at full width
    monkeypatch.setattr(refine, "heldout_cosine", lambda d, m, h: next(calls))
    res = run(tiny_config(comp_rank=8, heldout=8, quant=False, out=tiny_config().out + "2"))
    assert res.manifest["compensation_check"]["kept"] is False
    for name, mod in lowrank_layers(res.model).items():
        lp = next(l for l in res.manifest["plan"]["layers"] if l["name"] == name)
        assert mod.first.weight.shape[0] == lp["rank"] + lp["comp_rank"]


def test_recon_params_block_also_tunes_the_norms_and_factors_alone_leave_them():
    """``recon_params="factors"`` moves only the low-rank factors and their biases; "block" moves the
    block's norms too, and (more freedom, same data) reaches a held-out error no higher here."""
    dense, comp = _compressed_pair(rank=4, depth=1)
    g = torch.Generator().manual_seed(5)
    fit, held = [torch.randn(16, 3, 32, 32, generator=g)], [torch.randn(8, 3, 32, 32, generator=g)]
    norms = lambda m: torch.cat([p.detach().flatten() for n, p in m.named_parameters() if ".norm" in n])
    out = {}
    for params in ("factors", "block"):
        c = copy.deepcopy(comp)
        info = refine_(dense, c, fit, held, RefineConfig(seq=False, recon_steps=40, recon_batch=8,
                                                         recon_params=params))["blocks"]["blocks.0"]
        assert info["kept"] == "recon" and info["recon"] < info["plain"]
        out[params] = info["recon"], norms(c)
    assert torch.equal(out["factors"][1], norms(comp))
    assert not torch.equal(out["block"][1], norms(comp))
    assert out["block"][0] <= out["factors"][0] * 1.05
    with pytest.raises(ValueError, match="recon_params"):
        RefineConfig(recon_params="everything")


def test_readout_judges_the_last_block_on_what_the_head_reads():
    """With ``readout`` the last block's held-out errors are the relative error of the final features
    (norm, pooling: the CLS token), not of every output token; reconstruction then lowers that error."""
    from compress.models import features_and_logits

    dense, comp = _compressed_pair(rank=4, depth=1)
    g = torch.Generator().manual_seed(3)
    fit, held = [torch.randn(16, 3, 32, 32, generator=g)], [torch.randn(8, 3, 32, 32, generator=g)]
    with torch.no_grad():
        ref, ours = features_and_logits(dense, held[0])[0], features_and_logits(comp, held[0])[0]
    feature_error = float((ours - ref).double().pow(2).sum() / ref.double().pow(2).sum())
    reports = {}
    for readout in (False, True):
        c = copy.deepcopy(comp)
        reports[readout] = refine_(dense, c, fit, held, RefineConfig(seq=False, recon_steps=40, recon_batch=8,
                                                                    readout=readout))["blocks"]["blocks.0"]
    assert reports[True]["plain"] == pytest.approx(feature_error, rel=1e-5)
    assert reports[False]["plain"] != pytest.approx(feature_error, rel=1e-2)   # every token: another number
    assert reports[True]["kept"] == "recon" and reports[True]["recon"] < reports[True]["plain"]


def test_readout_weight_gives_the_pooled_features_that_share_of_the_tokens_energy():
    """Earlier stages with ``readout_weight`` w compare every token plus the pooled, normalised features
    scaled so that on the dense targets they weigh w times the tokens; the last stage only the features."""
    import timm

    from compress.refine import _readout

    torch.manual_seed(0)
    dense = timm.create_model("vit_cifar_ref", pretrained=False, depth=2, embed_dim=64, num_heads=2).eval()
    targets = [torch.randn(4, 65, 64) * 3, torch.randn(2, 65, 64)]
    tok = sum(float(t.double().pow(2).sum()) for t in targets)
    for w in (0.5, 2.0):
        r = _readout(dense, targets, last=False, cfg=RefineConfig(readout_weight=w))
        with torch.no_grad():
            out = [r(t) for t in targets]
        assert all(o.shape == (len(t), 65 * 64 + 64) for o, t in zip(out, targets))
        assert torch.equal(out[0][:, :65 * 64], targets[0].flatten(1))
        pooled = sum(float(o[:, 65 * 64:].double().pow(2).sum()) for o in out)
        assert pooled == pytest.approx(w * tok, rel=1e-5)
    assert _readout(dense, targets, last=False, cfg=RefineConfig()) is None
    last = _readout(dense, targets, last=True, cfg=RefineConfig(readout=True, readout_weight=1.0))
    with torch.no_grad():
        assert torch.equal(last(targets[1]), dense.forward_head(dense.norm(targets[1]), pre_logits=True))
