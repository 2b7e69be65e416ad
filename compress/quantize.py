"""INT8 post-training quantization of the (compressed) model, simulated in PyTorch (METHOD.md §5).

* Weights: symmetric, per output channel, int8 in [-127, 127], zero point 0,
  scale = amax(row) / 127 (``quantize_weight``).
* Activations: symmetric, per tensor, scale = amax / 127, values saturated to
  [-128, 127] as ONNX QuantizeLinear does. Quantized activations are the input of every
  Linear and, for each LowRankLinear, the intermediate h = first(x) ("mid").
  LayerNorm, Softmax, GELU and the residual adds stay in float.
* ``apply_fake_quant_`` swaps in fake-quantized weights (originals kept aside) and adds
  forward pre-hooks that fake-quantize activations; ``remove_fake_quant_`` undoes both.
* ``balance_lowrank_`` moves scale between the two factors of a pair (a gauge freedom:
  h -> D h, first -> D first, second -> second D^-1) so the intermediate channels share
  one per-tensor scale better, without changing the float output.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from tqdm import tqdm

from .lowrank import LowRankLinear
from .models import excluded_linears

log = logging.getLogger(__name__)

QMAX = 127
WEIGHT_SCHEME = "int8 symmetric per-output-channel, zero point 0, scale = amax/127, range [-127, 127]"
ACT_SCHEME = "int8 symmetric per-tensor, zero point 0, scale = amax/127, saturate to [-128, 127]"
_EPS = 1e-12


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LowRankLinear and every nn.Linear not inside one, by qualified name, in module order
    (except Linears that multiply constants, not tokens: compress.models.excluded_linears)."""
    out: dict[str, nn.Module] = {}
    inside: set[str] = set(excluded_linears(model))
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            out[name] = m
            inside.update({f"{name}.first", f"{name}.second"})
        elif isinstance(m, nn.Linear) and name not in inside:
            out[name] = m
    return out


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 per-row scale): symmetric per output channel, zero point 0."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1).clamp_min(_EPS)
    scale = amax / QMAX
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight(w)
    return (q.float() * scale[:, None]).to(w.dtype)


