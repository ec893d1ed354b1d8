"""Compressing to a latency budget measured on this machine, and the fidelity/latency sweep.

The search is checked two ways: with the real timer (a real build, timed here: the package
records the budget, the measured latency and every ratio tried, and validates), and with a
timer that reads the model's MACs (deterministic: the bisection must end at the least
pruning within the budget). Speed itself is a benchmark's business, not a test's."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from onnx import helper
from test_cli import assert_clean_error, sparsec

import zoo
from conftest import EXAMPLES
from sparsec import api, latency
from sparsec.analysis.cost import cost
from sparsec.errors import BadOptionError


def wide_mlp(rows: int = 32, d: int = 128, hidden: int = 512):
    rng = np.random.default_rng(0)
    n = helper.make_node
    inits = {"w1": rng.standard_normal((d, hidden)) / 8, "b1": rng.standard_normal(hidden),
             "w2": rng.standard_normal((hidden, d)) / 16}
    nodes = [n("MatMul", ["x", "w1"], ["h"]), n("Add", ["h", "b1"], ["hb"]),
             n("Relu", ["hb"], ["a"]), n("MatMul", ["a", "w2"], ["y"])]
    return zoo.make_model(nodes, [("x", [rows, d])], ["y"], inits)


class MacTimer:
    """Latency as a known function of the work: 1 ms per million MACs (the test's clock)."""

    def __init__(self, spec, feeds, scratch):
        self.calls = 0

    def __call__(self, graph) -> float:
        self.calls += 1
        return cost(graph).macs / 1e6


@pytest.mark.parametrize("speedup", [1.3, 2.0, 3.0])
def test_search_ends_at_the_least_pruning_within_the_budget(speedup, monkeypatch):
    monkeypatch.setattr(latency, "Timer", MacTimer)
    from sparsec.targets import resolve_target

    graph = api.load(wide_mlp())
    options = {k: v for k, v in api.Recipe().options().items()}
    options["calibration"] = None
    result, record, _ = latency.budget_search(graph, options, resolve_target("host"), None,
                                           speedup, log=lambda s: None)
    dense = cost(graph).macs / 1e6
    budget = dense / speedup
    assert record["budget_ms"] == pytest.approx(budget)
    assert cost(result.graph).macs / 1e6 <= budget
    within = [t for t in record["tried"] if t["ms"] <= budget]
    over = [t for t in record["tried"] if t["ms"] > budget]
    assert record["ratio"] == min(t["ratio"] for t in within) and record["ratio"] > 0
    # the bisection got close: within 5 % under the budget, or the ratio can't get finer
    resolution = 0.9 / 2 ** latency.SEARCH_STEPS
    assert (cost(result.graph).macs / 1e6 >= budget * (1 - latency.CLOSE_ENOUGH)
            or any(record["ratio"] - t["ratio"] <= resolution + 1e-9 for t in over))
    assert result.recipe.ratio == record["ratio"]


def test_compile_to_a_speedup_measures_the_package(tmp_path):
    out = tmp_path / "pkg"
    m = api.compile(wide_mlp(), out, speedup=1.5)
    lat = m["latency"]
    assert lat["budget_ms"] == pytest.approx(lat["dense_ms"] / 1.5)
    assert lat["measured_ms"] > 0 and lat["dense_ms_after"] > 0
    assert lat["tried"][0]["ratio"] <= lat["ratio"] <= 0.9
    chosen = [t for t in lat["tried"] if t["ratio"] == lat["ratio"]]
    assert chosen and chosen[0]["ms"] <= lat["budget_ms"]      # what the search accepted
    assert m["prune"]["recipe"]["ratio"] == lat["ratio"]        # the recipe re-runs it fixed
    assert m["prune"]["after"]["macs"] < m["prune"]["before"]["macs"]
    assert api.validate(out).ok


def test_prune_to_a_speedup_writes_the_model_it_measured(tmp_path):
    """``prune --speedup`` runs the compile's search on the target and writes the ONNX the
    search chose (channels rounded to the target's multiple); ONNX Runtime runs it; a cross
    target is refused with nothing written."""
    import onnx

    model = tmp_path / "m.onnx"
    model.write_bytes(wide_mlp().SerializeToString())
    out = tmp_path / "p.onnx"
    r = sparsec("prune", model, "-o", out, "--speedup", "1.5", "-q")
    assert r.returncode == 0, r.stderr
    assert "latency on host:" in r.stdout and "for a budget of" in r.stdout
    pruned = onnx.load(str(out))
    widths = [d.dims[1] for d in pruned.graph.initializer if d.name == "w1"]
    assert widths and widths[0] < 512 and widths[0] % 8 == 0
    result = api.prune(model, latency_budget=1e9, ratio=0.5)
    assert result.latency["ratio"] == 0.0 and result.latency["target"] == "host"
    assert result.report()["latency"]["budget_ms"] == 1e9
    from sparsec import reference

    reference.run(pruned, {"x": np.ones((32, 128), np.float32)})
    bad = tmp_path / "q.onnx"
    assert_clean_error(sparsec("prune", model, "-o", bad, "--speedup", "2", "--target",
                               "aarch64"), 6, "does not run on this machine")
    assert not bad.exists()


def test_budget_errors(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(wide_mlp().SerializeToString())
    out = tmp_path / "pkg"
    assert_clean_error(sparsec("compile", model, "-o", out, "--latency-budget", "1e-6", "-q"), 6,
                       "out of reach")
    assert not out.exists()
    assert_clean_error(sparsec("compile", model, "-o", out, "--speedup", "0.5"), 6, "> 1")
    assert_clean_error(sparsec("compile", model, "-o", out, "--speedup", "2", "--max-drop",
                               "0.1"), 6, "give one")
    assert_clean_error(sparsec("compile", model, "-o", out, "--speedup", "2", "--target",
                               "cuda"), 6, "does not run on this machine")
    assert not out.exists()
    with pytest.raises(BadOptionError, match="one of"):
        api.compile(model, out, speedup=2, latency_budget=1.0)


def test_sweep_writes_table_and_picture(tmp_path):
    out = tmp_path / "sweep"
    proc = sparsec("sweep", EXAMPLES / "digits_cnn.onnx", "-o", out, "--ratios", "0,0.25,0.5",
                   "--calib", EXAMPLES / "digits_calib.npz", "--sensitivity")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "sweep.json").read_text())
    rows = report["rows"]
    assert [(r["allocation"], r["ratio"]) for r in rows] == [
        (a, r) for a in ("uniform", "sensitivity") for r in (0, 0.25, 0.5)]
    assert rows[0]["cosine"] == pytest.approx(1.0) and rows[0]["ms"] == report["dense_ms"]
    uniform = [r for r in rows if r["allocation"] == "uniform"]
    assert uniform[2]["macs"] < uniform[1]["macs"] < uniform[0]["macs"]
    assert report["ort_ms"] > 0
    svg = ET.fromstring((out / "sweep.svg").read_text())
    lines = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and all(len(p.get("points").split()) == 3 for p in lines)
    assert "| sensitivity | 0.5 |" in (out / "sweep.md").read_text()
    assert_clean_error(sparsec("sweep", EXAMPLES / "digits_cnn.onnx", "-o", tmp_path / "s2",
                               "--ratios", "0,1.5"), 6, "ratios")


