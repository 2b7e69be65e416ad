import json
import math

import numpy as np
import pytest

from compress.allocate import Budget, LayerCurve, Plan, allocate
from compress.errors import CompressError


def curve(full, decay):
    """e(r) = exp(-decay r) shaped curve from 1 to exactly 0 at full rank."""
    r = np.arange(full + 1)
    e = (np.exp(-decay * r) - np.exp(-decay * full)) / (1 - np.exp(-decay * full))
    return tuple(float(v) for v in e)


def synthetic_layers():
    """Layers of different shapes and very different sensitivities (known curves)."""
    specs = [("a.qkv", 384, 128, 0.08), ("a.proj", 128, 128, 0.01), ("a.fc1", 512, 128, 0.05),
             ("a.fc2", 128, 512, 0.005), ("b.qkv", 384, 128, 0.2), ("b.proj", 128, 128, 0.03),
             ("b.fc1", 512, 128, 0.02), ("b.fc2", 128, 512, 0.1)]
    return [LayerCurve(n, m, k, True, curve(min(m, k), d)) for n, m, k, d in specs]


OTHER = 50_000  # embeddings, norms, head: parameters outside the compressible layers


def total(layers):
    return OTHER + sum(l.dense_params for l in layers)


def available_steps(plan, granule):
    """Parameter increase of every single move up (one granule, or back to dense)."""
    steps = []
    for l in plan.layers:
        if l.dense:
            continue
        m, n = l.out_features, l.in_features
        k = l.width + granule
        up = m * n if k * (m + n) >= m * n else k * (m + n)
        steps.append(up - l.width * (m + n))
    return steps


@pytest.mark.parametrize("granule,comp", [(8, 0), (8, 8), (16, 8), (1, 0)])
@pytest.mark.parametrize("target", [150_000, 220_000, 300_000])
def test_budget_met_exactly_with_granules_and_break_even(granule, comp, target):
    layers = synthetic_layers()
    plan = allocate(layers, total(layers), Budget("params", target), granule=granule, comp_rank=comp)
    params = OTHER + sum((l.out_features * l.in_features if l.dense else l.width * (l.out_features + l.in_features))
                         + l.out_features for l in plan.layers)  # every layer has a bias here
    assert params == plan.params_after <= target
    # tight: no single move up fits in the slack that is left
    assert all(target - params < s for s in available_steps(plan, granule))
    for l in plan.layers:
        if l.dense:
            assert l.params == l.dense_params and l.comp_rank == 0
            continue
        m, n = l.out_features, l.in_features
        assert l.width % granule == 0 and l.rank >= 1 and l.comp_rank == comp
        assert l.width * (m + n) < m * n          # break-even respected
        assert l.predicted_error == pytest.approx(dict((x.name, x) for x in layers)[l.name].curve[l.rank])


def test_mixed_beats_uniform_on_known_curves():
    layers = synthetic_layers()
    for target in (150_000, 220_000, 300_000):
        mixed = allocate(layers, total(layers), Budget("params", target), allocation="mixed")
        uniform = allocate(layers, total(layers), Budget("params", target), allocation="uniform")
        assert uniform.params_after <= target and mixed.params_after <= target
        assert mixed.predicted_error < 0.8 * uniform.predicted_error
        ranks = {l.rank for l in uniform.layers if not l.dense}
        fracs = {l.rank / min(l.out_features, l.in_features) for l in uniform.layers if not l.dense}
        assert len(ranks) >= 1 and max(fracs) - min(fracs) <= 8 / 128 + 1e-9  # same fraction up to a granule


def test_greedy_matches_brute_force_on_a_small_case():
    layers = [LayerCurve("x", 64, 32, False, curve(32, 0.3)), LayerCurve("y", 32, 64, False, curve(32, 0.05)),
              LayerCurve("z", 48, 48, False, curve(48, 0.12))]
    tot = sum(l.dense_params for l in layers)
    target = tot // 2
    plan = allocate(layers, tot, Budget("params", target), granule=4)
    best = math.inf
    opts = []
    for l in layers:
        m, n = l.out_features, l.in_features
        ks = [0] + [k for k in range(4, min(m, n) + 1, 4) if k * (m + n) < m * n]
        opts.append([(m * n, 0.0) if k == 0 else (k * (m + n), l.curve[k]) for k in ks])
    for a in opts[0]:
        for b in opts[1]:
            for c in opts[2]:
                if a[0] + b[0] + c[0] <= target:
                    best = min(best, a[1] + b[1] + c[1])
    assert plan.predicted_error <= best * 1.05 + 1e-12


def test_budget_kinds():
    layers = synthetic_layers()
    t = total(layers)
    p = allocate(layers, t, Budget("ratio", 0.5))
    assert p.params_after <= math.floor(t * 0.5) and p.ratio >= 0.5
    p = allocate(layers, t, Budget("mb", 1.0))       # 1 MB of float32 = 250,000 parameters
    assert p.target_params == 250_000 and p.params_after <= 250_000


def test_impossible_and_invalid_budgets():
    layers = synthetic_layers()
    t = total(layers)
    with pytest.raises(CompressError, match="smallest width"):
        allocate(layers, t, Budget("ratio", 0.9), granule=8, comp_rank=8)
    with pytest.raises(CompressError, match="not below"):
        allocate(layers, t, Budget("params", t + 1))
    for bad in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(CompressError):
            Budget("ratio", bad)
    with pytest.raises(CompressError):
        Budget("params", 0)
    with pytest.raises(CompressError, match="allocation"):
        allocate(layers, t, Budget("ratio", 0.3), allocation="random")


def test_plan_is_json_round_trippable():
    layers = synthetic_layers()
    plan = allocate(layers, total(layers), Budget("ratio", 0.4), comp_rank=8)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert again.rank_map == plan.rank_map