def fake_quant_act(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Per-tensor symmetric fake quantization with the rounding/saturation of QuantizeLinear."""
    scale = max(float(amax), _EPS) / QMAX
    return torch.clamp(torch.round(x / scale), -QMAX - 1, QMAX) * scale


# ----------------------------------------------------------------------------- ranges
class RangeObserver:
    """Streaming |x| statistics of one tensor: running max and a histogram for percentiles.

    Bins have a fixed width set by the first batch; new larger values add bins, and the
    histogram is halved in resolution whenever it would exceed ``max_bins``.
    """

    def __init__(self, histogram: bool = True, bins: int = 2048, max_bins: int = 16384):
        self.histogram, self.bins, self.max_bins = histogram, bins, max_bins
        self.amax = 0.0
        self.width = 0.0
        self.zeros = 0  # values seen before the first nonzero batch (all exactly 0)
        self.counts = torch.zeros(0, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.detach())
        m = max(-float(lo), float(hi))
        if not math.isfinite(m):
            raise ValueError("non-finite activation")
        if not self.histogram:  # min-max only: no pass over |x|
            self.amax = max(self.amax, m)
            return
        a = x.detach().abs().float().reshape(-1)
        if self.width == 0.0:  # bins are laid out at the first nonzero batch
            if m == 0.0:
                self.zeros += a.numel()
                return
            self.width = m / self.bins
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
            self.counts[0] += self.zeros
        self.amax = max(self.amax, m)
        need = max(len(self.counts), math.ceil(m / self.width))
        if need > len(self.counts):
            self.counts = torch.cat([self.counts, torch.zeros(need - len(self.counts), dtype=torch.float64)])
        while len(self.counts) > self.max_bins:  # merge pairs of bins
            if len(self.counts) % 2:
                self.counts = torch.cat([self.counts, torch.zeros(1, dtype=torch.float64)])
            self.counts = self.counts.view(-1, 2).sum(1)
            self.width *= 2
        n = len(self.counts)
        self.counts += torch.histc(a.cpu(), bins=n, min=0.0, max=self.width * n).double()

    def percentile(self, p: float) -> float:
        """The p-th percentile of |x| (upper bin edge), never above the observed max."""
        if not self.histogram:
            raise ValueError("percentile ranges need RangeObserver(histogram=True)")
        total = float(self.counts.sum())
        if total == 0 or self.width == 0.0:
            return self.amax
        cum = torch.cumsum(self.counts, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(p / 100.0 * total, dtype=torch.float64)))
        return min((idx + 1) * self.width, self.amax)

    def value(self, method: str = "minmax", percentile: float = 99.99) -> float:
        return self.amax if method == "minmax" else self.percentile(percentile)

    def state(self) -> dict:
        return {"amax": self.amax, "width": self.width, "zeros": self.zeros, "histogram": self.histogram,
                "counts": self.counts.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "RangeObserver":
        o = cls(histogram=bool(state.get("histogram", True)))
        o.amax, o.width, o.counts = float(state["amax"]), float(state["width"]), state["counts"].double()
        o.zeros = int(state.get("zeros", 0))
        return o


def ranges_from_states(states: dict[str, dict], method: str = "minmax", percentile: float = 99.99) -> dict:
    """{layer: {"input": amax}} from RangeObserver states (the dense model's ranges)."""
    return {n: {"input": RangeObserver.from_state(s).value(method, percentile)} for n, s in states.items()}


@dataclass
class _Observed:
    input: dict[str, RangeObserver]
    mid: dict[str, RangeObserver]
    mid_channels: dict[str, torch.Tensor]
    outputs: list[torch.Tensor]


@torch.no_grad()
def _observe(model: nn.Module, batches: Iterable, layers: Iterable[str] | None, device: str,
             channels: bool = False, histogram: bool = False) -> _Observed:
    mods = quantizable_layers(model) if layers is None else {n: model.get_submodule(n) for n in layers}
    obs = _Observed({n: RangeObserver(histogram) for n in mods}, {}, {}, [])
    handles = []

    def in_hook(name):
        def hook(_m, inputs):
            obs.input[name].update(inputs[0])
        return hook

    def mid_hook(name):
        def hook(_m, inputs):
            h = inputs[0]
            obs.mid[name].update(h)
            if channels:
                cur = h.detach().abs().reshape(-1, h.shape[-1]).amax(0).float().cpu()
                prev = obs.mid_channels.get(name)
                obs.mid_channels[name] = cur if prev is None else torch.maximum(prev, cur)
        return hook

    for n, m in mods.items():
        handles.append(m.register_forward_pre_hook(in_hook(n)))
        if isinstance(m, LowRankLinear):
            obs.mid[n] = RangeObserver(histogram)
            handles.append(m.second.register_forward_pre_hook(mid_hook(n)))
    model.eval().to(device)
    try:
        for batch in tqdm(batches, desc="activation ranges", unit="batch", mininterval=5, disable=None):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            obs.outputs.append(model(x.to(device)).float().cpu())
    finally:
        for h in handles:
            h.remove()
    return obs


def _ranges(obs: _Observed, method: str, percentile: float) -> dict:
    return {n: {"input": o.value(method, percentile),
                "mid": obs.mid[n].value(method, percentile) if n in obs.mid else None}
            for n, o in obs.input.items()}


def calibrate_activations(model: nn.Module, batches: Iterable, layers: Iterable[str] | None = None,
                          method: str = "minmax", percentile: float = 99.99,
                          device: str = "cpu") -> dict[str, dict]:
    """{layer: {"input": amax, "mid": amax | None}} for every quantizable layer (or ``layers``).

    ``method`` "minmax" takes the largest |x| seen; "percentile" the given percentile of |x|
    over all calibration values of the tensor.
    """
    if method not in ("minmax", "percentile"):
        raise ValueError(f"unknown calibration method {method!r}")
    return _ranges(_observe(model, batches, layers, device, histogram=method == "percentile"), method, percentile)


# ----------------------------------------------------------------------------- balancing
def balance_scales(first_w: torch.Tensor, second_w: torch.Tensor, h_amax: torch.Tensor) -> torch.Tensor:
    """Per-channel d for the gauge h -> d h: equalise channel ranges of h against the columns of second.

    After the gauge, channel j of h spans d_j r_h_j and column j of ``second`` spans
    r_w_j / d_j; d_j = sqrt(r_w_j / r_h_j) makes both sqrt(r_h_j r_w_j) (the
    cross-layer-equalisation choice), normalised to geometric mean 1. Dead channels keep d=1.
    """
    r_h = h_amax.double()
    r_w = second_w.detach().abs().amax(0).double()
    ok = (r_h > 0) & (r_w > 0)
    d = torch.ones_like(r_h)
    d[ok] = torch.sqrt(r_w[ok] / r_h[ok])
    if ok.any():
        d[ok] /= torch.exp(torch.log(d[ok]).mean())
    return d


@torch.no_grad()
def balance_lowrank_(module: LowRankLinear, h_amax: torch.Tensor) -> torch.Tensor:
    """Apply the gauge in place (fp32 output unchanged up to rounding); returns d."""
    d = balance_scales(module.first.weight, module.second.weight, h_amax)
    w1, w2 = module.first.weight, module.second.weight
    w1.copy_((w1.double() * d[:, None]).to(w1.dtype))
    w2.copy_((w2.double() / d[None, :]).to(w2.dtype))
    return d


def balance_and_calibrate_(model: nn.Module, batches, method: str = "minmax", percentile: float = 99.99,
                           device: str = "cpu") -> tuple[dict, torch.Tensor]:
    """Balance every LowRankLinear from its observed per-channel |h|, then return the ranges.

    With min-max ranges one pass suffices (the balanced mid range is max_j d_j amax_j, the
    input ranges do not change); percentiles need a second pass. Also returns the model's
    outputs on the batches (before balancing, equal up to rounding), for error reports.
    """
    obs = _observe(model, batches, None, device, channels=True)
    mods = quantizable_layers(model)
    ds = {n: balance_lowrank_(mods[n], ch) for n, ch in obs.mid_channels.items()}
    if method == "percentile":
        ranges = calibrate_activations(model, batches, None, method, percentile, device)
    else:
        ranges = _ranges(obs, "minmax", percentile)
        for n, d in ds.items():
            ranges[n]["mid"] = float((obs.mid_channels[n].double() * d).max())
    return ranges, torch.cat(obs.outputs)


# ----------------------------------------------------------------------------- fake quant
_STATE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _linears_of(m: nn.Module) -> list[nn.Linear]:
    return [m.first, m.second] if isinstance(m, LowRankLinear) else [m]


@torch.no_grad()
def apply_fake_quant_(model: nn.Module, ranges: dict[str, dict], weights: bool = True,
                      activations: bool = True) -> nn.Module:
    """Simulate INT8 on the layers named in ``ranges`` (in place; undo with remove_fake_quant_)."""
    if model in _STATE:
        remove_fake_quant_(model)
    state = {"handles": [], "weights": []}
    for name, r in ranges.items():
        mod = model.get_submodule(name)
        if weights:
            for lin in _linears_of(mod):
                state["weights"].append((lin, lin.weight.data))
                lin.weight.data = fake_quant_weight(lin.weight.data)
        if activations:
            state["handles"].append(mod.register_forward_pre_hook(_act_hook(r["input"])))
            if isinstance(mod, LowRankLinear):
                if r.get("mid") is None:
                    raise ValueError(f"no intermediate range for low-rank layer {name}")
                state["handles"].append(mod.second.register_forward_pre_hook(_act_hook(r["mid"])))
    _STATE[model] = state
    return model


def _act_hook(amax: float):
    def hook(_m, inputs):
        return (fake_quant_act(inputs[0], amax),) + tuple(inputs[1:])
    return hook


@torch.no_grad()
def remove_fake_quant_(model: nn.Module) -> nn.Module:
    state = _STATE.pop(model, None)
    if state is None:
        return model
    for h in state["handles"]:
        h.remove()
    for lin, w in state["weights"]:
        lin.weight.data = w
    return model


@dataclass(frozen=True)
class OutputError:
    """How far outputs y' are from reference outputs y over the same images: logits, or the pooled
    features of a headless model (then no top-1 agreement: an argmax over features means nothing)."""
    rel_error: float     # ||y' - y||_F / ||y||_F
    cosine: float        # mean per-image cosine similarity
    top1_agreement: float | None
    images: int
    outputs: str = "logits"

    def to_dict(self) -> dict:
        return {"rel_error": self.rel_error, "cosine": self.cosine,
                "top1_agreement": self.top1_agreement, "images": self.images, "outputs": self.outputs}


def output_error(y: torch.Tensor, ref: torch.Tensor, outputs: str = "logits") -> OutputError:
    """``outputs``: "logits", or "features" for a headless model (compress.models.ModelSpec.outputs)."""
    y, ref = y.double().flatten(1), ref.double().flatten(1)
    rel = float((y - ref).norm() / ref.norm().clamp_min(_EPS))
    cos = float(torch.nn.functional.cosine_similarity(y, ref, dim=1).mean())
    agree = float((y.argmax(1) == ref.argmax(1)).double().mean()) if outputs == "logits" else None
    return OutputError(rel, cos, agree, len(y), outputs)


@torch.no_grad()
def model_outputs(model: nn.Module, batches: Iterable, device: str = "cpu") -> torch.Tensor:
    model.eval().to(device)
    return torch.cat([model((b[0] if isinstance(b, (tuple, list)) else b).to(device)).float().cpu()
                      for b in batches])


@torch.no_grad()
def fake_quant_error(model: nn.Module, ranges: dict[str, dict], batches: Iterable,
                     reference: torch.Tensor | None = None, device: str = "cpu",
                     outputs: str = "logits") -> tuple[OutputError, torch.Tensor]:
    """Output error of the fake-quantized model against its float outputs (or ``reference``)."""
    if reference is None:
        reference = model_outputs(model, batches, device)
    apply_fake_quant_(model, ranges)
    try:
        y = model_outputs(model, batches, device)
    finally:
        remove_fake_quant_(model)
    return output_error(y, reference, outputs), y
