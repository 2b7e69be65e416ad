"""The whole compress stage as one function: ``run(Config(...))`` -> the output directory.

statistics (stats.py, cached) -> one SVD per layer (svd.py) -> rank plan (allocate.py)
-> low-rank model -> sequential error compensation (compensate.py) -> optional distillation
fine-tuning of the factors (finetune.py, off by default) -> INT8 ranges and fake-quant error
(quantize.py) -> atomic artifact (artifact.py: manifest, weights, report).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .allocate import ALLOCATIONS, Budget, LayerCurve, Plan, allocate
from .errors import CompressError
from .svd import DEFAULT_DAMPING, METHODS

log = logging.getLogger(__name__)


def default_stats_cache() -> Path:
    import os

    return Path(os.environ.get("VIT_EDGE_CACHE", Path.home() / ".cache" / "vit-edge")) / "compress-stats"


@dataclass(frozen=True)
class Config:
    """Everything that determines a compress run; validated on creation, saved in the manifest."""
    model: str
    out: str
    checkpoint: str | None = None
    pretrained: bool | None = None       # None: bundled weights for vit_cifar_*, else random init
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model / the entry point (recorded)
    data_config: dict = field(default_factory=dict)   # preprocessing overrides (compress.models.check_data_config)
    pos_interpolation: str = "auto"                   # resampling of a checkpoint's position table of another grid
    calib: str | None = None             # None: calibration_data.default_calibration_for(model)
    num_calib: int = 256
    batch_size: int = 32
    seed: int = 0
    ratio: float | None = None           # at most one of ratio / params / size_mb, and/or target_latency_ms
    params: int | None = None
    size_mb: float | None = None
    target_latency_ms: float | None = None  # predicted by the latency table (compress.latency)
    latency_table: str | None = None     # JSON path, "auto" (this machine's cached table) or None (params only)
    latency_precision: str = "int8"      # which timings of the table the break-even and budget use
    latency_batch: int = 1               # the batch size --target-latency-ms is for
    method: str = "whiten"
    allocation: str = "mixed"
    granule: int = 8
    comp_rank: int = 0                   # the paper's compensation (0: off; measured to hurt real models, issue 10)
    comp_steps: int = 50
    comp_images: int = 64                # images of the sequential pass (0: all calibration images)
    gram_precision: str = "float64"      # per-batch Gram product dtype; sums are always float64
    comp_lr: float = 1e-2
    sensitivity_images: int = 0          # >0: reallocate by measured end-to-end layer sensitivity (sensitivity.py)
    heldout: int = 64                    # extra calibration images never fitted on: they judge every refinement
    seq_refit: bool = True               # sequential factorisation, kept per block where it pays (refine.py)
    recon_steps: int = 0                 # block-wise reconstruction steps per block (0: off; refine.py)
    recon_lr: float = 1e-3
    refine_damping: float = 1e-2         # ridge of the refinement's C~, relative to its mean diagonal
    finetune_steps: int = 0              # distillation steps on the calibration images (0: off, the paper's setting)
    finetune_lr: float = 3e-5
    alpha: float = 0.5                   # exponent of the diag variant
    damping: float = DEFAULT_DAMPING     # whitening lambda relative to the mean Gram diagonal
    comp_damping: float = DEFAULT_DAMPING  # ridge of the compensation fit, relative to mean(diag C~)
    quant: bool = True
    quant_calib: str = "minmax"          # or "percentile"
    percentile: float = 99.99
    include_head: bool = False
    stats_cache: str | None = None       # None: no cache
    device: str = "cpu"

    def __post_init__(self):
        given = [k for k in ("ratio", "params", "size_mb") if getattr(self, k) is not None]
        if len(given) > 1 or not given and self.target_latency_ms is None:
            raise CompressError("give one budget: --ratio, --params or --size-mb, and/or --target-latency-ms"
                                + (f" (got {', '.join(given)})" if given else ""))
        self.budget  # validates the value
        if self.method not in METHODS:
            raise CompressError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise CompressError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.gram_precision not in ("float64", "float32"):
            raise CompressError(f"--gram-precision must be float64 or float32, got {self.gram_precision!r}")
        for name, lo in (("num_calib", 1), ("batch_size", 1), ("granule", 1), ("comp_rank", 0), ("comp_steps", 0),
                         ("comp_images", 0), ("finetune_steps", 0), ("heldout", 0), ("recon_steps", 0),
                         ("sensitivity_images", 0)):
            if getattr(self, name) < lo:
                raise CompressError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        if self.quant_calib not in ("minmax", "percentile"):
            raise CompressError(f"unknown activation calibration {self.quant_calib!r}; use minmax or percentile")
        if not 50 < self.percentile <= 100:
            raise CompressError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.refines and self.heldout < 1:
            raise CompressError("--seq-refit/--recon-steps are validated on held-out images: give --heldout >= 1")
        if not self.recon_lr > 0 or not self.refine_damping >= 0:
            raise CompressError("--recon-lr must be > 0 and --refine-damping >= 0")
        if not self.finetune_lr > 0:
            raise CompressError(f"--finetune-lr must be > 0, got {self.finetune_lr}")
        if not self.damping >= 0 or not self.alpha >= 0 or not self.comp_damping >= 0:
            raise CompressError("--damping, --comp-damping and --alpha must be >= 0")
        if self.device != "cpu" and not self.device.startswith(("cuda", "mps")):
            raise CompressError(f"unknown device {self.device!r}; use cpu or cuda[:N]")

    @property
    def refines(self) -> bool:
        return self.seq_refit or self.recon_steps > 0

    @property
    def budget(self) -> Budget:
        if self.ratio is not None:
            return Budget("ratio", float(self.ratio))
        if self.params is not None:
            return Budget("params", float(self.params))
        if self.size_mb is not None:
            return Budget("mb", float(self.size_mb))
        return Budget("latency", float(self.target_latency_ms))

    def latency_target(self):
        """The latency model of allocation (compress.latency.LatencyTarget), or None without a table."""
        from .latency import latency_target

        table = self.latency_table or ("auto" if self.target_latency_ms is not None else None)
        return latency_target(table, self.model, self.latency_precision, self.latency_batch,
                              self.target_latency_ms) if table else None


@dataclass(frozen=True)
class RunResult:
    out: Path
    manifest: dict
    plan: Plan
    model: torch.nn.Module     # the compressed model as saved (float32, eval mode, on the CPU)


def calibration_hash(images) -> str:
    """sha256 of the chosen images' names and bytes (what the statistics were computed on)."""
    if not images.paths:
        return images.fingerprint()
    h = hashlib.sha256()
    for p in images.paths:
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def calib_source(calib) -> str:
    """How a manifest names the calibration images: a built-in set's name, or the folder's absolute path."""
    from calibration_data import is_spec

    return str(calib) if is_spec(calib) else str(Path(calib).resolve())


