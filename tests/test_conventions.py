"""The objective's two conventions: each term against formulas written here, independently of autoft/objective.py
(float64, relative tolerance 1e-10), the published configs, the reference's model requirements, and the converter."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from torch import nn

from autoft import UserError
from autoft.conventions import (
    configured_requirements,
    convert,
    model_parameter_count,
    objective_settings,
    parameter_count,
    reference_requirements,
)
from autoft.finetune import CONF_DIR
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import LOSS_TERMS, NORM_TERMS, CompositeObjective
from tests import forkserver

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-10
SCALE = {"l1init": 0.5, "l2init": 3.0, "l1zero": 0.25, "l2zero": 2.0}  # ours: not 1.0, so that it must flow


# ------------------------------------------------------------------ a small model and the formulas, written here

class Small(nn.Module):
    """Image tower, head, text tower, logit_scale (log), and a frozen parameter: the reference normalizes
    by every parameter's elements, trained or not."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Parameter(torch.randn(4, 6, generator=g, dtype=torch.float64))
        self.head = nn.Parameter(torch.randn(5, 4, generator=g, dtype=torch.float64))
        self.text = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.log_scale = nn.Parameter(torch.tensor(math.log(3.0), dtype=torch.float64))
        self.frozen = nn.Parameter(torch.randn(7, dtype=torch.float64, generator=g), requires_grad=False)

    N = 4 * 6 + 5 * 4 + 4 * 3 + 1 + 7  # every element, counted by hand

    def forward(self, x: torch.Tensor, captions: torch.Tensor):
        feats = x @ self.image.T
        return feats @ self.head.T, feats, captions @ self.text.T, self.log_scale.exp()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    captions = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x, y, captions


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def _formula(term: str, convention: str, model: Small, theta0: dict[str, torch.Tensor], x, y, captions):
    """The term's value as the convention defines it, from its definition (docs/objective.md), in float64."""
    logits, feats, text, scale = model(x, captions)
    b, k = logits.shape
    logp = _log_softmax(logits)
    p = logp.exp()
    entropy = -(p * logp).sum(1)
    wrong = (logits.argmax(1) != y).double()
    if term == "ce":
        return -logp[torch.arange(b), y].mean()
    if term == "hinge":
        total = sum(torch.relu(logits[i, j] - logits[i, y[i]] + 1) for i in range(b) for j in range(k) if j != y[i])
        return total / b
    if term == "entropy":
        return entropy.mean()
    if term == "dcm":
        if convention == "reference":  # the reference's learnedloss.py: mean over the batch of wrong * H(p)
            return (wrong * entropy).mean()
        kl = -logp.mean(1) - math.log(k)  # KL(uniform || p)
        return (wrong * kl).sum() / b
    if term == "flyp":
        img = feats / feats.norm(dim=1, keepdim=True)
        txt = text / text.norm(dim=1, keepdim=True)
        sim = scale * img @ txt.T
        diag = torch.arange(b)
        return (-_log_softmax(sim)[diag, diag].mean() - _log_softmax(sim.T)[diag, diag].mean()) / 2
    trained = {n: q for n, q in model.named_parameters() if q.requires_grad}
    diffs = [q - theta0[n] for n, q in trained.items()] if term.endswith("init") else list(trained.values())
    raw = sum((d.abs() if term.startswith("l1") else d * d).sum() for d in diffs)
    return raw / Small.N if convention == "reference" else raw * SCALE[term]


def _objective(term: str, convention: str, model: Small, weight: float, **kwargs) -> CompositeObjective:
    settings = {"param_count": parameter_count(model)} if convention == "reference" else {"norm_scale": SCALE}
    weights = {"ce": 0.0, term: weight}
    return CompositeObjective(weights, model.named_parameters(), convention=convention, **settings, **kwargs)


def _shift(model: Small) -> dict[str, torch.Tensor]:
    """theta0, then every trained parameter moved away from it (so the init terms' signs are defined)."""
    theta0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn(q.shape, generator=g, dtype=q.dtype))
    return theta0


# the norm terms' gradients by autograd and in closed form (eager CPU blocks, and the compiled one-pass function)
PATHS = [(t, p) for t in LOSS_TERMS for p in (("autograd", "closed", "compiled") if t in NORM_TERMS else ("autograd",))]


