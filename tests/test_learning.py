"""Learning regression checks: fine-tuning learns, and on the full embedded world, the two effects behind its results.

In make test (seconds): benchmarks/learning_regression.py's run on its seed 0, a small embedded world whose tiny
CLIP is pretrained for 40 steps; zero-shot, FT with conf/method/ft's recipe, WiSE-FT at alpha 0.5. The tolerance
comes from that script's 3-seed measurement, benchmarks/results/2026-11-30-cpu/learning_regression.json. Only "FT
above zero-shot on ID" holds there as a claim about learning: a CLIP pretrained for seconds is no foundation model
(its zero-shot macro-F1 is near 0: it predicts one class), so FT's OOD gain is nearly nil because 40 steps learn
little that transfers, not because of the camera shortcut, and WiSE-FT's midpoint differs from FT by noise.

Marked ``slow`` (minutes; ``make test-slow``, which .ci/run runs after make test): the camera shortcut costing FT
on OOD and WiSE-FT's midpoint above FT on OOD, on the full embedded world with its fully pretrained tiny CLIP, the
world the README's results come from. It runs paper.py's own FT job of seed 0 and compares it with the committed
3-seed runs of that table (benchmarks/results/2026-11-30-embedded/wilds/runs), open_clip's way: a stored reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import learning_regression as lr

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks/results/2026-11-30-cpu/learning_regression.json"
FULL_RUNS = ROOT / "benchmarks/results/2026-11-30-embedded/wilds/runs"  # paper.py wilds, seeds 0 1 2


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def seed0(tmp_path_factory) -> dict:
    return lr.measure(0, tmp_path_factory.mktemp("learning"))


def test_the_reference_was_measured_on_this_configuration(reference):
    assert reference["world"] == lr.WORLD and reference["pretrain"] == lr.PRETRAIN
    assert reference["overrides"] == lr.OVERRIDES and [r["seed"] for r in reference["per_seed"]] == [0, 1, 2]


@pytest.mark.long(22)
def test_fine_tuning_beats_zero_shot_on_id(seed0, reference):
    gain = lr.effects(seed0)["ft_minus_zs_id"]
    # Seeds 0-2 measured FT - zero-shot on ID test (macro-F1) of +0.0837..+0.0844 (the JSON's effects.ft_minus_zs_id,
    # std 0.0004); half the smallest is the bound, 100x the seed spread below it. Fine-tuning that does not learn
    # fails (lr 0: gain 0.0); a weaker lr need not (lr x 0.3 passed): the check is "learns", not "learns as much".
    bound = reference["effects"]["ft_minus_zs_id"]["min"] / 2
    assert bound > 0.02  # the premise: the measured effect is well above nothing
    assert gain > bound, (gain, seed0)


@pytest.fixture(scope="module")
def full_reference() -> list[dict]:
    return [json.loads((FULL_RUNS / f"ft-seed{s}.json").read_text()) for s in (0, 1, 2)]


@pytest.mark.slow
def test_on_the_full_world_the_shortcut_costs_ft_on_ood_and_wise_ft_gains_it_back(tmp_path, full_reference):
    from benchmarks import paper

    out = tmp_path / "paper"
    assert paper.main(["wilds", "--methods", "ft", "--seeds", "0", "--out", str(out),
                       "+trainer.enable_progress_bar=false"]) == 0
    record = json.loads((out / "runs" / "embedded-tiny_clip" / "ft-seed0" / "method.json").read_text())
    ours, stored = lr.from_method_record(record), [lr.from_method_record(r) for r in full_reference]
    got, per_seed = lr.effects(ours), [lr.effects(r) for r in stored]
    # Seeds 0-2 of the reference (each its own world and pretraining) measured, macro-F1 on the test splits:
    # FT - zero-shot on ID +0.157..+0.192; ID gain - OOD gain (the shortcut) +0.147..+0.158; WiSE-FT(0.5) - FT on
    # OOD +0.007..+0.034. The bounds are half the smallest seed's, as in the small-world check: a fine-tuning that
    # learns no shortcut (OOD gaining as ID does) or a WiSE-FT that is no better than its end point fails.
    for name, value in got.items():
        bound = min(e[name] for e in per_seed) / 2
        assert bound > 0, (name, per_seed)  # the premise: every reference seed shows the effect
        assert value > bound, (name, value, bound, record)
    # Drift: seed 0's own figures against the stored ones, within the spread over the reference's seeds (the
    # same job reproduced all six exactly on 2026-12-01, on this code; another CPU's float order may move them).
    for arm in ("zero_shot", "ft", "wise_0.5"):
        for split in lr.SPLITS:
            values = [r[arm][split] for r in stored]
            assert abs(ours[arm][split] - values[0]) <= max(values) - min(values), (arm, split, ours, stored[0])
