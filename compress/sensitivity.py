"""End-to-end layer sensitivity for the rank allocation (METHOD.md §8, beyond the paper).

The paper's objective, the sum of normalised layer errors, treats a layer the network amplifies
like one it ignores. Here each factorised layer alone is truncated to the rank a first allocation
gave it, everything else dense, and the move of the network's final features on a few probe
images is measured:

    E_l = || f(x) - f_l(x) ||^2 / || f(x) ||^2        (f: the features the head reads)

or, with ``target="logits"`` (a classifier only), how far it moves the head's predictions:

    E_l = mean_x KL(softmax(z(x)) || softmax(z_l(x)))    (z: the logits)

which weighs a feature error by how much the head's decision depends on its direction (to second
order the Fisher-weighted feature error), where the feature target counts every direction alike.
The layer's weight is ``s_l = E_l / e_l(r_l)``: how much end-to-end error one unit of its own
normalised error causes. The allocation then runs again on the weighted curves ``s_l e_l(r)``,
so a layer whose error the network amplifies keeps more rank. One forward of the blocks after
the layer per layer (block inputs are computed once), on ``images`` probe images.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .lowrank import LowRankLinear, replace_module_
from .models import run_stage, stages

log = logging.getLogger(__name__)

TARGETS = ("features", "logits")
DEFAULT_TARGET = "features"


def _end_to_end_error(out: torch.Tensor, ref: torch.Tensor, target: str) -> float:
    """E_l of the module docstring: relative squared feature error, or mean KL of the logits."""
    out, ref = out.double(), ref.double()
    if target == "logits":
        return float(F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean"))
    energy = float(ref.pow(2).sum())
    return float((out - ref).pow(2).sum()) / energy if energy > 0 else 0.0


@torch.no_grad()
def sensitivities(dense: nn.Module, factors: dict, ranks: dict[str, int], errors: dict[str, float],
                  images: list[torch.Tensor], target: str = DEFAULT_TARGET) -> dict[str, float]:
    """``s_l`` of every layer in ``ranks`` (rank > 0); ``factors[name]`` gives (A, B) at a rank.

    ``factors``: name -> callable(rank) -> (A, B); ``errors``: name -> e_l(r_l), its own normalised error;
    ``target``: what E_l compares, the final ``features`` or the head's ``logits`` (module docstring).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown sensitivity target {target!r}; use {' or '.join(TARGETS)}")
    readout = "tail" if target == "logits" else "features"
    dense.eval()
    plan = [(s, ls) for s, ls in stages(dense, ranks) if s != "embed"]
    blocks = [s for s, _ in plan if s != "tail"]
    h = [run_stage(dense, "embed", x) for x in images]
    inputs = {}
    for stage in blocks:
        inputs[stage] = h
        h = [run_stage(dense, stage, x) for x in h]
    ref = torch.cat([run_stage(dense, readout, x) for x in h])
    out: dict[str, float] = {}
    todo = [(s, l) for s, ls in plan for l in ls if ranks.get(l, 0) > 0]
    for stage, name in tqdm(todo, desc="layer sensitivity", unit="layer", mininterval=5, disable=None):
        lin = dense.get_submodule(name)
        A, B = factors[name](ranks[name])
        replace_module_(dense, name, LowRankLinear.from_factors(A, B, None if lin.bias is None else lin.bias.detach()))
        try:
            if stage == "tail":
                out_l = torch.cat([run_stage(dense, readout, x) for x in h])
            else:
                xs = inputs[stage]
                for s in blocks[blocks.index(stage):]:
                    xs = [run_stage(dense, s, x) for x in xs]
                out_l = torch.cat([run_stage(dense, readout, x) for x in xs])
        finally:
            replace_module_(dense, name, lin)
        out[name] = _end_to_end_error(out_l, ref, target) / max(errors[name], 1e-12)
    return out


def weighted_curves(curves, weights: dict[str, float]):
    """The curves scaled by each layer's weight; layers without one get the median weight."""
    med = float(np.median(list(weights.values()))) if weights else 1.0
    return [replace(c, curve=tuple(weights.get(c.name, med) * e for e in c.curve)) for c in curves]
