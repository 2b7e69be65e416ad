"""The compress stage as verbs over plain data, each usable on its own (``compress.pipeline.run``
is their short composition)::

    stats   = collect(model, images)                    # one pass: Grams, sums, ranges, dense outputs
    factors = factorise(model, stats, "whiten")         # one SVD per layer: every rank's error curve
    plan    = allocate(factors, Budget("ratio", 0.5))   # rank map under a budget (plain, JSON-able)
    pairs   = apply_(lowrank, factors, plan)            # the plan's Linears -> LowRankLinear pairs
    ranges, _ = calibrate_(lowrank, batches)            # INT8: balance the pairs, activation ranges
    with fake_quant(lowrank, ranges): ...               # the INT8 model, simulated in PyTorch

One ``factors`` serves every budget (sweeps, fits and studies allocate and apply it again and
again); a saved plan (``manifest["plan"]``, ``load_plan``) is applied like a fresh one.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from torch import nn

from calibration_data import ImageSet, make_loader

from . import stats as _stats
from .allocate import Budget, LayerCurve, Plan
from .allocate import allocate as _allocate
from .errors import CompressError
from .lowrank import LowRankLinear, replace_module_
from .models import compressible_layers, count_params
from .quantize import apply_fake_quant_, balance_and_calibrate_, remove_fake_quant_
from .svd import DEFAULT_DAMPING, Factorization
from .svd import factorise as _factorise_layer

__all__ = ["Factors", "allocate", "apply_", "break_even_rank", "calibrate_", "check_plan", "collect", "factorise",
           "fake_quant", "load_plan"]


@dataclass(frozen=True)
class Factors:
    """Every compressible layer's factorisation for one method on one set of statistics.

    ``layers[name]`` holds the factors up to the layer's break-even rank and its whole error
    curve; ``shapes[name]`` is (out, in, has bias); ``params`` counts the whole dense model.
    """
    method: str
    layers: dict[str, Factorization]
    shapes: dict[str, tuple[int, int, bool]]
    params: int
    stats_key: str = ""
    tokens: dict[str, int] = field(default_factory=dict)   # tokens per image at each layer (latency tables)

    def curves(self) -> list[LayerCurve]:
        return [LayerCurve(n, m, k, b, tuple(self.layers[n].curve.tolist()), tokens=self.tokens.get(n, 0))
                for n, (m, k, b) in self.shapes.items()]


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose pair (r (m + n) parameters) is smaller than the dense m x n matrix."""
    return max(1, min(m, n, (m * n - 1) // (m + n)))


def _batches(model: nn.Module, images, batch_size: int):
    """A DataLoader for an ImageSet (the model's preprocessing), anything else as given (batches)."""
    return make_loader(images, model, batch_size=batch_size) if isinstance(images, ImageSet) else images


def collect(model: nn.Module, images, *, batch_size: int = 32, device: str = "cpu", include_head: bool = False,
            histogram: bool = False, precision: str = "float64", cache_dir: str | Path | None = None,
            key: str = "") -> _stats.Stats:
    """Calibration statistics of ``model``'s compressible layers on ``images`` (an ImageSet or batches).

    ``histogram`` keeps |x| histograms (percentile ranges); with ``cache_dir`` and a ``key``
    (stats.cache_key) an earlier identical pass is read back instead of recomputed.
    """
    layers = compressible_layers(model, include_head)
    loader = _batches(model, images, batch_size)
    total = len(loader) if hasattr(loader, "__len__") else None
    return _stats.cached_collect(cache_dir if key else None, key, lambda: _stats.collect(
        model, layers, loader, device, total=total, histogram=histogram, precision=precision))


def factorise(model: nn.Module, stats: _stats.Stats, method: str = "whiten", *, alpha: float = 0.5,
              damping: float = DEFAULT_DAMPING, include_head: bool = False) -> Factors:
    """One SVD per compressible layer of ``model`` against its statistics (float64), up to break-even."""
    layers = compressible_layers(model, include_head)
    missing = [n for n in layers if n not in stats.layers]
    if missing:
        raise CompressError(f"the statistics lack layer {missing[0]}; collect them on this model")
    facts = {}
    for name, lin in layers.items():
        s = stats.layers[name]
        facts[name] = _factorise_layer(lin.weight.detach().cpu(), s.gram, method, mean_abs=s.mean_abs,
                                       mean_input=s.mean, alpha=alpha, damping=damping,
                                       keep=break_even_rank(lin.out_features, lin.in_features), name=name)
    shapes = {n: (l.out_features, l.in_features, l.bias is not None) for n, l in layers.items()}
    tokens = {n: stats.layers[n].count // max(stats.images, 1) for n in layers}
    return Factors(method, facts, shapes, count_params(model), stats.key, tokens)


def allocate(factors: Factors, budget: Budget | float, *, granule: int = 8, comp_rank: int = 0,
             allocation: str = "mixed", curves: list[LayerCurve] | None = None, latency=None) -> Plan:
    """The rank plan of ``factors`` under ``budget`` (a Budget, or a float: the ratio of parameters
    to remove); ``curves`` replaces the factors' own error curves (e.g. sensitivity-weighted);
    ``latency`` (compress.latency.LatencyTarget) adds the latency break-even and budget."""
    budget = budget if isinstance(budget, Budget) else Budget("ratio", float(budget))
    return _allocate(factors.curves() if curves is None else curves, factors.params, budget, granule=granule,
                     comp_rank=comp_rank, allocation=allocation, method=factors.method, latency=latency)


def check_plan(plan: Plan, shapes: dict[str, tuple[int, int, bool]], params: int) -> None:
    """A plan fits a model of these layer shapes (name -> out, in, bias) and parameter count."""
    have = {lp.name: (lp.out_features, lp.in_features, lp.bias) for lp in plan.layers}
    if have != shapes or plan.params_before != params:
        odd = sorted(set(have.items()) ^ set(shapes.items()))
        raise CompressError("the plan was made for another model (" + (f"layer {odd[0][0]} differs" if odd else
                            f"{plan.params_before:,} vs {params:,} parameters")
                            + "); pass a plan saved for this model")
    for lp in plan.layers:
        if not lp.dense and not 1 <= lp.rank <= lp.width <= break_even_rank(lp.out_features, lp.in_features):
            raise CompressError(f"the plan's rank {lp.rank} of {lp.name} is outside 1..break-even; "
                                "pass a plan saved for this model")


def apply_(model: nn.Module, factors: Factors, plan: Plan, device: str = "cpu") -> dict[str, tuple]:
    """Replace every factorised layer of ``plan`` in ``model`` by its rank-r SVD pair, in place.

    Returns name -> (A, B, bias) of the pairs, what the compensation and refinement start from.
    """
    check_plan(plan, factors.shapes, factors.params)
    pairs = {}
    for lp in plan.layers:
        if lp.dense:
            continue
        A, B = factors.layers[lp.name].factors(lp.rank)
        bias = model.get_submodule(lp.name).bias
        pairs[lp.name] = (A, B, None if bias is None else bias.detach().cpu().clone())
        replace_module_(model, lp.name, LowRankLinear.from_factors(A, B, pairs[lp.name][2]).to(device))
    return pairs


def load_plan(path: str | Path) -> Plan:
    """The rank plan of a compressed directory, its manifest.json, or a plan JSON (Plan.to_dict)."""
    p = Path(path).expanduser()
    p = p / "manifest.json" if p.is_dir() else p
    try:
        doc = json.loads(p.read_text())
        return Plan.from_dict(doc.get("plan", doc))
    except FileNotFoundError:
        raise CompressError(f"no plan at {p}; pass a compressed directory, its manifest.json or a plan JSON") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressError(f"{p} holds no readable rank plan ({type(e).__name__}: {e}); "
                            "pass a compressed directory, its manifest.json or a plan JSON") from None


calibrate_ = balance_and_calibrate_   # INT8: balance each pair, then calibrate the activation ranges


@contextlib.contextmanager
def fake_quant(model: nn.Module, ranges: dict[str, dict], weights: bool = True) -> Iterator[nn.Module]:
    """``model`` with INT8 fake quantization (weights per channel, activations per tensor at
    ``ranges``) inside the block; the float model again after it."""
    apply_fake_quant_(model, ranges, weights=weights)
    try:
        yield model
    finally:
        remove_fake_quant_(model)
