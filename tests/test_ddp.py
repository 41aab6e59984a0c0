"""Two-process DDP (CPU, gloo) runs: metrics over whole splits, each example once; output files written once.

Lightning's DDP on CPU starts the other rank by re-running the command line, so each run is a real
process launch: rank 0 forked by the fork server (tests/forkserver.py), rank 1 by the same server at the request
of Lightning's own launcher in rank 0. It goes through a small spy script that runs the app's ``main`` and logs
every process's start and every ``atomic_write`` (rank, file name), so writes by any rank are seen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from autoft.finetune import CONF_DIR, TEST_KEYS, VAL_KEYS, build, evaluate
from autoft.model import interpolate
from tests import forkserver
from tests.conftest import overrides

ROOT = Path(__file__).resolve().parents[1]

# Odd split sizes: with 2 ranks, Lightning's DistributedSampler pads every one of them with a repeat.
ODD = {"dataset.world.n_id_val": "61", "dataset.world.n_id_test": "81", "dataset.world.n_ood_test": "101",
       "dataset.ood_val_size": "39"}
DDP = ["trainer.accelerator=cpu", "+trainer.strategy=ddp", "trainer.devices=2"]
SPY = '''
import importlib, os, sys
import torch
import autoft.final, autoft.finetune, autoft.trial
from pytorch_lightning.strategies.launchers import subprocess_script

sys.path.append(os.environ["SPY_ROOT"])
from tests import forkserver

subprocess_script.subprocess = forkserver.as_subprocess_module()  # the rank Lightning starts is forked too

def note(line):
    with open(os.environ["SPY_LOG"], "a") as f:
        f.write(line + "\\n")

def spying(write):
    def spy(path, data):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        note(f"write {rank} {os.path.basename(path)}")
        return write(path, data)
    return spy

note(f"start {os.environ.get('LOCAL_RANK', '0')} {os.getpid()} {os.getppid()}")
for module in (autoft.final, autoft.finetune, autoft.trial):
    module.atomic_write = spying(module.atomic_write)
importlib.import_module(os.environ["SPY_APP"]).main()
'''


def _overrides(**extra: str) -> list[str]:
    """The tiny world's overrides with odd split sizes."""
    items = [o for o in overrides() if o.split("=", 1)[0] not in ODD]
    return items + [f"{k}={v}" for k, v in (ODD | extra).items()]


def _launch(app: str, args: list[str], tmp_path: Path) -> list[str]:
    """Run ``app``'s main on 2 CPU ranks; returns the spy's log lines (fails the test if the run fails)."""
    script, log = tmp_path / "spy.py", tmp_path / "spy.log"
    script.write_text(SPY)
    env = os.environ | {"OMP_NUM_THREADS": "1", "SPY_LOG": str(log), "SPY_APP": app, "SPY_ROOT": str(ROOT),
                        forkserver.JOBS_ENV: forkserver.server().path}
    # Both ranks are forked by the fork server (a fresh interpreter's ~12 s of imports each, before): rank 0 here,
    # rank 1 by Lightning's DDP launcher, from rank 0's command line and environment, its Popen the fork server's
    proc = forkserver.Popen([sys.executable, str(script), *args, *DDP], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a hang: kill both ranks, none is left waiting in a collective
        for line in log.read_text().splitlines():
            if line.startswith("start"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[2]), signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    lines = log.read_text().splitlines()
    starts = {line.split()[1]: line.split()[2:] for line in lines if line.startswith("start")}
    assert sorted(starts) == ["0", "1"]
    assert starts["1"][1] != starts["0"][0]  # rank 1 forked by the fork server, not started by rank 0 itself
    return lines


def _cfg(name: str, out: Path, *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=_overrides() + list(extra))
    with open_dict(cfg):
        cfg.output_dir = str(out)
    return cfg


def _split_sizes(data) -> dict[str, int]:
    sizes = {k: len(data.subsets[k]) for k in VAL_KEYS + TEST_KEYS}
    assert all(n % 2 for n in sizes.values()), sizes  # the premise: every shard pair is padded
    return sizes


@pytest.mark.long(20)
def test_ddp_final_training_reports_whole_split_metrics_and_writes_once(tmp_path):
    out = tmp_path / "final"
    train = ["trainer.max_steps=-1", "trainer.max_epochs=1", "wise_alphas=[0.5]", "logger=csv"]
    cfg = _cfg("final", out, *train)
    model, data = build(cfg)  # the world and the pretrained model, made once before the ranks start
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best = tmp_path / "best_params.yaml"
    best.write_text("best_params:\n  optim.lr: 0.001\n")
    lines = _launch("autoft.final", [f"best={best}", *_overrides(), *train, f"output_dir={out}"], tmp_path)

    written = [line.split()[1:] for line in lines if line.startswith("write")]
    assert {rank for rank, _ in written} == {"0"}  # the best checkpoint too
    assert sorted(name for _, name in written if not name.endswith(".ckpt")) == ["final.json", "finetuned.pt"]
    assert [p.name for p in tmp_path.rglob("final.json")] == ["final.json"]
    final = json.loads((out / "final.json").read_text())
    assert final["examples"] == _split_sizes(data)

    tuned = torch.load(out / "finetuned.pt", weights_only=True)
    assert not torch.equal(tuned["head.weight"], zero_shot["head.weight"])  # it trained
    model.load_state_dict(tuned)
    single = evaluate(cfg, model, data)  # one process, the whole test splits
    ddp = {k: v for k, v in final["results"].items() if k.split("/")[0] in TEST_KEYS}
    assert set(ddp) == set(single)
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)

    model.load_state_dict(interpolate(zero_shot, tuned, 0.5))
    wise = evaluate(cfg, model, data)
    metric = cfg.dataset.metric
    assert final["wise"][0]["id"] == pytest.approx(wise[f"test_id/{metric}"], abs=1e-6)
    assert final["wise"][0]["ood"] == pytest.approx(wise[f"test_ood/{metric}"], abs=1e-6)


@pytest.mark.long(10)
def test_ddp_finetune_run_at_zero_lr_reports_the_single_process_metrics_once(tmp_path):
    """At lr 0 the weights stay pretrained, so validation and test must match one process's evaluation.
    The default W&B logger (offline) runs too: its stand-in on rank 1 has no run summary to update."""
    out = tmp_path / "run"
    frozen = ["optim.lr=0.0", "optim.weight_decay=0.0", f"logger.save_dir={out}"]
    cfg = _cfg("finetune", out, *frozen)
    model, data = build(cfg)
    _split_sizes(data)
    lines = _launch("autoft.finetune", [*_overrides(), *frozen, f"output_dir={out}"], tmp_path)

    assert [line.split()[1:] for line in lines if line.startswith("write")] == [["0", "results.json"]]
    ddp = json.loads((out / "results.json").read_text())
    single = evaluate(cfg, model, data, VAL_KEYS) | evaluate(cfg, model, data, TEST_KEYS)
    assert set(ddp) == set(single)
    assert ddp == pytest.approx(single, rel=1e-5, abs=1e-6)
