"""Per-layer latency tables (plain data) and what allocation needs from them: break-even widths
and predicted model latency.

A table is measured on the target backend by ``python -m runtime latency-table --model M``
(runtime/latency_table.py) and saved as JSON; compress only reads it. For every compressible
layer shape (out m, in n, rows per image) it holds, per precision ("fp32", "int8": the QDQ
graph as the exporter writes it) and batch size, the median time of the dense layer and of
the low-rank pair at a grid of widths k, all timed in one interleaved run, plus ``rest_ms``:
the whole dense model's time minus its Linears (attention, norms, GELU, ...), the same work in
every variant. A plan's latency is then predicted as

    rest_ms[precision, batch] + sum over layers of (dense time, or pair time at its width)

with pair times interpolated linearly between measured widths. A layer may be factorised
only at widths whose pair is faster than its dense layer at every measured batch size
(the latency break-even; FLAR-SVD makes the same point for GPUs).

Tables are cached per machine under the user cache: ``default_table_path(model, backend, threads)``
names the file by the model, the backend and a fingerprint of the CPU (model + flags), GPUs
(for GPU backends) and runtime library versions, so another machine or an upgraded ONNX Runtime
never reuses a stale table.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from cliutil import nvidia_smi_gpus, write_json

from .errors import CompressError

SCHEMA = 1
PRECISIONS = ("fp32", "int8")
BACKENDS = ("ort", "ort-cuda", "trt")
MEASURE_COMMAND = "python -m runtime latency-table --model {model} --backend {backend}"
_LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx")


@dataclass(frozen=True)
class LayerTiming:
    """One layer shape at one precision and batch size: dense and pair medians in ms."""
    out_features: int
    in_features: int
    tokens: int            # rows of the layer's input per image (e.g. 197 for ViT-S/16 at 224 px)
    precision: str
    batch: int
    dense_ms: float
    widths: tuple[int, ...]      # increasing
    pair_ms: tuple[float, ...]   # median time of the pair at each width

    def __post_init__(self):
        if len(self.widths) != len(self.pair_ms) or list(self.widths) != sorted(set(self.widths)):
            raise CompressError(f"latency table entry {self.out_features}x{self.in_features}: widths must be "
                                "increasing and match the pair times")

    @property
    def key(self) -> tuple:
        return self.out_features, self.in_features, self.tokens, self.precision, self.batch

    def pair(self, width) -> np.ndarray | float:
        """Pair time at ``width`` (array or scalar): linear between measured widths, linear
        extrapolation from the last two beyond them."""
        w, t = np.asarray(self.widths, float), np.asarray(self.pair_ms, float)
        k = np.asarray(width, float)
        if len(w) == 1:
            out = t[0] * k / w[0]
        else:
            out = np.interp(k, w, t)
            lo, hi = k < w[0], k > w[-1]
            out = np.where(lo, t[0] + (k - w[0]) * (t[1] - t[0]) / (w[1] - w[0]), out)
            out = np.where(hi, t[-1] + (k - w[-1]) * (t[-1] - t[-2]) / (w[-1] - w[-2]), out)
        out = np.maximum(out, 0.0)
        return float(out) if np.ndim(width) == 0 else out


@dataclass(frozen=True)
class LatencyTable:
    """Everything measured for one model on one backend and machine (JSON: to_dict/from_dict)."""
    model: str
    backend: str                 # "ort" (CPU), "ort-cuda", "trt"
    threads: int | None          # intra-op threads (None: the runtime's default)
    machine: dict                # cpu, cpu_flags, gpus, fingerprint
    versions: dict
    layers: tuple[LayerTiming, ...]
    rest_ms: dict = field(default_factory=dict)       # "precision@batch" -> ms outside the Linears
    dense_model_ms: dict = field(default_factory=dict)  # "precision@batch" -> whole dense model, measured
    repeats: int = 0
    measured: str = ""
    options: dict = field(default_factory=dict)   # backend options the timings were taken with

    def entry(self, m: int, n: int, tokens: int, precision: str, batch: int) -> LayerTiming | None:
        for e in self.layers:
            if e.key == (m, n, tokens, precision, batch):
                return e
        return None

    def batches(self, precision: str) -> tuple[int, ...]:
        return tuple(sorted({e.batch for e in self.layers if e.precision == precision}))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"] = SCHEMA
        d["layers"] = [asdict(e) for e in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        if d.get("schema") != SCHEMA:
            raise CompressError(f"latency table schema {d.get('schema')} is not {SCHEMA}; measure it again")
        layers = tuple(LayerTiming(**{**e, "widths": tuple(e["widths"]), "pair_ms": tuple(e["pair_ms"])})
                       for e in d["layers"])
        fields = {k: d[k] for k in ("model", "backend", "threads", "machine", "versions")}
        return cls(layers=layers, rest_ms=dict(d.get("rest_ms", {})),
                   dense_model_ms=dict(d.get("dense_model_ms", {})), repeats=d.get("repeats", 0),
                   measured=d.get("measured", ""), options=dict(d.get("options", {})), **fields)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_json(path, self.to_dict(), indent=1)


def rest_key(precision: str, batch: int) -> str:
    return f"{precision}@{batch}"


def load_table(path, model: str | None = None, backend: str = "ort") -> LatencyTable:
    """Read a table; a missing or unreadable file is a one-line error naming the command that measures it."""
    path = Path(path)
    hint = MEASURE_COMMAND.format(model=model or "MODEL", backend=backend)
    if not path.is_file():
        raise CompressError(f"no latency table at {path}; measure it with `{hint}`")
    try:
        return LatencyTable.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CompressError(f"{path} is not a latency table ({type(e).__name__}: {e}); measure it again with "
                            f"`{hint}`") from None


# ---- where a table lives ---------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("VIT_EDGE_CACHE", Path.home() / ".cache" / "vit-edge")) / "latency"


def cpu_identity() -> dict:
    """CPU model and its feature flags (what decides which kernels run), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        info = ""
    found: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip(), value.strip())   # the first CPU's lines
    model = found.get("model name") or found.get("Hardware") or platform.processor() or platform.machine()
    return {"cpu": model, "cpu_flags": sorted((found.get("flags") or found.get("Features") or "").split())}


