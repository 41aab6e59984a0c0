"""Calibrate the embedded world on its baselines only: zero-shot, FT, WiSE-FT of FT, and hand-set objectives.

Issue 13 asks for a world in iWildCam's regime, judged with no look at AutoFT: fine-tuning well above zero-shot on ID
*and* OOD, FT's ID gain larger than its OOD gain, a hand-set objective of the search space >= 3 points above FT on
OOD, WiSE-FT of FT above FT on OOD, each gap >= 3x its seed std. This script measures those figures for one world
setting over several world seeds (each with its own pretrained tiny CLIP), every arm at the final budget:

    python benchmarks/world_calibration.py --seeds 10 11 --out outputs/calib/base [world/config overrides ...]
    python benchmarks/world_calibration.py --seeds 10 11 --arms ft l2sp --out ... dataset.world.leak=0.02

Choices are made on the validation splits (ID val, the whole OOD val split) of calibration seeds that are then set
aside; test figures are written too, for the report on the frozen world. Jobs run as separate processes, two at a
time, one thread each (``--parallel``); a job whose result file exists is not run again, so a killed run resumes.
Writes ``<out>/jobs/<seed>-<arm>.json`` per job and ``<out>/summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from autoft import atomic_write

# Each arm: overrides on top of the final-training config (conf/final.yaml). FT is conf/method/ft's recipe.
ARMS: dict[str, list[str]] = {
    "zs": ["trainer.max_epochs=0"],
    "ft": ["objective=ce"],
    "l2sp": ["objective=ce", "+objective.weights.l2init=0.05", "optim.weight_decay=0.0"],
    "flyp": ["objective=ce", "+objective.weights.flyp=1.0"],
}
BASE = ["~logger", "trainer.max_epochs=6", "optim.warmup_steps=20", "optim.lr=${model.lr0}", "optim.weight_decay=0.1",
        "dataset.ood_val_size=null", "+trainer.enable_progress_bar=false", "test=false"]
ALPHAS = (0.0, 0.5, 1.0)
SPLITS = ("val_id", "val_ood", "test_id", "test_ood")


def run_job(seed: int, arm: list[str], extra: list[str], out: Path) -> dict:
    """Train one arm on one world seed (in this process); evaluate the fine-tuned weights and WiSE-FT."""
    import torch
    from hydra import compose, initialize_config_dir
    from pytorch_lightning.callbacks import ModelCheckpoint

    from autoft.finetune import CONF_DIR, TEST_KEYS, VAL_KEYS, build, evaluate, finetune
    from autoft.model import interpolate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[*BASE, f"dataset.world.seed={seed}", f"seed={seed}", *arm, *extra,
                                          f"output_dir={out}"])
    t0 = time.time()
    model, data = build(cfg)
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = cfg.trainer.max_epochs != 0
    if trained:
        ckpt = ModelCheckpoint(dirpath=out / "ckpt", monitor=f"val_id/{cfg.dataset.metric}", mode="max",
                               save_top_k=1, save_weights_only=True)
        finetune(cfg, model, data, None, [ckpt])
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moved = sum((tuned[k].float() - zero_shot[k].float()).square().sum().item()
                for k, p in model.named_parameters() if p.requires_grad) ** 0.5
    norm0 = sum(zero_shot[k].float().square().sum().item()
                for k, p in model.named_parameters() if p.requires_grad) ** 0.5
    metric = cfg.dataset.metric
    result = {"seed": seed, "overrides": [*arm, *extra], "moved_rel": moved / norm0, "wise": []}
    for alpha in ALPHAS if trained else (1.0,):
        model.load_state_dict(interpolate(zero_shot, tuned, alpha))
        res = evaluate(cfg, model, data, VAL_KEYS) | evaluate(cfg, model, data, TEST_KEYS)
        result["wise"].append({"alpha": alpha} | {s: res[f"{s}/{metric}"] for s in SPLITS})
        torch.cuda.empty_cache()
    result["seconds"] = round(time.time() - t0, 1)
    return result


def prepare(seed: int, extra: list[str]) -> None:
    """Generate the world and pretrain its tiny CLIP once (before jobs of that seed run side by side)."""
    from hydra import compose, initialize_config_dir

    from autoft.finetune import CONF_DIR, dataset_root, resolve_pretrained

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("final", overrides=[*BASE, f"dataset.world.seed={seed}", f"seed={seed}", *extra])
    dataset_root(cfg)
    resolve_pretrained(cfg)


def _spawn(args: list[str], log: Path) -> int:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") as f:
        return subprocess.run([sys.executable, __file__, *args], env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def summarise(jobs: dict[tuple[int, str], dict], arms: list[str]) -> dict:
    """Per arm and split: mean and std over seeds of the fine-tuned model and of WiSE-FT alpha 0.5; paired gaps
    to FT (same seed)."""
    seeds = sorted({s for s, _ in jobs})
    out: dict = {"seeds": seeds, "arms": {}}

    def point(job: dict, alpha: float) -> dict:
        return next(w for w in job["wise"] if w["alpha"] == alpha)

    for arm in arms:
        for alpha, name in ((1.0, arm), (0.5, f"{arm}+wise")):
            rows = [point(jobs[(s, arm)], alpha) for s in seeds if (s, arm) in jobs
                    and any(w["alpha"] == alpha for w in jobs[(s, arm)]["wise"])]
            if len(rows) != len(seeds):
                continue
            entry = {}
            for split in SPLITS:
                vals = [r[split] for r in rows]
                entry[split] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                "per_seed": vals}
                if "ft" in arms and all((s, "ft") in jobs for s in seeds) and name != "ft":
                    diffs = [r[split] - point(jobs[(s, "ft")], 1.0)[split] for r, s in zip(rows, seeds, strict=True)]
                    entry[split]["minus_ft"] = {"mean": statistics.fmean(diffs),
                                                "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}
            entry["moved_rel"] = statistics.fmean(jobs[(s, arm)]["moved_rel"] for s in seeds)
            out["arms"][name] = entry
    return out


def table(summary: dict, splits: tuple[str, ...] = ("val_id", "val_ood")) -> str:
    head = "| arm | " + " | ".join(splits) + " | " + " | ".join(f"{s} - FT" for s in splits) + " | moved |"
    lines = [head, "|---" * (2 * len(splits) + 2) + "|"]
    for name, e in summary["arms"].items():
        cells = [f"{100 * e[s]['mean']:.1f} ± {100 * e[s]['std']:.1f}" for s in splits]
        gaps = [f"{100 * e[s]['minus_ft']['mean']:+.1f} ± {100 * e[s]['minus_ft']['std']:.1f}"
                if "minus_ft" in e[s] else "—" for s in splits]
        lines.append(f"| {name} | " + " | ".join(cells + gaps) + f" | {e['moved_rel']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--arm", action="append", default=[], metavar="NAME:OVERRIDE,...",
                        help="an extra arm, e.g. 'l2sp1:objective=ce,+objective.weights.l2init=1'")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--job", nargs=2, metavar=("SEED", "ARM"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", type=int, metavar="SEED", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="world/config overrides for every job")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every load at INFO on the root logger
    logging.getLogger("autoft").setLevel(logging.INFO)
    arms = {a: ARMS[a] for a in args.arms} | {
        spec.split(":", 1)[0]: spec.split(":", 1)[1].split(",") for spec in args.arm}
    if args.prepare is not None:
        prepare(args.prepare, args.overrides)
        return 0
    if args.job:
        seed, arm = int(args.job[0]), args.job[1]
        result = run_job(seed, arms[arm], args.overrides, args.out / "work" / f"{seed}-{arm}")
        atomic_write(args.out / "jobs" / f"{seed}-{arm}.json", json.dumps(result, indent=1))
        return 0
    (args.out / "jobs").mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "command.json", json.dumps({"argv": sys.argv[1:], "arms": arms}, indent=1))
    passthrough = [a for spec in args.arm for a in ("--arm", spec)] + ["--arms", *args.arms, "--", *args.overrides]
    log = args.out / "log.txt"
    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(lambda s: _spawn(["--out", str(args.out), "--prepare", str(s), *passthrough], log),
                              args.seeds))
        if any(codes):
            print(f"error: preparing a world failed (see {log})", file=sys.stderr)
            return 2
        todo = [(s, a) for s in args.seeds for a in arms if not (args.out / "jobs" / f"{s}-{a}.json").is_file()]
        codes = list(pool.map(lambda j: _spawn(["--out", str(args.out), "--job", str(j[0]), j[1], *passthrough],
                                               log), todo))
    if any(codes):
        print(f"error: {sum(map(bool, codes))} job(s) failed (see {log})", file=sys.stderr)
    jobs = {(s, a): json.loads((args.out / "jobs" / f"{s}-{a}.json").read_text())
            for s in args.seeds for a in arms if (args.out / "jobs" / f"{s}-{a}.json").is_file()}
    summary = summarise(jobs, list(arms))
    atomic_write(args.out / "summary.json", json.dumps(summary, indent=1))
    text = table(summary)
    atomic_write(args.out / "summary.md", text)
    print(text)
    return 2 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