def _versions() -> dict:
    import safetensors
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "safetensors": safetensors.__version__}


def _break_even_rank(m: int, n: int) -> int:
    return max(1, min(m, n, (m * n - 1) // (m + n)))


def _first_images(loader, n: int):
    """The loader itself when it holds <= n images (or n == 0), else its first n images as batches."""
    if n == 0 or len(loader.dataset) <= n:
        return loader
    out, left = [], n
    for x, y in loader:
        out.append((x[:left], y[:left]))
        left -= len(out[-1][0])
        if left <= 0:
            break
    return out


_FACTORS: dict = {}   # (statistics key, method, alpha, damping) -> the factorisations of the last run


def _split(images, n: int):
    """The first ``n`` images of a set and the rest (a seeded subset's prefix is stable in ``num``)."""
    def part(sl):
        return dataclasses.replace(images, paths=images.paths[sl], labels=images.labels[sl],
                                   arrays=None if images.arrays is None else images.arrays[sl])
    return part(slice(0, n)), part(slice(n, None))


def _tensors(loader) -> list[torch.Tensor]:
    return [b[0] if isinstance(b, (tuple, list)) else b for b in loader]


def _validate_compensation_(dense, compressed, plan, facts, factors, held) -> dict:
    """Keep the compensation only if it beats, on held-out images, giving its q ranks to the SVD instead.

    Measured on the real ViT-S/14 (issue 10): compensation lowers the sequential error on the images
    it is fitted on while the network's output gets much worse; the fair alternative at the same
    parameter count is the whitened SVD at the full width r + q, so that is what it must beat.
    """
    from .lowrank import replace_module_
    from .refine import heldout_cosine

    with_comp = heldout_cosine(dense, compressed, held)
    svd = copy.deepcopy(compressed)
    for lp in plan.layers:
        if not lp.dense:
            A, B = facts[lp.name].factors(lp.width)
            replace_module_(svd, lp.name, _with_split(A, B, factors[lp.name][2], lp))
    without = heldout_cosine(dense, svd, held)
    kept = with_comp[0] >= without[0]
    if not kept:
        log.warning("compensation lowered the held-out final-feature cosine (%.4f vs %.4f with its ranks given to "
                    "the SVD): dropped", with_comp[0], without[0])
        for lp in plan.layers:
            if not lp.dense:
                replace_module_(compressed, lp.name, svd.get_submodule(lp.name))
    return {"heldout_cosine_compensated": {"mean": with_comp[0], "min": with_comp[1]},
            "heldout_cosine_svd_full_width": {"mean": without[0], "min": without[1]}, "kept": kept}


def _with_split(A, B, bias, lp):
    """A width-(r+q) SVD pair stored with the plan's rank/compensation split, so the artifact layout holds."""
    from .lowrank import LowRankLinear

    q = lp.comp_rank
    return LowRankLinear.from_factors(A[:, :lp.rank], B[:lp.rank], bias,
                                      A[:, lp.rank:] if q else None, B[lp.rank:].T if q else None)


def run(config: Config) -> RunResult | None:
    """Run the compress stage end to end and write ``config.out`` atomically (None on torchrun ranks > 0)."""
    from calibration_data import CalibrationDataError, default_calibration_for, is_spec, load_image_set, make_loader

    from . import compensate, distributed, quantize, stats
    from .artifact import save_compressed
    from .lowrank import LowRankLinear, replace_module_
    from .models import compressible_layers, count_params, load_model_with_spec, weights_fingerprint
    from .svd import factorise

    cfg, dev = config, config.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"--device {dev} asked for but CUDA is not available")
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now

    torch.manual_seed(cfg.seed)
    model, spec = load_model_with_spec(cfg.model, cfg.checkpoint, cfg.pretrained, data_config=cfg.data_config,
                                       pos_interpolation=cfg.pos_interpolation, **cfg.model_kwargs)
    if cfg.finetune_steps > 0 and spec.outputs != "logits":
        raise CompressError("--finetune-steps distils the dense model's logits; this model is headless")
    layers = compressible_layers(model, cfg.include_head)
    total_params = count_params(model)
    latency = cfg.latency_target()   # a missing table is an error before the expensive passes
    # an impossible budget depends on shapes only: say so before the expensive passes
    if cfg.budget.kind != "latency":
        allocate([LayerCurve(n, l.out_features, l.in_features, l.bias is not None,
                         (0.0,) * (min(l.out_features, l.in_features) + 1)) for n, l in layers.items()],
                 total_params, cfg.budget, granule=cfg.granule, comp_rank=cfg.comp_rank)
    calib = cfg.calib or default_calibration_for(model)
    calib = calib if is_spec(calib) else Path(calib)
    heldout = cfg.heldout if cfg.refines or cfg.comp_rank > 0 else 0
    try:
        images = load_image_set(calib, num=cfg.num_calib + heldout, seed=cfg.seed)
        images, held = _split(images, cfg.num_calib)
        if heldout and len(held) == 0:
            raise CalibrationDataError(f"{calib} has no images left for the {heldout} held-out ones "
                                       f"after {len(images)} calibration images; lower --num-calib or --heldout")
        loader = make_loader(images, model, batch_size=cfg.batch_size)
        held_x = _tensors(make_loader(held, model, batch_size=cfg.batch_size)) if len(held) else []
    except CalibrationDataError as e:
        raise CompressError(str(e)) from None
    calib_hash = calibration_hash(images)
    lap("load")
    log.info("%s: %s parameters, %d compressible layers, %d calibration images from %s",
             cfg.model, f"{total_params:,}", len(layers), len(images), calib)

    # 1. statistics (cached)
    cache_dir = cfg.stats_cache
    hist = cfg.quant_calib == "percentile"
    key = (stats.cache_key(weights_fingerprint(model), layers, calib_hash, len(images),
                           f"hist={hist},gram={cfg.gram_precision}") if cache_dir else "")
    if distributed.shards_statistics():  # under torchrun: each rank a shard, rank 0 the sums (distributed.py)
        st = distributed.collect(model, layers, images, lambda part: make_loader(part, model, cfg.batch_size),
                                 cfg.batch_size, dev, histogram=hist, precision=cfg.gram_precision,
                                 cache_dir=cache_dir, key=key)
        if st is None:   # not rank 0: rank 0 runs the sequential passes below and writes
            return None
    else:
        st = stats.cached_collect(cache_dir, key, lambda: stats.collect(
            model, layers, loader, dev, total=len(loader), histogram=hist, precision=cfg.gram_precision))
    lap("statistics")

    # 2. one SVD per layer (kept in memory for the next run on the same statistics: sweeps and studies)
    fkey = (st.key, cfg.method, cfg.alpha, cfg.damping) if st.key else None
    facts = _FACTORS.get(fkey) if fkey else None
    if facts is None:
        facts = {}
        for name, lin in layers.items():
            s = st.layers[name]
            m, n = lin.out_features, lin.in_features
            facts[name] = factorise(lin.weight.detach().cpu(), s.gram, cfg.method, mean_abs=s.mean_abs,
                                    mean_input=s.mean, alpha=cfg.alpha, damping=cfg.damping,
                                    keep=_break_even_rank(m, n), name=name)
        if fkey:
            _FACTORS.clear()   # one entry: a study alternates budgets, not statistics
            _FACTORS[fkey] = facts
    curves = [LayerCurve(name, lin.out_features, lin.in_features, lin.bias is not None,
                         tuple(facts[name].curve.tolist()), tokens=st.layers[name].count // max(st.images, 1))
              for name, lin in layers.items()]
    lap("factorisation")

    # 3. allocation
    plan = allocate(curves, total_params, cfg.budget, granule=cfg.granule, comp_rank=cfg.comp_rank,
                    allocation=cfg.allocation, method=cfg.method, latency=latency)
    sens = None
    if cfg.sensitivity_images > 0:
        from .sensitivity import sensitivities, weighted_curves

        ranks = {lp.name: lp.rank for lp in plan.layers if not lp.dense}
        sens = sensitivities(model, {n: facts[n].factors for n in ranks}, ranks,
                             {n: facts[n].error(r) for n, r in ranks.items()},
                             _tensors(_first_images(loader, cfg.sensitivity_images)))
        plan = allocate(weighted_curves(curves, sens), total_params, cfg.budget, granule=cfg.granule,
                        comp_rank=cfg.comp_rank, allocation=cfg.allocation, method=cfg.method, latency=latency)
    log.info("plan: %s -> %s parameters (%.1f%% removed), %d of %d layers factorised",
             f"{plan.params_before:,}", f"{plan.params_after:,}", 100 * plan.ratio,
             sum(not l.dense for l in plan.layers), len(plan.layers))
    lap("allocation")

    # 4. apply (SVD part), 5. compensation
    compressed = copy.deepcopy(model)
    factors = {}
    for lp in plan.layers:
        if lp.dense:
            continue
        A, B = facts[lp.name].factors(lp.rank)
        bias = layers[lp.name].bias
        factors[lp.name] = (A, B, None if bias is None else bias.detach().cpu().clone())
        replace_module_(compressed, lp.name, LowRankLinear.from_factors(A, B, factors[lp.name][2]).to(dev))
    comp, n_comp, comp_check = {}, None, None
    if cfg.comp_rank > 0 and factors:
        # the first comp_images images of the (deterministic) loader; C must then come from
        # the same images, so the statistics are recomputed for them in the pass itself
        comp_batches = _first_images(loader, cfg.comp_images)
        comp = compensate.compensate_(model, compressed, factors, None if comp_batches is not loader else
                                      {n: st.layers[n].gram for n in factors},
                                      cfg.comp_rank, comp_batches, steps=cfg.comp_steps, lr=cfg.comp_lr,
                                      damping=cfg.comp_damping, device=dev, seed=cfg.seed,
                                      precision=cfg.gram_precision)
        n_comp = len(images) if comp_batches is loader else sum(len(b[0]) for b in comp_batches)
        if held_x:
            comp_check = _validate_compensation_(model, compressed, plan, facts, factors, held_x)
    compressed.eval()
    lap("compensation")

    # 5a. sequential refit / block-wise reconstruction, each kept only where held-out images say it pays
    refined = None
    if cfg.refines and factors:
        from .refine import RefineConfig, refine_

        rcfg = RefineConfig(seq=cfg.seq_refit, recon_steps=cfg.recon_steps, recon_lr=cfg.recon_lr,
                            damping=cfg.refine_damping, seed=cfg.seed)
        refined = refine_(model, compressed, _tensors(loader), held_x, rcfg)
        lap("refinement")

    # 5b. optional recovery fine-tuning (beyond the paper): before INT8, so the ranges fit the tuned factors
    finetune = None
    if cfg.finetune_steps > 0 and factors:
        from .finetune import distill_

        finetune = distill_(model, compressed, loader, cfg.finetune_steps, lr=cfg.finetune_lr, seed=cfg.seed,
                            device=dev, batch_size=cfg.batch_size)
        lap("finetune")
    elif cfg.finetune_steps > 0:
        log.warning("fine-tuning skipped: no layer was factorised")

    # 6. INT8: balance the pairs, calibrate, measure the fake-quant error
    from .quantize import ACT_SCHEME, WEIGHT_SCHEME, output_error

    calib_desc = "min-max" if cfg.quant_calib == "minmax" else f"percentile {cfg.percentile}"
    qinfo = {"enabled": cfg.quant, "weights": WEIGHT_SCHEME, "activations": ACT_SCHEME,
             "calibration": calib_desc,
             "dense_act_ranges": quantize.ranges_from_states(st.ranges, cfg.quant_calib, cfg.percentile),
             "act_ranges": None}
    agreement = {}
    if cfg.quant:
        ranges, y32 = quantize.balance_and_calibrate_(compressed, loader, cfg.quant_calib, cfg.percentile, dev)
        err, y8 = quantize.fake_quant_error(compressed, ranges, loader, reference=y32, device=dev,
                                            outputs=spec.outputs)
        qinfo.update(act_ranges=ranges, balanced=True, fake_quant_error=err.to_dict())
        agreement["compressed_fp32_vs_dense"] = output_error(y32, st.logits, spec.outputs).to_dict()
        agreement["compressed_int8_vs_dense"] = output_error(y8, st.logits, spec.outputs).to_dict()
        agreement["compressed_int8_vs_compressed_fp32"] = err.to_dict()
    else:
        y32 = quantize.model_outputs(compressed, loader, dev)
        agreement["compressed_fp32_vs_dense"] = output_error(y32, st.logits, spec.outputs).to_dict()
    lap("quantization")

    # 7. manifest + artifact
    manifest = _manifest(cfg, spec, plan, facts, comp, st, calib, calib_hash, images, qinfo, agreement)
    manifest["calibration"]["comp_images"] = n_comp
    manifest["finetune"] = finetune
    manifest["refine"] = refined
    manifest["compensation_check"] = comp_check
    manifest["sensitivity"] = sens
    manifest["timings"] = dict(timings)
    out = save_compressed(cfg.out, compressed.cpu(), manifest)
    lap("save")
    timings["total"] = round(time.perf_counter() - t0, 3)
    manifest["timings"] = timings
    return RunResult(out, manifest, plan, compressed)


def _manifest(cfg, spec, plan, facts, comp, st, calib, calib_hash, images, qinfo, agreement) -> dict:
    layers = {}
    for lp in plan.layers:
        f = facts[lp.name]
        ci = comp.get(lp.name)
        layers[lp.name] = {
            "in": lp.in_features, "out": lp.out_features, "bias": lp.bias, "rank": lp.rank,
            "comp_rank": lp.comp_rank, "dense": lp.dense, "params": lp.params, "dense_params": lp.dense_params,
            "error": 0.0 if lp.dense else f.error(lp.rank),
            "error_predicted": lp.predicted_error,
            "error_seq_before": ci.error_before if ci else None,
            "error_seq_after": ci.error_after if ci else None,
            "error_seq_init": ci.error_init if ci else None,
            "damping": f.damping,
        }
    seq_b = [l["error_seq_before"] for l in layers.values() if l["error_seq_before"] is not None]
    seq_a = [l["error_seq_after"] for l in layers.values() if l["error_seq_after"] is not None]
    errors = {"sum_svd": sum(l["error"] for l in layers.values()),
              "sum_seq_before": sum(seq_b) if seq_b else None,
              "sum_seq_after": sum(seq_a) if seq_a else None,
              "compensation_gain": (1 - sum(seq_a) / sum(seq_b)) if seq_b and sum(seq_b) > 0 else None}
    budget = plan.budget
    return {
        "model": spec.to_dict(),
        "method": plan.method,
        "allocation": plan.allocation,
        "granule": plan.granule,
        "comp_rank": plan.comp_rank,
        "budget": {"kind": budget.kind, "value": budget.value, "target_params": plan.target_params,
                   "description": budget.describe()},
        "params": {"before": plan.params_before, "after": plan.params_after, "removed_ratio": plan.ratio,
                   "compressible_before": plan.compressible_before,
                   "compressible_after": plan.compressible_after,
                   "compressible_removed_ratio": plan.compressible_ratio},
        "rank_map": plan.rank_map,
        "layers": layers,
        "errors": errors,
        "plan": plan.to_dict(),
        "latency": plan.latency,
        "calibration": {"path": calib_source(calib), "images": st.images, "hash": calib_hash,
                        "seed": cfg.seed, "tokens": next(iter(st.layers.values())).count,
                        "stats_cache_key": st.key or None, "stats_from_cache": st.from_cache},
        "quant": qinfo,
        "agreement": agreement,
        "versions": _versions(),
        "config": dataclasses.asdict(dataclasses.replace(cfg, calib=calib_source(calib),
                                                         pretrained=spec.pretrained)),
    }
