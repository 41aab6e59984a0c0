"""benchmarks/proxy_fidelity.py: its sampling follows the sweeper's space and seed; its statistics are right."""

from __future__ import annotations

import argparse

import pytest
from scipy import stats

from benchmarks import proxy_fidelity as pf


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(collapse_margin=0.05, pinned_fraction=0.1, **kw)


def test_sampled_objectives_follow_the_search_space_and_its_seed():
    a = pf.sample_points("embedded", [], [], 5, seed=3)
    b = pf.sample_points("embedded", [], [], 5, seed=3)
    c = pf.sample_points("embedded", [], [], 5, seed=4)
    assert a == b and a != c
    space = pf.search_space("embedded", [])
    for params in a.values():
        assert set(params) == set(space.distributions)
        for name, dist in space.distributions.items():
            assert dist._contains(dist.to_internal_repr(params[name]))
    replaced = pf.sample_points("embedded", [], ["optim.lr=tag(log, interval(1e-9, 1e-8))"], 5, seed=3)
    assert all(1e-9 <= p["optim.lr"] <= 1e-8 for p in replaced.values())


def test_overrides_reach_each_objective_process_wherever_they_stand_on_the_command_line(tmp_path):
    # a greedy --schedules once swallowed the overrides: every run silently used the default world
    for argv in (["a.b=1", "--out", str(tmp_path), "--schedules", "constant", "cosine"],
                 ["--out", str(tmp_path), "--budgets", "5", "--", "a.b=1"]):
        args = pf.parse_args(argv)
        child = pf.parse_args(["--point", "s00", *pf.child_argv(args)])
        assert child.overrides == args.overrides == ["a.b=1"]
        assert (child.schedules, child.budgets, child.point) == (args.schedules, args.budgets, "s00")
    with pytest.raises(SystemExit):
        pf.parse_args(["--out", str(tmp_path), "--schedules", "constant", "a.b=1"])


def test_named_points_take_the_methods_recipes():
    points = pf.named_points("embedded", [], [], seed=7)
    assert points["ft"]["optim.lr"] == pytest.approx(3e-4) and points["ft"]["objective.weights.l2init"] == 0.0
    assert points["l2sp"]["objective.weights.l2init"] == 0.05 and points["l2sp"]["optim.weight_decay"] == 0.0
    assert points["ce+flyp"]["objective.weights.flyp"] == 1.0
    assert points["robust"]["objective.weights.flyp"] == 0.5 and points["robust"]["objective.weights.l2init"] == 0.01
    assert all(p["seed"] == 7 for p in points.values())


def _row(score, val_id, moved, final_ood, final_moved=1.0):
    return {"params": {}, "inner": {"cosine-50": {"score": score, "val_id": val_id, "moved": moved, "seconds": 2.0}},
            "final": {"test_id": 0.8, "test_ood": final_ood, "val_id": val_id, "moved": final_moved}}


def test_summary_ranks_collapses_and_pins_as_defined():
    zs = {"val_id": 0.70, "score": 0.60}
    rows = {"ft": _row(0.62, 0.85, 10.0, 0.66, 10.0),
            "s00": _row(0.50, 0.60, 12.0, 0.55, 12.0),   # collapsed: ID val 10 points below zero-shot
            "s01": _row(0.61, 0.71, 0.5, 0.60, 0.5),     # pinned: moved 5% of FT's distance
            "s02": _row(0.64, 0.86, 9.0, 0.68, 9.0),
            "s03": _row(0.63, 0.80, 8.0, 0.61, 8.0)}
    summary = pf.summarise(rows, zs, _args())
    run = summary["runs"]["cosine-50"]
    sampled = ["s00", "s01", "s02", "s03"]
    x = [rows[n]["inner"]["cosine-50"]["score"] for n in sampled]
    y = [rows[n]["final"]["test_ood"] for n in sampled]
    assert run["sampled"]["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert run["sampled"]["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert run["sampled"]["n"] == 4 and run["all"]["n"] == 5
    kept = ["s01", "s02", "s03"]  # s00 collapsed in its final run: out of the region a search picks from
    assert run["not_collapsed"]["n"] == 3 and run["not_collapsed"]["spearman"] == pytest.approx(stats.spearmanr(
        [rows[n]["inner"]["cosine-50"]["score"] for n in kept], [rows[n]["final"]["test_ood"] for n in kept]).statistic)
    assert run["collapsed"] == 0.25 and run["pinned"] == 0.25
    assert summary["final"]["collapsed"] == 0.25 and summary["final"]["pinned"] == 0.25


def test_a_diverged_inner_run_counts_as_collapsed_and_is_left_out_of_the_ranks():
    zs = {"val_id": 0.70, "score": 0.60}
    rows = {"ft": _row(0.62, 0.85, 10.0, 0.66), "s00": _row(0.64, 0.86, 9.0, 0.68), "s01": _row(0.63, 0.80, 8.0, 0.61),
            "s02": _row(0.61, 0.75, 7.0, 0.65)}
    rows["s00"]["inner"]["cosine-50"] |= {"score": None, "val_id": None, "moved": None}
    run = pf.summarise(rows, zs, _args())["runs"]["cosine-50"]
    assert run["sampled"]["n"] == 2 and run["collapsed"] == pytest.approx(1 / 3)