def test_knapsack_buys_the_cheapest_milliseconds_and_gives_back_overshoot():
    """Unit 'a' saves 1 ms per 0.01 of fidelity, 'b' 1 ms per 0.1: 'a' goes first. A step that
    overshoots is given back where the rest still reaches the need."""
    def unit(pattern, rows):
        return {"pattern": pattern, "rows": [{"level": lv, "saved_ms": ms, "distortion": d}
                                             for lv, ms, d in rows]}

    table = [unit("a", [(0.25, 1.0, 0.01), (0.5, 2.0, 0.02), (0.75, 3.0, 0.03)]),
             unit("b", [(0.25, 1.0, 0.10), (0.5, 2.0, 0.20), (0.75, 8.0, 0.30)])]
    plan, saved = latency.knapsack(table, 2.5)
    assert plan == {"a": 0.75} and saved == pytest.approx(3.0)
    plan, saved = latency.knapsack(table, 4.0)          # a is spent: b's cheapest step next
    assert plan == {"a": 0.75, "b": 0.25} and saved == pytest.approx(4.0)
    plan, saved = latency.knapsack(table, 9.0)         # b's jump to 0.75 (8 ms) overshoots:
    assert plan == {"a": 0.25, "b": 0.75} and saved == pytest.approx(9.0)   # a gives back
    assert latency.knapsack(table, 11.5) is None
    flat = [unit("c", [(0.25, -0.1, 0.0), (0.5, 0.0, 0.0)])]    # savings that never come
    assert latency.knapsack(flat, 0.05) is None


