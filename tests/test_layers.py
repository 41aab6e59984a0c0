"""Layer groups: model configs cover their parameters, per-group settings reach the objective and the optimizer,
and the layerwise search runs end to end with its best per-group values applied in final training."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import open_clip
import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import autoft.final
import autoft.finetune
from autoft import UserError
from autoft.conventions import objective_settings
from autoft.finetune import CONF_DIR, FineTuner
from autoft.layers import assign, optimizer_groups, prefixes
from autoft.model import CLIPClassifier, load_clip
from autoft.objective import NORM_TERMS, CompositeObjective
from tests import forkserver
from tests.conftest import overrides
from tests.inprocess import call_main

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["embed", "blocks_early", "blocks_middle", "blocks_late", "final", "head", "text"]
SEARCHED = ["embed", "blocks_early", "blocks_middle", "blocks_late", "final"]


def _compose(app: str, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(app, overrides=list(extra))


@pytest.mark.parametrize(("model", "blocks"), [("tiny_clip", (1, 2, 1)), ("vit_b16", (4, 4, 4)),
                                               ("vit_l14", (8, 8, 8)), ("vit_l14_336", (8, 8, 8))])
def test_every_model_config_puts_each_classifier_parameter_in_one_group(model: str, blocks: tuple) -> None:
    cfg = _compose("finetune", f"model={model}")
    import autoft.model  # noqa: F401  (registers autoft-tiny)

    with torch.device("meta"):
        clip = open_clip.create_model(cfg.model.name, pretrained=None, device="meta")
    names = [f"clip.{n}" for n, _ in clip.named_parameters()] + ["head.weight", "head.bias"]
    group_of = assign(((n, torch.nn.Parameter(torch.empty(0))) for n in names), cfg.model.layer_groups)
    assert set(group_of) == set(names) and list(prefixes(cfg.model.layer_groups)) == GROUPS
    for group, count in zip(["blocks_early", "blocks_middle", "blocks_late"], blocks, strict=True):
        got = {n.split(".")[4] for n, g in group_of.items() if g == group}
        assert len(got) == count, (group, got)
    assert group_of["clip.logit_scale"] == "text" and group_of["clip.visual.proj"] == "final"
    assert group_of["clip.positional_embedding"] == "text" and group_of["clip.visual.positional_embedding"] == "embed"


def test_a_parameter_in_no_group_or_in_two_is_an_error() -> None:
    params = [("head.weight", torch.nn.Parameter(torch.zeros(1))), ("frozen", torch.nn.Parameter(torch.zeros(1),
                                                                                                requires_grad=False))]
    with pytest.raises(UserError, match=r"^model.layer_groups: trainable parameter 'head.weight' belongs to no layer "
                                        r"group \(groups: embed\)$"):
        assign(params, {"embed": ["clip.visual.conv1"]})
    with pytest.raises(UserError, match="'head.weight' belongs to several layer groups: a, b"):
        assign(params, {"a": ["head"], "b": ["head.weight"]})
    assert assign(params, {"a": ["head"]}) == {"head.weight": "a"}  # a frozen parameter needs no group
    with pytest.raises(UserError, match="bad range '4:2'"):
        prefixes({"a": ["x.4:2"]})
    with pytest.raises(UserError, match="model.layer_groups is not set"):
        prefixes(None)
    with pytest.raises(UserError, match="optim.groups: unknown layer group 'nope'"):
        optimizer_groups(params, {"a": ["head"]}, {"nope": {"lr": 1.0}}, 0.1, 0.0)
    with pytest.raises(UserError, match=r"optim.groups.a: unknown key\(s\) momentum"):
        optimizer_groups(params, {"a": ["head"]}, {"a": {"momentum": 1.0}}, 0.1, 0.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip, _, _, tok = load_clip("autoft-tiny", None)
    return CLIPClassifier(clip, tok, ["a", "b", "c"], ["a photo of a {}."])


def test_per_group_weights_reach_the_norm_gradients_and_lr_reaches_the_optimizer(tiny) -> None:
    cfg = _compose("finetune", "objective=autoft", "objective.weights.l1init=0.5", "objective.weights.l2zero=0.25",
                   "+objective.group_weights.embed.l1init=2.0", "+objective.group_weights.blocks_late.l2zero=4.0",
                   *(f"objective.norm_scale.{t}=1.0" for t in NORM_TERMS))  # unit scales: pull = weight
    settings = objective_settings(cfg, tiny)
    obj = CompositeObjective(dict(cfg.objective.weights), tiny.trainable(), closed_form_norms=True, **settings)
    embed, late, head = "clip.visual.conv1.weight", "clip.visual.transformer.resblocks.3.mlp.c_fc.weight", "head.weight"
    assert obj.pulls[embed] == {"l1init": 2.0, "l2init": 0.0, "l1zero": 0.0, "l2zero": 0.25}
    assert obj.pulls[late] == {"l1init": 0.5, "l2init": 0.0, "l1zero": 0.0, "l2zero": 4.0}
    assert obj.pulls[head] == {"l1init": 0.5, "l2init": 0.0, "l1zero": 0.0, "l2zero": 0.25}
    params = dict(tiny.trainable())
    with torch.no_grad():
        for name in (embed, late, head):
            params[name].add_(0.01)  # away from theta0: sign(p - p0) = 1
    obj.add_norm_grads()  # the CPU blocks, one coefficient set per group
    for name, (l1, l2) in {embed: (2.0, 0.25), late: (0.5, 4.0), head: (0.5, 0.25)}.items():
        p = params[name]
        torch.testing.assert_close(p.grad, l1 * torch.ones_like(p) + 2 * l2 * p.detach())
        p.grad = None
    with torch.no_grad():
        for name in (embed, late, head):
            params[name].sub_(0.01)
    groups = optimizer_groups(tiny.trainable(), cfg.model.layer_groups, {"embed": {"lr": 0.5}, "head": {
        "weight_decay": 0.3}}, 0.01, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["embed", "blocks_early", "blocks_middle", "blocks_late", "final", "head"]  # text frozen
    assert (by_name["embed"]["lr"], by_name["embed"]["weight_decay"]) == (0.5, 0.1)
    assert (by_name["head"]["lr"], by_name["head"]["weight_decay"]) == (0.01, 0.3)
    assert sum(len(g["params"]) for g in groups) == len(params)
    with pytest.raises(UserError, match="objective.group_weights.embed: unknown key"):
        objective_settings(_compose("finetune", "+objective.group_weights.embed.dcm=1"), tiny)
    with pytest.raises(UserError, match="optim.groups: unknown layer group 'nope'"):
        FineTuner(tiny, obj, None, 0.1, 0.0, groups={"nope": {"lr": 1}}, layer_groups=cfg.model.layer_groups)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}


def test_a_trainable_parameter_in_no_group_is_one_error_line(tmp_path) -> None:
    proc = forkserver.run([sys.executable, "-m", "autoft.finetune", *overrides(), "logger=csv",
                           "+optim.groups.embed.lr=1e-4", "model.layer_groups.head=[clip.nothing]"],
                          cwd=tmp_path, env=_env(), timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error")] == [
        "error: model.layer_groups: trainable parameter 'head.weight' belongs to no layer group (groups: embed, "
        "blocks_early, blocks_middle, blocks_late, final, head, text)"]


def test_layerwise_search_runs_and_final_training_applies_its_best_values_per_group(tmp_path, monkeypatch) -> None:
    sweep = tmp_path / "sweep"
    argv = ["-m", "search=autoft_layerwise", "search.inner_steps=4", "search.eval_every=2", *overrides(),
            f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=3", "logger=csv"]
    monkeypatch.chdir(tmp_path)  # the search command in this process: the claim is its space, not its process
    assert call_main(autoft.finetune.main, argv, prog=autoft.finetune.__file__) == 0
    best = yaml.safe_load((sweep / "best_params.yaml").read_text())["best_params"]
    per_group = {f"optim.groups.{g}.{k}" for g in SEARCHED for k in ("lr", "weight_decay")} | {
        f"objective.group_weights.{g}.{t}" for g in SEARCHED for t in NORM_TERMS}
    assert per_group <= set(best) and {"optim.lr", "optim.weight_decay", "objective.weights.l1init"} <= set(best)
    seen: dict = {}

    class Capture(pl.Callback):  # reads the real optimizer and objective once training starts
        def on_train_start(self, trainer, module) -> None:
            names = {id(p): n for n, p in module.model.named_parameters()}
            seen["groups"] = [(g["name"], g["initial_lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
                              for g in trainer.optimizers[0].param_groups]
            seen["pulls"] = module.objective.pulls

    real = autoft.final.finetune

    def spy(cfg, model, data, logger=None, callbacks=None, **kwargs):
        return real(cfg, model, data, logger, [*(callbacks or []), Capture()], **kwargs)

    monkeypatch.setattr(autoft.final, "finetune", spy)
    cfg = _compose("final", *overrides(), "trainer.max_epochs=1", "trainer.max_steps=-1", "optim.warmup_steps=2",
                   "logger=csv", "test=false", "wise_alphas=[1.0]")
    with open_dict(cfg):
        cfg.output_dir = cfg.logger.save_dir = str(tmp_path / "final")
    autoft.final.final_train(cfg, best, tmp_path / "final")
    groups = {name: (lr, wd, params) for name, lr, wd, params in seen["groups"]}
    assert list(groups) == ["embed", "blocks_early", "blocks_middle", "blocks_late", "final", "head"]
    for g in SEARCHED:
        assert groups[g][:2] == (best[f"optim.groups.{g}.lr"], best[f"optim.groups.{g}.weight_decay"])
    assert groups["head"][:2] == (best["optim.lr"], best["optim.weight_decay"])
    assert "clip.visual.transformer.resblocks.1.attn.in_proj_weight" in groups["blocks_middle"][2]
    assert groups["final"][2] == {"clip.visual.ln_post.weight", "clip.visual.ln_post.bias", "clip.visual.proj"}
    group_of = {n: g for g, (_, _, params) in groups.items() for n in params}
    for name, pull in seen["pulls"].items():
        g = group_of[name]
        key = f"objective.group_weights.{g}" if g in SEARCHED else "objective.weights"
        scale = cfg.objective.norm_scale  # ours: pull = weight x the term's norm scale
        assert pull == pytest.approx({t: best[f"{key}.{t}"] * scale[t] for t in NORM_TERMS}, rel=1e-12), name
    assert OmegaConf.select(cfg, "optim.groups") is None  # the values came from best_params, not the config
