"""The methods suite: method configs, the linear probe, FLYP's text head, and benchmarks/paper.py end to end
on the tiny embedded world (the default) and on the real datasets' tiny format fixtures."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from autoft import methods
from autoft.finetune import CONF_DIR, build, evaluate
from autoft.methods import feature_file, fit_linear_probe, logistic_regression, search_overrides
from autoft.model import CLIPClassifier, load_clip
from tests import forkserver
from tests.conftest import TINY_PRETRAIN, TINY_WORLD, overrides
from tests.inprocess import subprocess_in_process
from tests.test_datasets import NAMES, WRITERS

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp", "autoft"]
# The reference code's autoft/hparams/iwildcam.json (github.com/cchoi1/auto-ft), checked key by key.
PUBLISHED_IWILDCAM = {"ce": 1.0, "dcm": 0.6223533993940668, "entropy": 0.0004681301224610,
                      "flyp": 1.9056561834926824, "hinge": 0.00015961210291135, "l1init": 0.00154953790283812,
                      "l1zero": 0.00019307479126688, "l2init": 0.0001726603186429, "l2zero": 0.0001090242975318}


def _compose(*extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("benchmark", overrides=["study=test", "output_dir=/nonexistent", *extra])


# ---------------------------------------------------------------------------------------- configs

def test_each_method_config_sets_its_published_recipe():
    cfg = {m: _compose(f"method={m}") for m in METHODS}
    assert [cfg[m].method.name for m in METHODS] == METHODS
    assert not cfg["zeroshot"].method.train and not cfg["lp"].method.train and cfg["lp"].method.linear_probe
    assert cfg["lpft"].method.train and cfg["lpft"].method.linear_probe
    assert dict(cfg["ft"].objective.weights) == {"ce": 1.0} and cfg["ft"].optim.weight_decay == 0.1
    assert cfg["ft"].optim.lr == cfg["ft"].model.lr0 == 3e-4
    assert dict(cfg["l2sp"].objective.weights) == {"ce": 1.0, "l2init": 0.05} and cfg["l2sp"].optim.weight_decay == 0
    assert dict(cfg["flyp"].objective.weights) == {"ce": 0.0, "flyp": 1.0}
    assert cfg["flyp"].model.train_text and cfg["flyp"].model.text_head
    assert cfg["autoft"].method.search == "embedded"  # the embedded world's own search config
    assert _compose("method=autoft", "dataset=iwildcam").method.search == "autoft"
    assert _compose("method=ft", "model=vit_b16").optim.lr == 1e-5
    for m in METHODS:  # the suite's budget is the dataset's (embedded: 6 epochs, warmup 20)
        assert cfg[m].trainer.max_epochs == 6 and cfg[m].optim.warmup_steps == 20 and cfg[m].optim.schedule == "cosine"


def test_published_autoft_objective_skips_the_search_with_its_lr_and_weight_decay():
    cfg = _compose("method=autoft", "method.search=null", "objective=autoft_iwildcam", "model=vit_b16")
    assert dict(cfg.objective.weights) == PUBLISHED_IWILDCAM
    assert cfg.optim.lr == 0.0001362453128517931 and cfg.optim.weight_decay == 0.604213756042692
    for name in ("fmow", "imagenet"):
        weights = _compose(f"objective=autoft_{name}").objective.weights
        assert set(weights) == set(PUBLISHED_IWILDCAM) and weights.ce == 1.0
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # also plain fine-tuning runs
        assert compose("finetune", overrides=["objective=autoft_fmow"]).optim.lr == 2.519719900061502e-05


def test_search_overrides_keep_data_and_model_take_the_budget_and_let_the_method_win():
    cfg = _compose("method=autoft", "seed=2", 'method.search_overrides=["dataset.world.seed=1","search.eval_every=5"]')
    got = search_overrides(cfg, ["method=autoft", "seed=2", "dataset.world.seed=0", "model.pretrain.steps=3",
                                 "trainer.max_epochs=1", "optim.lr=0.1", "logger=csv"])
    assert got[0] == "search=embedded"
    assert "model.pretrain.steps=3" in got and "logger=csv" in got
    assert not any(o.split("=")[0] in ("method", "seed", "trainer.max_epochs", "optim.lr") for o in got)
    assert "dataset.world.seed=1" in got and "dataset.world.seed=0" not in got  # the source task wins
    assert {"hydra.sweeper.n_trials=20", "search.inner_steps=50", "hydra.sweeper.sampler.seed=2",
            "hydra/sweeper/sampler=tpe", "search.eval_every=5"} <= set(got)


# ------------------------------------------------------------------------------------ linear probe

def test_logistic_regression_fits_separable_data_and_the_penalty_shrinks_weights():
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    y = torch.arange(90) % 3
    x = F.normalize(centers[y] + 0.05 * torch.randn(90, 8, generator=gen), dim=-1)
    w, b = logistic_regression(x, y, 3, reg=1e-6, max_iter=200)
    assert ((x @ w.T + b).argmax(-1) == y).all()
    w_strong, _ = logistic_regression(x, y, 3, reg=1e-1, max_iter=200)
    assert w_strong.norm() < 0.5 * w.norm()


def test_linear_probe_uses_cached_unaugmented_features_and_picks_the_penalty_on_id_val(tmp_path, monkeypatch):
    import autoft.methods as methods

    cfg = _compose(*overrides(), "method=lp")
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    model, data = build(cfg)
    # Each penalty's fit is rigged so that one, neither the first nor the last tried, is best on ID val by a
    # margin: at that penalty a fit to the ID val features themselves, at every other a constant guess (class 0).
    order = sorted(cfg.lp.regs, reverse=True)
    winner, real_fit = order[2], methods.logistic_regression
    val = methods.frozen_features(cfg, model, data, "val_id")

    def rigged(x, y, n_classes, reg, max_iter, init=None):
        if reg == winner:
            return real_fit(val["features"], val["y"], n_classes, 1e-6, max_iter)
        return torch.zeros(n_classes, x.shape[1]), F.one_hot(torch.tensor(0), n_classes).float()

    monkeypatch.setattr(methods, "logistic_regression", rigged)
    probe = fit_linear_probe(cfg, model, data)
    cached = torch.load(feature_file(cfg, "train"), weights_only=True)
    assert len(cached["features"]) == TINY_WORLD["n_train"]
    with torch.no_grad():  # the same features as the model's on the eval-transformed images, in order
        x, y, _ = next(data.plain_batches("train"))
        torch.testing.assert_close(cached["features"][: len(x)], model.image_features(x))
        assert torch.equal(cached["y"][: len(y)], torch.as_tensor(y))
    # the premise (the winner's fit scores above the constant guess on ID val), then the pick and its score
    n_classes = model.head.out_features

    def val_score(reg: float) -> float:
        w, b = rigged(cached["features"], cached["y"], n_classes, reg, cfg.lp.max_iter)
        return data.evaluate((val["features"] @ w.T + b).argmax(-1), val["y"], val["metadata"])["F1-macro_all"]

    assert val_score(winner) > val_score(order[0]), "premise"
    assert probe["reg"] == winner
    scores = evaluate(cfg, model, data, keys=("val_id", "val_ood"))  # what the Lightning evaluation gives
    assert scores["val_id/F1-macro_all"] == pytest.approx(probe["val_id"])
    probed = model.head.weight.detach().clone()
    fresh, _ = build(cfg)
    monkeypatch.setattr(type(data), "plain_batches", lambda *a, **k: pytest.fail("features recomputed"))
    assert fit_linear_probe(cfg, fresh, data) == probe  # from the cache, same answer
    assert torch.equal(fresh.head.weight, probed)


# ----------------------------------------------------------------------------------------- FLYP head

def test_text_head_is_rebuilt_from_the_current_text_tower_on_eval():
    torch.manual_seed(0)
    clip, _, _, tok = load_clip("autoft-tiny", None)
    names, templates = ["fox", "deer", "heron"], ["a photo of a {}.", "a {} in the wild."]
    model = CLIPClassifier(clip, tok, names, templates, train_text=True, text_head=True)
    initial = model.head.weight.detach().clone()
    assert not model.head.weight.requires_grad
    model.eval()
    torch.testing.assert_close(model.head.weight, initial)  # same text tower: the zero-shot head
    with torch.no_grad():
        clip.text_projection.mul_(1.5).add_(0.01)
    model.train()
    torch.testing.assert_close(model.head.weight, initial)  # only eval mode rebuilds it
    model.eval()
    with torch.no_grad():  # independently: full 77-token prompts through open_clip's encode_text
        for k, name in enumerate(names):
            emb = F.normalize(clip.encode_text(tok([t.format(name) for t in templates])), dim=-1)
            torch.testing.assert_close(model.head.weight[k], F.normalize(emb.mean(0), dim=-1) * clip.logit_scale.exp())
    assert not torch.allclose(model.head.weight, initial)


# ----------------------------------------------------------------------------------- paper.py suite

# benchmarks/paper.py as `python benchmarks/paper.py ARGS` runs it, but the `python -m autoft.methods` command it
# starts is forked by the fork server too (a fresh interpreter: ~11 s of imports), with paper.py's fds
PAPER_FORKED = """
import sys
sys.path.insert(0, sys.argv.pop(1))
from benchmarks import paper
from tests import forkserver