@pytest.mark.xdist_group("compiled")  # torch.compile's first compile in a process (about 12 s cold): on one worker
@pytest.mark.parametrize("convention", ["ours", "reference"])
@pytest.mark.parametrize(("term", "path"), PATHS)
def test_each_term_value_and_gradient_match_the_independent_formulas(term: str, convention: str, path: str) -> None:
    weight = 0.7
    model = Small()
    x, y, captions = _data()
    obj = _objective(term, convention, model, weight, closed_form_norms=path != "autograd",
                     compile_norm_grads=path == "compiled")
    theta0 = _shift(model)
    with torch.no_grad():  # the objective's theta0 is the parameters at construction
        for name, base in zip(obj.names, obj.theta0 or [], strict=False):
            assert torch.equal(base, theta0[name])
    expected = _formula(term, convention, model, theta0, x, y, captions)
    want_grads = torch.autograd.grad(weight * expected, [q for q in model.parameters() if q.requires_grad],
                                     allow_unused=True)
    logits, feats, text, scale = model(x, captions)
    total, values = obj(logits, y, feats, text, scale)
    assert values[term].dtype == torch.float64
    torch.testing.assert_close(values[term], expected.detach(), rtol=RTOL, atol=0)
    if path == "autograd":
        torch.testing.assert_close(total, weight * expected, rtol=RTOL, atol=0)
    if total.requires_grad:
        total.backward()
    obj.add_norm_grads()
    trained = [q for q in model.parameters() if q.requires_grad]
    for q, want in zip(trained, want_grads, strict=True):
        got = q.grad if q.grad is not None else torch.zeros_like(q)
        torch.testing.assert_close(got, want if want is not None else torch.zeros_like(q), rtol=RTOL, atol=1e-300)
    assert model.frozen.grad is None


def test_reference_norm_pull_is_weight_over_every_parameter_and_ours_is_weight_times_scale() -> None:
    model = Small()
    ref = CompositeObjective({"l1init": 2.0, "l2zero": 3.0}, model.named_parameters(), convention="reference",
                             param_count=parameter_count(model))
    ours = CompositeObjective({"l1init": 2.0, "l2zero": 3.0}, model.named_parameters(), norm_scale=SCALE)
    assert parameter_count(model) == Small.N  # the frozen parameter counts too
    for pull in ref.pulls.values():
        assert pull == pytest.approx({"l1init": 2.0 / Small.N, "l2init": 0.0, "l1zero": 0.0, "l2zero": 3.0 / Small.N},
                                     rel=1e-15)
    for pull in ours.pulls.values():
        assert pull == pytest.approx({"l1init": 1.0, "l2init": 0.0, "l1zero": 0.0, "l2zero": 6.0}, rel=1e-15)
    assert set(ref.pulls) == {"image", "head", "text", "log_scale"}


