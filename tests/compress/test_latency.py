"""compress.latency: the table as data, break-even widths, predictions, and allocation under a latency budget."""
import dataclasses
import json

import numpy as np
import pytest

from compress.allocate import Budget, LayerCurve, Plan, allocate
from compress.errors import CompressError
from compress.latency import (LatencyTable, LatencyTarget, LayerTiming, default_table_path, latency_target,
                              load_table, machine_identity, rest_key)

TOKENS = 50


def curve(full, decay):
    r = np.arange(full + 1)
    return tuple(float(v) for v in np.exp(-decay * r) - np.exp(-decay * full))


def timing(m, n, precision, batch, dense, overhead, per_width, step=8):
    """A synthetic layer: pair time = overhead + per_width * k (ms)."""
    be = (m * n - 1) // (m + n)
    widths = tuple(range(step, be + step, step))
    return LayerTiming(m, n, TOKENS, precision, batch, dense, widths, tuple(overhead + per_width * k for k in widths))


def table(batches=(1, 8)):
    layers = []
    for b in batches:
        # wide layer: pairs are cheap; square layer: a pair is faster only below width 40 at batch 1
        layers.append(timing(256, 64, "int8", b, dense=1.0 * b, overhead=0.1 * b, per_width=0.01 * b))
        layers.append(timing(64, 64, "int8", b, dense=0.5 * b, overhead=0.3 * b, per_width=0.005 * b))
    return LatencyTable(model="toy", backend="ort", threads=2, machine={"cpu": "toy", "cpu_flags": ["avx512_vnni"]},
                        versions={}, layers=tuple(layers),
                        rest_ms={rest_key("int8", b): 2.0 * b for b in batches})


def layers():
    return [LayerCurve("wide", 256, 64, True, curve(64, 0.05), tokens=TOKENS),
            LayerCurve("square", 64, 64, True, curve(64, 0.05), tokens=TOKENS)]


TOTAL = 10_000 + 256 * 64 + 256 + 64 * 64 + 64


def test_pair_time_interpolates_and_extrapolates():
    e = LayerTiming(10, 10, 1, "fp32", 1, 1.0, (8, 16, 24), (0.2, 0.4, 0.5))
    assert e.pair(12) == pytest.approx(0.3)
    assert e.pair(32) == pytest.approx(0.6)      # last slope
    assert e.pair(4) == pytest.approx(0.1)
    np.testing.assert_allclose(e.pair(np.array([8, 20])), [0.2, 0.45])
    with pytest.raises(CompressError, match="increasing"):
        LayerTiming(10, 10, 1, "fp32", 1, 1.0, (16, 8), (0.2, 0.4))


def test_table_round_trips_through_json(tmp_path):
    t = table()
    path = t.save(tmp_path / "t.json")
    assert load_table(path) == t
    assert json.loads(path.read_text())["schema"] == 1


def test_missing_or_bad_table_names_the_command(tmp_path):
    with pytest.raises(CompressError, match="python -m runtime latency-table --model toy"):
        load_table(tmp_path / "none.json", "toy")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CompressError, match="measure it again"):
        load_table(tmp_path / "bad.json", "toy")


def test_auto_table_is_looked_up_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_EDGE_CACHE", str(tmp_path))
    with pytest.raises(CompressError, match="python -m runtime latency-table --model toy --backend ort"):
        latency_target("auto", "toy")
    table().save(default_table_path("toy", "ort"))
    assert latency_target("auto", "toy").table.model == "toy"
    # the cache file is named by the machine and the backend
    assert machine_identity("ort")["fingerprint"] in default_table_path("toy", "ort").name
    assert default_table_path("toy", "ort", 2) != default_table_path("toy", "ort", 1)


def test_target_batch_must_be_measured():
    with pytest.raises(CompressError, match="no int8 timings at batch 4"):
        LatencyTarget(table(), "int8", 4)
    with pytest.raises(CompressError, match="no fp32 timings"):
        LatencyTarget(table(), "fp32", 1)


def test_break_even_holds_at_every_measured_batch():
    t = table()
    lt = LatencyTarget(t, "int8", 1)
    # square: 0.3 + 0.005 k < 0.5  <=>  k < 40 (at both batches, scaled alike)
    assert lt.break_even(64, 64, TOKENS, [8, 32, 48, 56]) == [8, 32]
    # make batch 8 slower for width 32: it must be dropped even though batch 1 allows it
    slow = [dataclasses.replace(e, pair_ms=tuple(p * (1.3 if e.batch == 8 and e.out_features == 64 else 1)
                                                for p in e.pair_ms)) for e in t.layers]
    lt8 = LatencyTarget(dataclasses.replace(t, layers=tuple(slow)), "int8", 1)
    assert lt8.break_even(64, 64, TOKENS, [8, 16, 32]) == [8, 16]


def test_parameter_budget_respects_the_latency_break_even():
    plain = allocate(layers(), TOTAL, Budget("ratio", 0.3))
    aware = allocate(layers(), TOTAL, Budget("ratio", 0.3), latency=LatencyTarget(table(), "int8", 1))
    sq = {l.name: l for l in aware.layers}["square"]
    assert sq.dense or sq.width < 40
    assert aware.params_after <= aware.target_params
    lat = aware.latency
    assert lat["precision"] == "int8" and set(lat["predicted_ms"]) == {"1", "8"}
    assert lat["predicted_ms"]["1"] < lat["dense_predicted_ms"]["1"]
    assert lat["dense_predicted_ms"]["1"] == pytest.approx(2.0 + 1.0 + 0.5)
    assert plain.latency is None
    assert Plan.from_dict(json.loads(json.dumps(aware.to_dict()))) == aware


def test_latency_budget_alone_and_combined():
    lt = LatencyTarget(table(), "int8", 1, target_ms=3.0)
    plan = allocate(layers(), TOTAL, Budget("latency", 3.0), latency=lt)
    assert plan.latency["predicted_ms"]["1"] <= 3.0 + 1e-9
    assert plan.latency["target_ms"] == 3.0
    # a looser target keeps more parameters (less error) than a tight one
    loose = allocate(layers(), TOTAL, Budget("latency", 3.3), latency=dataclasses.replace(lt, target_ms=3.3))
    assert loose.params_after >= plan.params_after and loose.predicted_error <= plan.predicted_error
    # combined with a parameter budget, both hold
    both = allocate(layers(), TOTAL, Budget("ratio", 0.5), latency=lt)
    assert both.params_after <= both.target_params and both.latency["predicted_ms"]["1"] <= 3.0 + 1e-9


def test_unreachable_latency_budget_is_one_clear_error():
    lt = LatencyTarget(table(), "int8", 1, target_ms=2.1)  # the rest alone takes 2.0 ms
    with pytest.raises(CompressError, match="cannot be met.*2.00 ms of it outside the Linears"):
        allocate(layers(), TOTAL, Budget("latency", 2.1), latency=lt)
    with pytest.raises(CompressError, match="needs a latency table"):
        allocate(layers(), TOTAL, Budget("latency", 3.0))
    with pytest.raises(CompressError, match="target-latency-ms must be positive"):
        Budget("latency", -1)