def test_units_address_one_group_each_by_its_own_weight():
    """Each unit's pattern reaches only its own group where the group has a weight of its
    own; weight names with glob characters are matched literally."""
    from fnmatch import fnmatchcase

    from sparsec.analysis.depgraph import DependencyGraph

    graph = api.load(zoo.squeeze_excite())
    dg = DependencyGraph(graph)
    table = latency.units(graph, {})
    prunable = [g for g in dg.groups if g.prunable]
    assert sorted(i for u in table for i in u["groups"]) == sorted(g.id for g in prunable)
    for u in table:
        reached = [g.id for g in prunable if any(fnmatchcase(s, u["pattern"]) for s in g.sources)]
        assert reached == u["groups"]
    assert fnmatchcase("a[0].w*", latency._literal("a[0].w*"))
    assert not fnmatchcase("a0.wx", latency._literal("a[0].w*"))


def test_per_group_widths_meet_the_budget_and_re_run_as_a_recipe(monkeypatch):
    """With sensitivity, the budget is spent per group from the latency table (MAC clock):
    the plan meets it, the record holds the prediction and the table, and the recipe (the
    plan as layer_ratios) rebuilds the same model without searching."""
    monkeypatch.setattr(latency, "Timer", MacTimer)
    from sparsec.targets import resolve_target

    model = EXAMPLES / "digits_cnn.onnx"
    graph = api.load(model)
    options = {**api.Recipe(criterion="fluctuation", sensitivity=True).options(),
               "calibration": str(EXAMPLES / "digits_calib.npz")}
    result, record, _ = latency.budget_search(graph, options, resolve_target("host"), None,
                                              2.0, log=lambda s: None)
    budget = record["budget_ms"]
    assert record["allocation"] == "latency" and record["ms"] <= budget
    assert cost(result.graph).macs / 1e6 == pytest.approx(record["ms"])
    assert len(record["table"]) >= 3 and all(len(u["rows"]) == len(latency.LEVELS)
                                             for u in record["table"])
    assert 0 < len(record["plan"]) <= len(record["table"])
    assert result.recipe.layer_ratios == record["plan"] and result.recipe.ratio == 0
    again = api.prune(model, recipe=result.recipe, calibration=options["calibration"])
    assert cost(again.graph).macs == cost(result.graph).macs
    assert again.fidelity.cosine == pytest.approx(result.fidelity.cosine)


def test_latency_table_is_cached_per_model_options_data_and_target(monkeypatch, tmp_path):
    """A second table for the same model, options, calibration data and target comes from the
    cache (no build timed), its savings rescaled to today's dense latency; other options or
    another target measure anew."""
    monkeypatch.setenv("SPARSEC_TUNING_CACHE", str(tmp_path / "tuning.json"))

    class CachedMacTimer(MacTimer):
        cache_key = "host"

    graph = api.load(EXAMPLES / "digits_cnn.onnx")
    options = {**api.Recipe().options(), "calibration": None}
    dense = cost(graph).macs / 1e6
    timer = CachedMacTimer(None, None, None)
    first = latency.latency_table(graph, options, timer, dense, lambda s: None)
    builds = timer.calls
    assert builds == len(first) * len(latency.LEVELS)
    again = latency.latency_table(graph, options, timer, 2 * dense, lambda s: None)
    assert timer.calls == builds
    assert [r["saved_ms"] for u in again for r in u["rows"]] == pytest.approx(
        [2 * r["saved_ms"] for u in first for r in u["rows"]])
    latency.latency_table(graph, {**options, "criterion": "l1"}, timer, dense, lambda s: None)
    assert timer.calls == 2 * builds
    CachedMacTimer.cache_key = "another target"
    latency.latency_table(graph, options, timer, dense, lambda s: None)
    assert timer.calls == 3 * builds