paper.subprocess = forkserver.as_subprocess_module()
sys.exit(paper.main())
"""


def _paper(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """benchmarks/paper.py as a command: its own process and the processes it starts (the process boundary)."""
    script = tmp_path / "paper_forked.py"
    script.write_text(PAPER_FORKED)
    cmd = [sys.executable, str(script), str(ROOT), "--out", str(tmp_path / "paper"), *args]
    env = {**os.environ, **(env or {}), forkserver.JOBS_ENV: forkserver.server().path}
    return forkserver.run(cmd, cwd=tmp_path, env=env)  # forked: tests/forkserver.py


@pytest.fixture
def paper_here(tmp_path, monkeypatch) -> Callable[..., int]:
    """benchmarks/paper.py's main in this process, and the `python -m autoft.methods` sweeps and AutoFT searches
    it launches too (tests/inprocess.py): the same code and command lines without a new interpreter each, whose
    imports were most of these tests' time. Returns the command's exit status."""
    from benchmarks import paper

    monkeypatch.setattr(paper, "subprocess", subprocess_in_process())
    monkeypatch.setattr(methods, "subprocess", subprocess_in_process())
    monkeypatch.chdir(tmp_path)

    def run(*args: str, out: Path | None = None, env: dict | None = None) -> int:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        return paper.main(["--out", str(out or tmp_path / "paper"), *args])

    return run


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


TINY_SUITE = [
    *(f"dataset.world.{k}={v}" for k, v in TINY_WORLD.items()),
    *(f"model.pretrain.{k}={v}" for k, v in TINY_PRETRAIN.items()),
    "dataset.batch_size=16", "dataset.ood_val_size=40", "dataset.budget.final_epochs=1",
    "dataset.budget.warmup_steps=2", "dataset.budget.trials=2", "dataset.budget.inner_steps=3",
    'method.search_overrides=["search.eval_every=3"]', "logger=csv"]


@pytest.mark.long(82)
def test_wilds_table_on_the_embedded_world_every_method_two_seeds(tmp_path, tiny_world, paper_here):
    # two seeds (the command's default is three): mean and std over seeds are asserted all the same
    assert paper_here("wilds", *TINY_SUITE, "--seeds", "0", "1") == 0
    out = tmp_path / "paper"
    rows = {r["method"]: r for r in _csv(out / "wilds" / "table.csv")}
    trained = ["ft", "lpft", "l2sp", "flyp", "autoft"]
    assert list(rows) == METHODS + [f"{m}+wise" for m in ["lp", *trained]]
    runs = out / "runs" / "embedded-tiny_clip"
    for m in METHODS:
        records = [json.loads((runs / f"{m}-seed{s}" / "method.json").read_text()) for s in (0, 1)]
        assert rows[m]["seeds"] == "0 1"
        assert rows[m]["id_per_seed"] == " ".join(f"{r['id']:.4f}" for r in records)
        assert float(rows[m]["ood_mean"]) == pytest.approx(np.mean([r["ood"] for r in records]))
        assert float(rows[m]["ood_std"]) == pytest.approx(np.std([r["ood"] for r in records], ddof=1))
        for r in records:  # WiSE-FT at alpha 0 is the zero-shot model, whatever the method
            zs = json.loads((runs / f"zeroshot-seed{r['seed']}" / "method.json").read_text())
            assert r["wise"][0]["id"] == pytest.approx(zs["id"]) and r["wise"][0]["ood"] == pytest.approx(zs["ood"])
            assert r["wise"][-1]["id"] == pytest.approx(r["id"])  # alpha 1: the method itself
        if m in trained:
            assert all(r["seconds"] > 0 for r in records)
    for s in (0, 1):  # seed k runs in world k, with that world's own pretrained tiny CLIP
        assert yaml.safe_load((runs / f"zeroshot-seed{s}" / ".hydra" / "config.yaml").read_text())["dataset"]["world"][
            "seed"] == s
    assert (runs / "autoft-seed1" / "search" / "optuna.db").is_file()
    table = (out / "wilds" / "table.md").read_text()
    assert "no published figure applies" in table and "| FLYP + WiSE-FT (α=0.5) |" in table
    assert (out / "wilds" / "embedded-id-vs-ood.png").read_bytes()[:4] == b"\x89PNG"
    # the same command again reuses every job: nothing retrains, nothing is rewritten
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/method.json")}
    assert paper_here("wilds", *TINY_SUITE, "--seeds", "0", "1") == 0
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/method.json")} == stamps
    # ... and a changed configuration in the same runs folder is refused, not written over: the command and the
    # sweep it starts in their own processes, as a user runs them (exit status, one error line)
    clash = _paper(tmp_path, "wilds", *TINY_SUITE, "optim.lr=0.1", "--methods", "ft", "--seeds", "0", "1")
    assert clash.returncode == 2 and "holds another configuration's results" in clash.stderr
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/method.json")} == stamps


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures") / "data"
    rng = np.random.default_rng(0)
    for write in WRITERS.values():
        write(root, copy.deepcopy(rng))
    return root


@pytest.fixture(scope="module")
def fixture_paper(tmp_path_factory) -> Path:
    """One --out folder for every comparison below, as a user's: a job already done with the same configuration
    is reused (the wilds comparison's ft and autoft jobs on iWildCam and FMoW serve val-set and
    objective-transfer), which the comparisons share a worker for (xdist_group)."""
    return tmp_path_factory.mktemp("fixtures-paper") / "paper"


# Fixture-sized settings: the random tiny CLIP, 1 epoch, searches of 2 trials of 2 steps.
FIXTURE = ["model.pretrained=null", "~model.pretrain", "dataset.batch_size=8", "dataset.eval_batch_size=8",
           "dataset.num_workers=0", "trainer.max_epochs=1", "optim.warmup_steps=1",
           'method.search_overrides=["hydra.sweeper.n_trials=2","search.inner_steps=2","search.eval_every=2"]',
           "logger=csv"]


@pytest.mark.xdist_group("paper-fixtures")
@pytest.mark.parametrize("comparison, options, extra", [
    ("wilds", [], ["dataset.ood_val_size=4"]),
    ("imagenet", ["--methods", "zeroshot", "lp", "autoft"],
     ["dataset.ood_val_size=6", "dataset.id_val_size=4", "dataset.corruptions=[fog,snow]",
      f"dataset.class_names=[{','.join(map(repr, NAMES))}]"]),
    ("fewshot", ["--datasets", "pcam-4shot", "sst2-4shot", "--methods", "ft", "autoft"], []),
    # Flowers102's md5 check (torchvision) cannot pass on a fixture; test_datasets patches it in-process
    ("transfer", ["--datasets", "caltech101", "stanford_cars", "--methods", "lpft", "flyp"],
     ["dataset.ood_val_size=3"]),
    ("objective-transfer", [], ["dataset.ood_val_size=4"]),
    ("val-set", [], ["dataset.ood_val_size=4"]),
    ("sampler", ["--methods", "autoft-random", "autoft-qmc"], ["dataset.ood_val_size=4"]),
])
def test_paper_commands_run_end_to_end_on_the_real_format_fixtures(fixture_data, fixture_paper, paper_here, comparison,
                                                                    options, extra):
    # overrides first: the list-valued options (--seeds, --methods, --datasets) take every word after them
    out = fixture_paper
    assert paper_here(comparison, *FIXTURE, *extra, "--paper", "--model", "tiny_clip", *options, "--seeds", "0",
                      out=out, env={"AUTOFT_DATA": str(fixture_data)}) == 0
    rows = _csv(out / comparison / "table.csv")
    assert rows and all(r["seeds"] == "0" and 0.0 <= float(r["id_mean"]) <= 1.0 for r in rows)
    table = (out / comparison / "table.md").read_text()
    if comparison == "wilds":
        assert {r["dataset"] for r in rows} == {"iwildcam", "fmow"}
        flyp = next(r for r in rows if r["dataset"] == "iwildcam" and r["method"] == "flyp")
        assert (flyp["published_id"], flyp["published_ood"]) == ("52.2", "35.6")  # beside ours
        assert "| 52.2 | 35.6 (FLYP, ViT-B/16) |" in table
        assert (out / "wilds" / "fmow-id-vs-ood.png").is_file()
    if comparison == "objective-transfer":  # the transferred objective was searched on iWildCam
        search = out / "runs" / "fmow-tiny_clip" / "autoft-transfer-seed0" / "search"
        given = yaml.safe_load((search / "multirun.yaml").read_text())["hydra"]["overrides"]
        assert "dataset=iwildcam" in given["task"] and "dataset=fmow" not in given["task"]
        assert "hydra.sweeper.n_trials=2" in given["hydra"]  # the user's search settings kept beside the variant's
    if comparison == "val-set":  # the ID-val variant's search returns val_id; the plain one val_ood
        runs = out / "runs" / "iwildcam-tiny_clip"
        tasks = {m: yaml.safe_load((runs / f"{m}-seed0" / "search" / "multirun.yaml").read_text())
                 ["hydra"]["overrides"]["task"] for m in ("autoft", "autoft-idval")}
        assert "returns=[val_id]" in tasks["autoft-idval"] and not any("returns" in o for o in tasks["autoft"])
    if comparison in ("fewshot", "transfer"):
        assert "No OOD test set" in table and all(r["ood_mean"] == "" for r in rows)


def test_each_method_run_is_a_wandb_run_in_its_study_named_and_typed_by_method(tmp_path):
    from autoft.methods import run

    for method in ("zeroshot", "lp"):
        cfg = _compose(*overrides(), f"method={method}", "logger=wandb", "study=embedded-study")
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / method)
        record = run(cfg, [])
        assert record["method"] == method and record["study"] == "embedded-study"
        log = next((tmp_path / method / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
        # group = study, name = method-seed, job_type = method: W&B filters runs by any of them
        assert b"embedded-study" in log and f"{method}-seed0".encode() in log
        assert f'{{"name":"{method}"'.encode() in log  # the method's config is in the run's config
