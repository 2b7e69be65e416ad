"""compress as verbs: one factorisation serves every budget, a saved plan re-applies, the public API."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import compress
from compress import CompressError, allocate, apply_, collect, factorise, load_plan, run
from compress.pipeline import prepare

from .conftest import TINY_VIT


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_public_name_exists():
    assert all(hasattr(compress, n) for n in compress.__all__)
    assert callable(compress.allocate) and callable(compress.factorise)


def test_verbs_chain_to_the_pipeline_model(tiny_config):
    cfg = tiny_config(comp_rank=0, seq_refit=False, recon_steps=0, sensitivity_images=0, quant=False)
    prep = prepare(cfg)
    stats = collect(prep.model, prep.loader)
    factors = factorise(prep.model, stats, cfg.method)
    plan = allocate(factors, cfg.ratio, granule=cfg.granule)
    lowrank = copy.deepcopy(prep.model)
    pairs = apply_(lowrank, factors, plan)
    res = run(cfg)
    assert plan.rank_map == res.plan.rank_map and set(pairs) == {n for n, r in plan.rank_map.items() if r}
    for k, v in _weights(res.model).items():
        torch.testing.assert_close(v, lowrank.state_dict()[k], rtol=0, atol=0, msg=k)


def test_reuse_serves_another_budget_exactly_like_a_fresh_run(tiny_config, tmp_path):
    first = run(tiny_config(ratio=0.2, out=str(tmp_path / "a")))
    again = run(tiny_config(ratio=0.4, out=str(tmp_path / "b")), reuse=first.prepared)
    fresh = run(tiny_config(ratio=0.4, out=str(tmp_path / "c")))
    assert again.prepared.factors is first.prepared.factors          # no second SVD
    assert again.manifest["calibration"]["stats_from_cache"] and not fresh.manifest["calibration"]["stats_from_cache"]
    assert again.plan == fresh.plan
    for k, v in _weights(fresh.model).items():
        torch.testing.assert_close(again.model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    other = run(tiny_config(ratio=0.4, method="plain", out=str(tmp_path / "d")), reuse=first.prepared)
    assert other.prepared.stats is first.prepared.stats and other.prepared.factors.method == "plain"


def test_a_saved_plan_is_reapplied(tiny_config, tmp_path):
    src = run(tiny_config(ratio=0.35, allocation="uniform", out=str(tmp_path / "src")))
    res = run(tiny_config(ratio=None, plan=str(src.out), out=str(tmp_path / "again")))
    assert res.plan == src.plan and res.manifest["plan"] == src.manifest["plan"]
    assert load_plan(src.out / "manifest.json") == src.plan
    for k, v in _weights(src.model).items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_a_plan_of_another_model_is_refused_before_the_statistics(tiny_config, tmp_path):
    src = run(tiny_config(out=str(tmp_path / "src")))
    wider = dict(TINY_VIT, embed_dim=96, num_heads=2)
    with pytest.raises(CompressError, match="another model"):
        run(tiny_config(ratio=None, plan=str(src.out), model_kwargs=wider, out=str(tmp_path / "x")))
    with pytest.raises(CompressError, match="--comp-rank 8"):
        run(tiny_config(ratio=None, plan=str(src.out), comp_rank=0, out=str(tmp_path / "y")))
    with pytest.raises(CompressError, match="no plan at"):
        dataclasses.replace(tiny_config(), ratio=None, plan=str(tmp_path / "none")).budget


def test_an_unknown_recon_params_is_refused_with_the_choices(tiny_config):
    with pytest.raises(CompressError, match="--recon-params 'all'.*factors or block"):
        tiny_config(recon_params="all")