def simd_flags(flags) -> list[str]:
    """The flags that name the vector/int8 kernels a runtime can pick (for reports)."""
    keep = ("avx", "vnni", "amx", "fma", "f16c", "asimd", "dotprod", "i8mm", "sve", "bf16")
    return [f for f in flags if any(k in f for k in keep)]


def gpu_names() -> list[str]:
    """"<name>, <driver>" per GPU (the form earlier tables' fingerprints were computed from)."""
    return [f"{g['name']}, {g['driver']}" for g in nvidia_smi_gpus()]


def library_versions() -> dict:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_identity(backend: str) -> dict:
    """CPU (model + flags), GPUs for GPU backends, and a short fingerprint of it all with the versions."""
    ident = cpu_identity()
    ident["gpus"] = gpu_names() if backend != "ort" else []
    blob = json.dumps([ident, backend, library_versions()], sort_keys=True).encode()
    ident["fingerprint"] = hashlib.sha256(blob).hexdigest()[:12]
    return ident


def default_table_path(model: str, backend: str = "ort", threads: int | None = None) -> Path:
    """The cached table of ``model`` on this machine, backend, runtime versions and thread count."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return cache_dir() / f"{safe}-{backend}-t{threads or 0}-{machine_identity(backend)['fingerprint']}.json"


# ---- what allocation asks -----------------------------------------------------------------

@dataclass(frozen=True)
class LatencyTarget:
    """A table at one precision, with the batch the budget is for: the latency model of allocation.

    ``layer_states(m, n, tokens, widths)`` -> times (ms) of [dense, widths...] at ``batch``;
    ``break_even(m, n, tokens, widths)`` -> the widths whose pair is faster than dense at every
    batch the table measured for this precision."""
    table: LatencyTable
    precision: str = "int8"
    batch: int = 1
    target_ms: float | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise CompressError(f"--latency-precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch not in self.table.batches(self.precision):
            raise CompressError(f"the latency table has no {self.precision} timings at batch {self.batch} "
                                f"(it has {list(self.table.batches(self.precision)) or 'none'}); measure it with "
                                f"`{MEASURE_COMMAND.format(model=self.table.model, backend=self.table.backend)}"
                                f" --batch-sizes {self.batch}`")
        if self.target_ms is not None and not self.target_ms > 0:
            raise CompressError(f"--target-latency-ms must be > 0, got {self.target_ms}")

    def _entry(self, m, n, tokens, batch) -> LayerTiming:
        e = self.table.entry(m, n, tokens, self.precision, batch)
        if e is None:
            raise CompressError(f"the latency table of {self.table.model} has no {self.precision} layer "
                                f"{m}x{n} with {tokens} tokens at batch {batch}; measure it for this model with "
                                f"`{MEASURE_COMMAND.format(model='MODEL', backend=self.table.backend)}`")
        return e

    def layer_states(self, m: int, n: int, tokens: int, widths) -> np.ndarray:
        e = self._entry(m, n, tokens, self.batch)
        return np.concatenate([[e.dense_ms], np.atleast_1d(e.pair(np.asarray(widths, float)))])

    def break_even(self, m: int, n: int, tokens: int, widths) -> list[int]:
        widths = np.asarray(widths, float)
        ok = np.ones(len(widths), bool)
        for b in self.table.batches(self.precision):
            e = self._entry(m, n, tokens, b)
            ok &= np.atleast_1d(e.pair(widths)) < e.dense_ms
        return [int(k) for k, good in zip(widths, ok) if good]

    def rest_ms(self, batch: int | None = None) -> float:
        return float(self.table.rest_ms.get(rest_key(self.precision, batch or self.batch), 0.0))

    def predict(self, layers, batch: int | None = None) -> float:
        """Model latency (ms) of plan layers (objects with out_features, in_features, tokens, width, dense)."""
        b = batch or self.batch
        total = self.rest_ms(b)
        for l in layers:
            e = self._entry(l.out_features, l.in_features, l.tokens, b)
            total += e.dense_ms if l.dense else e.pair(l.width)
        return float(total)

    def describe(self) -> dict:
        return {"model": self.table.model, "backend": self.table.backend, "threads": self.table.threads,
                "precision": self.precision, "batch": self.batch, "target_ms": self.target_ms,
                "machine": {"cpu": self.table.machine.get("cpu"),
                            "simd_flags": simd_flags(self.table.machine.get("cpu_flags", [])),
                            "gpus": self.table.machine.get("gpus"),
                            "fingerprint": self.table.machine.get("fingerprint")},
                "versions": self.table.versions}


def latency_target(table: str, model: str, precision: str = "int8", batch: int = 1,
                   target_ms: float | None = None, backend: str = "ort", threads: int | None = None) -> LatencyTarget:
    """``table``: a JSON path, or "auto" for this machine's cached table of ``model``."""
    if table == "auto":
        path = default_table_path(model, backend, threads)
        if not path.is_file():
            raise CompressError(f"no latency table of {model} for this machine in {cache_dir()}; measure it with "
                                f"`{MEASURE_COMMAND.format(model=model, backend=backend)}` (auto is the table at the "
                                "runtime's default thread count) or pass --latency-table PATH")
        table = path
    return LatencyTarget(load_table(table, model, backend), precision, batch, target_ms)