def test_a_plan_well_under_the_budget_is_scaled_back_toward_it(monkeypatch):
    """Coarse table levels make the knapsack's plan overshoot (here: one level, cutting 3/4
    of a group, and no feedback): the plan's cuts are then scaled back by one factor until
    the build lands in the band just under the budget (MAC clock: deterministic)."""
    monkeypatch.setattr(latency, "Timer", MacTimer)
    monkeypatch.setattr(latency, "LEVELS", (0.75,))
    monkeypatch.setattr(latency, "FEEDBACK_ROUNDS", 0)
    monkeypatch.setattr(latency, "KEPT_MULTIPLE", 1)   # the MAC clock has no vector width
    from sparsec.targets import resolve_target

    graph = api.load(EXAMPLES / "digits_cnn.onnx")
    options = {**api.Recipe(sensitivity=True).options(), "calibration": None}
    result, record, _ = latency.budget_search(graph, options, resolve_target("host"), None,
                                              1.15, log=lambda s: None)
    budget, builds = record["budget_ms"], record["builds"]
    assert builds[0]["ms"] < budget * (1 - 2 * latency.CLOSE_ENOUGH)     # the overshoot
    refined = [b for b in builds if b.get("refined")]
    assert 1 <= len(refined) <= latency.REFINE_STEPS
    assert budget * (1 - 2 * latency.CLOSE_ENOUGH) <= record["ms"] <= budget
    assert cost(result.graph).macs / 1e6 == pytest.approx(record["ms"])
    assert result.recipe.layer_ratios == record["plan"]
    assert all(0 < v < 0.75 for v in record["plan"].values())
    # fidelity first, near-ties to the least pruning
    within = [b for b in builds if b["ms"] <= budget]
    top = max(b["cosine"] for b in within)
    assert record["ms"] == max(b["ms"] for b in within if b["cosine"] >= top - latency.COSINE_TIE)


def test_scratch_of_a_killed_search_is_removed_by_the_next():
    """A budget search killed with -9 cannot clean its build directory: the next one removes
    directories whose PID is dead, and leaves a live run's alone."""
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = Path(tempfile.gettempdir()) / f"sparsec-latency-{dead.pid}-abcd"
    live = Path(tempfile.gettempdir()) / f"sparsec-latency-{os.getppid()}-abcd"
    for d in (left, live):
        d.mkdir(exist_ok=True)
        (d / "try1.so").write_bytes(b"x")
    try:
        with latency.scratch_dir("sparsec-latency") as tmp:
            assert Path(tmp).name.startswith(f"sparsec-latency-{os.getpid()}-")
            assert not left.exists() and live.exists()
        assert not Path(tmp).exists()
    finally:
        import shutil

        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(left, ignore_errors=True)


def test_scaled_cuts_keep_whole_vectors_of_channels():
    """A scaled-back cut keeps a multiple of 16 channels (never more cut than asked); heads
    and groups under two vectors keep the level they were given."""
    unit = {"kind": "channels", "channels": 512}
    assert latency._friendly(0.75, unit) == 0.75                    # 128 kept already
    assert latency._friendly(0.675, unit) == pytest.approx(1 - 176 / 512)   # 166.4 -> 176
    assert latency._friendly(0.01, unit) == 0.0                     # 506.9 -> 512: uncut
    assert latency._friendly(0.4, {"kind": "heads", "channels": 12}) == 0.4
    assert latency._friendly(0.4, {"kind": "channels", "channels": 24}) == 0.4