@pytest.mark.parametrize(("settings", "match"), [
    ({"convention": "nope"}, "unknown convention 'nope'"),
    ({"convention": "reference"}, "needs param_count"),
    ({"convention": "reference", "param_count": 10, "norm_scale": {"l1init": 1.0}}, "norm_scale belongs to the ours"),
    ({"norm_scale": {"l3": 1.0}}, "unknown norm term 'l3'"),
    ({"norm_scale": {"l1init": 0.0}}, "must be finite and > 0"),
])
def test_bad_convention_settings_raise(settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CompositeObjective({"l1init": 1.0}, nn.Linear(2, 2).named_parameters(), **settings)


# ------------------------------------------------------------------------------------------ published configs

PUBLISHED = {  # cchoi1/auto-ft autoft/hparams/<dataset>.json, scripts/<dataset>.sh, and the datasets' budgets
    "iwildcam": {"seed": 34, "lr": 0.0001362453128517931, "wd": 0.604213756042692, "clip": 1.0, "epochs": 20,
                 "batch": 256, "l1init": 0.00154953790283812, "dcm": 0.6223533993940668},
    "fmow": {"seed": 32, "lr": 2.519719900061502e-05, "wd": 0.44415795184444584, "clip": 1.0, "epochs": 20,
             "batch": 256, "l1init": 0.001179899732446, "dcm": 0.602415784583637},
    "imagenet": {"seed": 2, "lr": 3.0252531512970088e-06, "wd": 0.2093816747380023, "clip": None, "epochs": 10,
                 "batch": 512, "l1init": 0.4238204731290246, "dcm": 0.055812612818434755},
}


def _compose(app: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(app, overrides=list(overrides))


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
def test_published_objective_composes_to_the_reference_convention_seed_and_budget(dataset: str) -> None:
    want = PUBLISHED[dataset]
    cfg = _compose("benchmark", "method=autoft", "method.search=null", f"objective=autoft_{dataset}",
                   f"dataset={dataset}", "model=vit_b16")
    assert cfg.objective.convention == "reference"
    assert (cfg.seed, cfg.optim.lr, cfg.optim.weight_decay) == (want["seed"], want["lr"], want["wd"])
    assert (cfg.objective.weights.ce, cfg.objective.weights.l1init, cfg.objective.weights.dcm) == (
        1.0, want["l1init"], want["dcm"])
    assert cfg.trainer.get("gradient_clip_val") == want["clip"]
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size, cfg.optim.warmup_steps) == (want["epochs"], want["batch"],
                                                                                       500)
    assert cfg.model.train_text and cfg.model.train_logit_scale and cfg.model.captions == "all"
    assert _compose("benchmark", f"objective=autoft_{dataset}", "seed=1").seed == 1  # the suite's seeds win
    assert _compose("finetune").objective.convention == "ours"  # our own searches keep ours


# --------------------------------------------------------------------------------- the model the reference needs

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("autoft-tiny", None)


def test_reference_convention_trains_every_parameter_and_counts_them_from_the_model(tiny) -> None:
    clip, _, _, tok = tiny
    names = [f"class {i}" for i in range(10)]
    cfg = _compose("finetune", "objective=autoft", "objective.convention=reference", "objective.weights.l2zero=0.5")
    plain = CLIPClassifier(clip, tok, names, ["a photo of a {}.", "a {} in the wild."])
    assert reference_requirements(plain) == ["model.train_text=true", "model.train_logit_scale=true",
                                             "model.captions=all"]
    with pytest.raises(UserError, match="set model.train_text=true model.train_logit_scale=true model.captions=all"):
        objective_settings(cfg, plain)
    model = CLIPClassifier(clip, tok, names, ["a photo of a {}.", "a {} in the wild."], train_text=True,
                           train_logit_scale=True, captions="all")
    settings = objective_settings(cfg, model)
    n = sum(p.numel() for p in model.parameters())
    assert settings == {"convention": "reference", "param_count": n}
    assert n == model_parameter_count(cfg.model, len(names))  # the converter's count, from the config alone
    assert {name for name, _ in model.trainable()} == {name for name, _ in model.named_parameters()}
    objective = CompositeObjective(dict(cfg.objective.weights), model.trainable(), **settings)
    assert all(pull["l2zero"] == pytest.approx(0.5 / n, rel=1e-15) for pull in objective.pulls.values())


# ---------------------------------------------------------------------------------------------------- converter

IWILDCAM = {"ce": 1.0, "hinge": 0.00015961210291135, "entropy": 0.000468130122461, "dcm": 0.6223533993940668,
            "flyp": 1.9056561834926824, "l1init": 0.00154953790283812, "l2init": 0.0001726603186429,
            "l1zero": 0.00019307479126688, "l2zero": 0.0001090242975318}


def test_converter_is_exact_for_the_norm_terms_and_says_what_it_cannot_convert() -> None:
    n = 149_714_103
    scale = {"l1init": 1e-6, "l2init": 2.0}
    ours = convert(IWILDCAM, "reference", "ours", n, scale, group_weights={"embed": {"l1zero": 0.3}})
    for t in NORM_TERMS:
        assert ours.weights[t] * scale.get(t, 1.0) == pytest.approx(IWILDCAM[t] / n, rel=1e-15)  # the same pull
    assert ours.group_weights == {"embed": {"l1zero": pytest.approx(0.3 / n, rel=1e-15)}}
    assert all(ours.weights[t] == IWILDCAM[t] for t in ("ce", "hinge", "entropy"))
    assert set(ours.not_converted) == {"dcm", "flyp"} and "different functions" in ours.not_converted["dcm"]
    assert "text tower" in ours.not_converted["flyp"] and "dcm" not in ours.weights
    back = convert(ours.weights, "ours", "reference", n, scale)
    for t in NORM_TERMS:
        assert back.weights[t] == pytest.approx(IWILDCAM[t], rel=1e-14)
    trained = convert(IWILDCAM, "reference", "ours", n, flyp_same=True)
    assert trained.weights["flyp"] == IWILDCAM["flyp"] and "model.train_text=true" in trained.notes["flyp"]
    assert convert({"dcm": 0.0, "l1init": 1.0}, "ours", "reference", 10).weights == {"dcm": 0.0, "l1init": 10.0}
    with pytest.raises(UserError, match="unknown convention 'mine'"):
        convert(IWILDCAM, "mine", "ours", n)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, "-m", "autoft.conventions", *args], cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_converter_cli_counts_vit_b16_and_converts_the_published_weights(tmp_path) -> None:
    proc = _cli("objective=autoft_iwildcam", "model=vit_b16", "dataset=iwildcam", "--classes", "182", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    n = out["param_count"]
    assert n == 149_620_737 + 182 * 512 + 182  # open_clip ViT-B-16 (both towers, logit_scale) + a 182-class head
    assert (out["from"], out["to"], out["objective"]["convention"]) == ("reference", "ours", "ours")
    scale = yaml.safe_load((ROOT / "conf" / "objective" / "base.yaml").read_text())["norm_scale"]["l1init"]
    assert out["objective"]["weights"]["l1init"] == pytest.approx(IWILDCAM["l1init"] / n / scale, rel=1e-15)
    assert out["objective"]["weights"]["flyp"] == IWILDCAM["flyp"] and "flyp" in out["notes"]
    assert out["not_converted"]["dcm"]["weight"] == IWILDCAM["dcm"]
    bad = _cli("objective=autoft_iwildcam", "dataset=iwildcam", "--to", "theirs", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    nameless = _cli("objective=autoft_iwildcam", "dataset=iwildcam", cwd=tmp_path)
    assert nameless.returncode == 2 and nameless.stderr == (
        "error: dataset 'iwildcam' reads its class names from the data: give --classes K (iWildCam 182, FMoW 62)\n")


def test_converter_converts_a_searched_best_params(tmp_path, capsys) -> None:
    """--best: the searched weights (dotted keys, as the sweeper writes them) replace the composed objective's."""
    from autoft.conventions import main

    best = tmp_path / "best_params.yaml"
    best.write_text(yaml.safe_dump({"best_params": {"objective.weights.l1init": 3.0, "objective.weights.ce": 0.5,
                                                    "optim.lr": 1e-4}}))
    assert main(["--best", str(best), "--classes", "2", "--to", "reference", "model=tiny_clip"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    n = out["param_count"]
    scale = yaml.safe_load((ROOT / "conf" / "objective" / "base.yaml").read_text())["norm_scale"]["l1init"]
    assert out["objective"]["weights"]["ce"] == 0.5
    assert out["objective"]["weights"]["l1init"] == pytest.approx(3.0 * scale * n, rel=1e-15)


# ------------------------------------------------------------------------------------------- a real fine-tuning run

def test_published_objective_trains_under_the_reference_convention(tmp_path) -> None:
    """objective=autoft_iwildcam on the tiny world: the reference's objective, clipping and trained towers."""
    from omegaconf import open_dict

    from autoft.finetune import build, finetune
    from tests.conftest import overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[*overrides(), "objective=autoft_iwildcam", "logger=csv", "test=false"])
    with open_dict(cfg):
        cfg.output_dir = cfg.logger.save_dir = str(tmp_path)
    model, data = build(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = finetune(cfg, model, data)
    objective = module.objective
    assert objective.convention == "reference" and objective.param_count == parameter_count(model)
    assert module.trainer.gradient_clip_val == 1.0 and cfg.seed == 34
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"clip.logit_scale", "clip.token_embedding.weight", "clip.visual.conv1.weight", "head.weight"} <= moved
    assert model.captions == "all" and model.templates_per_class == 2
    n = parameter_count(model)
    assert all(pull["l1init"] == pytest.approx(IWILDCAM["l1init"] / n, rel=1e-15) for pull in objective.pulls.values())


@pytest.mark.parametrize("model", [[], ["model.train_text=true", "model.captions=all"],
                                   ["model.train_text=true", "model.train_logit_scale=true", "model.captions=all"],
                                   ["model.train_text=true", "model.train_logit_scale=true", "model.captions=all",
                                    "+model.text_head=true"]])
def test_the_requirements_read_from_the_config_are_the_built_models(model, tmp_path) -> None:
    """The preflight reads them from the config (autoft.preflight.check_objective); the run from the model built."""
    from omegaconf import open_dict

    from autoft.finetune import build
    from tests.conftest import overrides

    cfg = _compose("finetune", *overrides(), *model)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    assert configured_requirements(cfg.model) == reference_requirements(build(cfg)[0])


def test_reference_convention_on_a_model_that_does_not_train_everything_is_one_error_line(tmp_path) -> None:
    from tests.conftest import overrides

    proc = forkserver.run([sys.executable, "-m", "autoft.finetune", *overrides(), "objective.convention=reference",
                           "logger=csv"], cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        "error: objective.convention=reference trains every parameter with captions from all templates, as the "
        "reference code does: set model.train_text=true model.train_logit_scale=true model.captions=all (or use "
        "convention ours)"]
