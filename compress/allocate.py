"""Rank allocation under a parameter budget (METHOD.md §1, §3): ``mixed`` (greedy) or ``uniform``.

Every compressible layer is either dense (m n + bias parameters) or factorised at width
k = r + q (k (m + n) + bias parameters: r SVD ranks plus q compensation ranks, METHOD.md §4).
Widths are multiples of the granule g, so both matrices of a pair have aligned shapes;
the smallest width leaves r >= 1 (k = g * ceil((q + 1) / g)), the largest is the biggest
multiple of g with k (m + n) < m n (break-even: a layer not beaten stays dense). The
predicted error of a factorised layer is e(r) = e(k - q) from its curve: what the SVD part
alone delivers (compensation can only lower it, and its gain is measured separately).

``mixed`` minimises sum_l e_l: starting from the dense model it repeatedly takes, over all
layers, the move with the smallest increase of error per parameter saved (looking ahead
over all smaller widths of a layer, so a non-convex curve does not stall the greedy) until
the budget is met, then raises widths back while they still fit, largest error decrease
per parameter first, and finally trades parameters between pairs of layers while that
lowers the total error (a local search that repairs the greedy's knapsack rounding).
Result: never above the budget, and the slack left is smaller than any single remaining step (one granule of one layer, or a layer's dense/break-even jump,
which is at most one granule step by construction).
``uniform`` gives every layer the same rank fraction of min(m, n) (rounded down to the
granule), the largest fraction that fits the budget: the baseline mixed must beat.

With a latency table (compress.latency.LatencyTarget) a layer's widths are further limited to
those whose pair is measured faster than its dense layer on the target (the latency break-even),
and ``--target-latency-ms`` is a budget of its own, alone or with a parameter budget
(``_greedy_two_budgets``); the plan then records its predicted latency.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .errors import CompressError

ALLOCATIONS = ("mixed", "uniform")
BYTES_PER_PARAM = 4  # --size-mb counts float32 parameters, 1 MB = 10^6 bytes


@dataclass(frozen=True)
class Budget:
    """How much to remove: ``ratio`` of all model params, or a target ``params`` count or ``mb``."""
    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in ("ratio", "params", "mb", "latency"):
            raise CompressError(f"unknown budget kind {self.kind!r}")
        if not math.isfinite(self.value):
            raise CompressError(f"budget must be a finite number, got {self.value}")
        if self.kind == "ratio" and not 0 < self.value < 1:
            raise CompressError(f"--ratio is the fraction of parameters to remove and must be in (0, 1), "
                                f"got {self.value}")
        if self.kind != "ratio" and self.value <= 0:
            flag = {"params": "params", "mb": "size-mb", "latency": "target-latency-ms"}[self.kind]
            raise CompressError(f"--{flag} must be positive, got {self.value}")

    def target(self, total_params: int) -> int:
        """The largest allowed parameter count of the whole compressed model."""
        if self.kind == "ratio":
            return int(math.floor(total_params * (1.0 - self.value)))
        if self.kind == "params":
            return int(self.value)
        if self.kind == "latency":   # a latency-only budget: no parameter constraint (compress.latency)
            return total_params
        return int(math.floor(self.value * 1e6 / BYTES_PER_PARAM))

    def describe(self) -> str:
        return {"ratio": f"remove {self.value:.1%} of all parameters",
                "params": f"at most {int(self.value):,} parameters",
                "mb": f"at most {self.value:g} MB of float32 parameters",
                "latency": f"at most {self.value:g} ms predicted latency"}[self.kind]


@dataclass(frozen=True)
class LayerCurve:
    """What allocation needs to know about one layer: shape, bias, error curve e(r), r = 0..min(m,n)."""
    name: str
    out_features: int
    in_features: int
    bias: bool
    curve: tuple[float, ...]
    tokens: int = 0        # input rows per image (what a latency table is keyed by; 0: unknown)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class LayerPlan:
    name: str
    out_features: int
    in_features: int
    bias: bool
    rank: int              # SVD rank r; 0 means the layer stays dense
    comp_rank: int         # q (0 when dense or compensation is off)
    params: int
    dense_params: int
    predicted_error: float
    tokens: int = 0

    @property
    def dense(self) -> bool:
        return self.rank == 0

    @property
    def width(self) -> int:
        return self.rank + self.comp_rank


@dataclass(frozen=True)
class Plan:
    """The rank map and its bookkeeping: plain data, JSON round-trippable (to_dict/from_dict)."""
    method: str
    allocation: str
    budget: Budget
    target_params: int
    granule: int
    comp_rank: int
    params_before: int           # whole model
    params_after: int
    layers: tuple[LayerPlan, ...]
    latency: dict | None = None  # the latency target and predicted ms per batch (compress.latency)

    @property
    def rank_map(self) -> dict[str, int]:
        return {l.name: l.rank for l in self.layers}

    @property
    def compressible_before(self) -> int:
        return sum(l.dense_params for l in self.layers)

    @property
    def compressible_after(self) -> int:
        return sum(l.params for l in self.layers)

    @property
    def ratio(self) -> float:
        """Parameters removed / parameters of the whole original model."""
        return 1.0 - self.params_after / self.params_before

    @property
    def compressible_ratio(self) -> float:
        return 1.0 - self.compressible_after / self.compressible_before

    @property
    def predicted_error(self) -> float:
        return sum(l.predicted_error for l in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(l) for l in self.layers]
        d.update(compressible_before=self.compressible_before, compressible_after=self.compressible_after,
                 ratio=self.ratio, compressible_ratio=self.compressible_ratio,
                 predicted_error=self.predicted_error)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        fields = {k: d[k] for k in ("method", "allocation", "target_params", "granule", "comp_rank",
                                    "params_before", "params_after")}
        return cls(budget=Budget(**d["budget"]), layers=tuple(LayerPlan(**l) for l in d["layers"]),
                   latency=d.get("latency"), **fields)


@dataclass(frozen=True)
class _Options:
    """States of one layer, most parameters first: index 0 = dense, then widths k_max .. k_min."""
    widths: np.ndarray   # 0 for dense
    params: np.ndarray
    errors: np.ndarray


def _options(layer: LayerCurve, granule: int, comp_rank: int) -> _Options:
    m, n, b = layer.out_features, layer.in_features, (layer.out_features if layer.bias else 0)
    full = min(m, n)
    k_min = granule * math.ceil((comp_rank + 1) / granule)
    k_max = min(full, (m * n - 1) // (m + n)) // granule * granule  # k (m + n) < m n
    widths = [0] + list(range(k_max, k_min - 1, -granule))
    curve = layer.curve
    if len(curve) < full + 1:
        raise ValueError(f"{layer.name}: curve has {len(curve)} points, needs {full + 1}")
    errors = [0.0] + [float(curve[k - comp_rank]) for k in widths[1:]]
    params = [m * n + b] + [k * (m + n) + b for k in widths[1:]]
    return _Options(np.array(widths), np.array(params, dtype=np.int64), np.array(errors))


def allocate(layers: Sequence[LayerCurve], total_params: int, budget: Budget, *, granule: int = 8,
             comp_rank: int = 0, allocation: str = "mixed", method: str = "whiten",
             latency=None) -> Plan:
    """Choose every layer's rank so the whole model fits ``budget``; see the module docstring.

    ``latency`` (a compress.latency.LatencyTarget): widths are limited to the latency break-even
    (pair faster than dense on the table's target), its ``target_ms`` is a second budget, and the
    plan records the predicted latency (see ``_latency_options``)."""
    if allocation not in ALLOCATIONS:
        raise CompressError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if granule < 1:
        raise CompressError(f"--granule must be >= 1, got {granule}")
    if comp_rank < 0:
        raise CompressError(f"--comp-rank must be >= 0, got {comp_rank}")
    if not layers:
        raise CompressError("no compressible layers")
    target = budget.target(total_params)
    opts = [_options(l, granule, comp_rank) for l in layers]
    times = None
    if latency is not None:
        opts, times = _latency_options(layers, opts, latency)
    elif budget.kind == "latency":
        raise CompressError("--target-latency-ms needs a latency table (--latency-table)")
    dense_total = sum(int(o.params[0]) for o in opts)
    fixed = total_params - dense_total  # embeddings, norms, biases outside, head unless included
    if fixed < 0:
        raise ValueError("total_params is smaller than the compressible layers")
    if target >= total_params and budget.kind != "latency":
        raise CompressError(f"the budget ({target:,} parameters) is not below the model's "
                            f"{total_params:,} parameters; nothing to compress")
    min_total = fixed + sum(int(o.params[-1]) for o in opts)
    if target < min_total:
        k_min = granule * math.ceil((comp_rank + 1) / granule)
        raise CompressError(
            f"{budget.describe()} needs <= {target:,} parameters, but factorising every compressible layer "
            f"to the smallest width {k_min} (rank {k_min - comp_rank} + comp rank {comp_rank}, granule "
            f"{granule}) still leaves {min_total:,} ({1 - min_total / total_params:.1%} removed at most); "
            f"ask for less, or lower --granule/--comp-rank"
            + ("; layers whose pairs the latency table finds no faster than dense stay dense"
               if latency is not None else ""))
    if latency is not None and latency.target_ms is not None:
        if allocation != "mixed":
            raise CompressError("--target-latency-ms is met by the mixed allocation; drop --allocation uniform")
        idx = _greedy_two_budgets(opts, times, target - fixed, latency.target_ms - latency.rest_ms(), latency)
    elif allocation == "mixed":
        idx = _greedy(opts, target - fixed)
    else:
        idx = _uniform(layers, opts, target - fixed, granule)
    plans = []
    for l, o, i in zip(layers, opts, idx):
        k = int(o.widths[i])
        plans.append(LayerPlan(l.name, l.out_features, l.in_features, l.bias,
                               rank=k - comp_rank if k else 0, comp_rank=comp_rank if k else 0,
                               params=int(o.params[i]), dense_params=int(o.params[0]),
                               predicted_error=float(o.errors[i]), tokens=l.tokens))
    after = fixed + sum(p.params for p in plans)
    assert after <= target, (after, target)
    return Plan(method, allocation, budget, target, granule, comp_rank, total_params, after, tuple(plans),
                latency=None if latency is None else predicted_latency(latency, plans))


def _best_move(o: _Options, i: int) -> tuple[float, int]:
    """Smallest (error increase / params saved) over all smaller states of one layer, and the state."""
    if i + 1 >= len(o.params):
        return math.inf, -1
    saved = (o.params[i] - o.params[i + 1:]).astype(np.float64)
    cost = np.maximum(o.errors[i + 1:] - o.errors[i], 0.0) / saved
    j = int(np.argmin(cost))  # first minimum: the smallest step among equals
    return float(cost[j]), i + 1 + j


def _greedy(opts: list[_Options], allowed: int) -> list[int]:
    idx = [0] * len(opts)
    total = sum(int(o.params[0]) for o in opts)
    moves = [_best_move(o, 0) for o in opts]
    while total > allowed:
        l = min(range(len(opts)), key=lambda t: (moves[t][0], t))
        cost, j = moves[l]
        if j < 0:  # unreachable: the caller checked the minimum total
            raise CompressError("budget cannot be met")
        total -= int(opts[l].params[idx[l]] - opts[l].params[j])
        idx[l] = j
        moves[l] = _best_move(opts[l], j)
    idx = _fill(opts, idx, total, allowed)
    return _exchange(opts, idx, allowed)


def _fill(opts: list[_Options], idx: list[int], total: int, allowed: int) -> list[int]:
    """Raise widths back one state at a time while the budget allows, best error gain per param first."""
    while True:
        best, best_l = -1.0, -1
        for l, (o, i) in enumerate(zip(opts, idx)):
            if i == 0:
                continue
            extra = int(o.params[i - 1] - o.params[i])
            if total + extra > allowed:
                continue
            gain = (o.errors[i] - o.errors[i - 1]) / extra
            if gain > best:
                best, best_l = gain, l
        if best_l < 0:
            return idx
        o = opts[best_l]
        total += int(o.params[idx[best_l] - 1] - o.params[idx[best_l]])
        idx[best_l] -= 1


def _exchange(opts: list[_Options], idx: list[int], allowed: int, max_rounds: int = 1000) -> list[int]:
    """Local search after the greedy: raise one layer by any number of states (up to dense) and
    pay for it by lowering another as little as needed, whenever that lowers the total error;
    then refill. Repairs the greedy's knapsack rounding, e.g. a layer with a flat curve that
    should have stayed dense. Stops at a local optimum."""
    idx = list(idx)
    for _ in range(max_rounds):
        slack = allowed - sum(int(o.params[i]) for o, i in zip(opts, idx))
        best_gain, best = 1e-12, None
        for u, (ou, iu) in enumerate(zip(opts, idx)):
            if iu == 0:
                continue
            up_cost = ou.params[:iu] - ou.params[iu]          # to states 0 .. iu-1
            up_gain = ou.errors[iu] - ou.errors[:iu]
            need = up_cost - slack
            for d, (od, id_) in enumerate(zip(opts, idx)):
                if d == u or id_ + 1 >= len(od.params):
                    continue
                saved = od.params[id_] - od.params[id_ + 1:]    # increasing
                loss = od.errors[id_ + 1:] - od.errors[id_]
                pos = np.searchsorted(saved, need)              # fewest states down that pay
                ok = pos < len(saved)
                if not ok.any():
                    continue
                gain = np.where(ok, up_gain - loss[np.minimum(pos, len(saved) - 1)], -np.inf)
                k = int(np.argmax(gain))
                if gain[k] > best_gain:
                    best_gain, best = float(gain[k]), (u, k, d, id_ + 1 + int(pos[k]))
        if best is None:
            return idx
        u, k, d, j = best
        idx[u], idx[d] = k, j
        idx = _fill(opts, idx, sum(int(o.params[i]) for o, i in zip(opts, idx)), allowed)
    return idx


def _uniform(layers: Sequence[LayerCurve], opts: list[_Options], allowed: int, granule: int) -> list[int]:
    """Largest common rank fraction f of min(m, n) whose granule-rounded widths fit ``allowed``."""

    def states(f: float) -> list[int]:
        out = []
        for l, o in zip(layers, opts):
            k = int(f * min(l.out_features, l.in_features) + 1e-9) // granule * granule
            if len(o.widths) == 1 or k > o.widths[1]:
                out.append(0)                        # above break-even: dense
            else:
                out.append(int(np.nonzero(o.widths[1:] <= max(k, o.widths[-1]))[0][0]) + 1)
        return out

    def total(ix):
        return sum(int(o.params[i]) for o, i in zip(opts, ix))

    # candidate fractions: every point where some layer's width changes
    fracs = sorted({w / min(l.out_features, l.in_features)
                    for l, o in zip(layers, opts) for w in o.widths[1:]} | {1.0})
    best = states(0.0)
    lo, hi = 0, len(fracs) - 1
    while lo <= hi:  # params are non-decreasing in f
        mid = (lo + hi) // 2
        ix = states(fracs[mid])
        if total(ix) <= allowed:
            best, lo = ix, mid + 1
        else:
            hi = mid - 1
    return best


# ---- latency-aware allocation (compress.latency) -------------------------------------------

def _latency_options(layers: Sequence[LayerCurve], opts: list[_Options], latency) -> tuple[list[_Options], list]:
    """Each layer's states cut to the latency break-even, and every state's predicted time (ms)."""
    cut, times = [], []
    for l, o in zip(layers, opts):
        if l.tokens < 1:
            raise CompressError(f"{l.name}: tokens per image unknown, cannot look it up in a latency table")
        keep = set(latency.break_even(l.out_features, l.in_features, l.tokens, o.widths[1:]))
        sel = np.array([0] + [i for i, k in enumerate(o.widths) if i > 0 and int(k) in keep])
        o = _Options(o.widths[sel], o.params[sel], o.errors[sel])
        cut.append(o)
        times.append(latency.layer_states(l.out_features, l.in_features, l.tokens, o.widths[1:]))
    return cut, times


def _greedy_two_budgets(opts: list[_Options], times: list[np.ndarray], allowed: int, allowed_ms: float,
                        latency) -> list[int]:
    """Mixed allocation under a parameter and a latency budget: from dense, repeatedly take the move
    with the smallest error increase per unit saved of whichever budget is still exceeded (ms
    first), then raise widths back while both budgets hold, largest error decrease per ms first."""
    idx = [0] * len(opts)
    params = sum(int(o.params[0]) for o in opts)
    ms = float(sum(t[0] for t in times))
    while params > allowed or ms > allowed_ms:
        on_ms = ms > allowed_ms
        best, move = math.inf, None
        for l, (o, t, i) in enumerate(zip(opts, times, idx)):
            saved = (t[i] - t[i + 1:]) if on_ms else (o.params[i] - o.params[i + 1:]).astype(np.float64)
            if not len(saved):
                continue
            cost = np.where(saved > 0, np.maximum(o.errors[i + 1:] - o.errors[i], 0.0) / np.maximum(saved, 1e-30),
                            math.inf)
            j = int(np.argmin(cost))
            if cost[j] < best:
                best, move = float(cost[j]), (l, i + 1 + j)
        if move is None:
            lo = latency.rest_ms() + sum(float(t.min()) for t in times)
            raise CompressError(
                f"the latency budget {latency.target_ms:g} ms cannot be met: factorising every layer that the "
                f"table says is faster as a pair still predicts {lo:.2f} ms ({latency.rest_ms():.2f} ms of it "
                f"outside the Linears) at batch {latency.batch}, {latency.precision}; ask for more")
        l, j = move
        params -= int(opts[l].params[idx[l]] - opts[l].params[j])
        ms -= float(times[l][idx[l]] - times[l][j])
        idx[l] = j
    while True:   # fill back: one state up at a time while both budgets hold
        best, best_l = 0.0, -1
        for l, (o, t, i) in enumerate(zip(opts, times, idx)):
            if i == 0:
                continue
            extra_p, extra_ms = int(o.params[i - 1] - o.params[i]), float(t[i - 1] - t[i])
            if params + extra_p > allowed or ms + extra_ms > allowed_ms:
                continue
            gain = (o.errors[i] - o.errors[i - 1]) / max(extra_ms, 1e-6)
            if gain > best:
                best, best_l = gain, l
        if best_l < 0:
            return idx
        i = idx[best_l]
        params += int(opts[best_l].params[i - 1] - opts[best_l].params[i])
        ms += float(times[best_l][i - 1] - times[best_l][i])
        idx[best_l] = i - 1


def predicted_latency(latency, plans: Sequence[LayerPlan]) -> dict:
    """What a plan records: the target, and predicted ms of the plan and of the dense model per batch."""
    batches = latency.table.batches(latency.precision)
    dense = [dataclasses.replace(p, rank=0, comp_rank=0) for p in plans]
    return {**latency.describe(),
            "predicted_ms": {str(b): latency.predict(plans, b) for b in batches},
            "dense_predicted_ms": {str(b): latency.predict(dense, b) for b in batches}}
