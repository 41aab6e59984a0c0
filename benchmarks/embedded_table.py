"""Zero-shot vs plain fine-tuning vs WiSE-FT vs a hand-set robust objective on the embedded world.

Each seed is a different world AND a different pretrained tiny CLIP (``dataset.world.seed``), and
a different fine-tuning seed. Prints and writes a markdown and JSON table of ID test and OOD test
macro-F1 (mean and std over seeds), plus every per-seed figure.

    python benchmarks/embedded_table.py --seeds 0 1 2 [--out DIR] [hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from autoft import UserError, atomic_write
from autoft.finetune import CONF_DIR, build, evaluate, finetune
from autoft.model import interpolate

METRIC = "F1-macro_all"
log = logging.getLogger("embedded_table")


def one_seed(seed: int, overrides: list[str], alpha: float, out: Path) -> dict[str, dict[str, float]]:
    """All methods for one world/pretraining/fine-tuning seed; {method: {id, ood}}."""
    common = [f"dataset.world.seed={seed}", f"seed={seed}", f"output_dir={out / f'seed{seed}'}", "logger=csv"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=[*common, *overrides])
        robust = compose("finetune", overrides=[*common, "objective=robust", *overrides])
    model, data = build(cfg)  # generates the world and pretrains the tiny CLIP once per seed

    def scores(results: dict[str, float]) -> dict[str, float]:
        return {"id": results[f"test_id/{METRIC}"], "ood": results[f"test_ood/{METRIC}"]}

    zero_shot = {k: v.clone() for k, v in model.state_dict().items()}
    rows = {"zero-shot": scores(evaluate(cfg, model, data))}
    for name, conf in (("fine-tuning (ce)", cfg), ("hand-set robust objective", robust)):
        model.load_state_dict(zero_shot)
        t0 = time.time()
        rows[name] = scores(finetune(conf, model, data).results)
        log.info("seed %d %s: %.0fs", seed, name, time.time() - t0)
        if name.startswith("fine-tuning"):
            tuned = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(interpolate(zero_shot, tuned, alpha))
            rows[f"WiSE-FT of fine-tuning, alpha {alpha}"] = scores(evaluate(cfg, model, data))
    return rows


def table(per_seed: dict[int, dict[str, dict[str, float]]]) -> tuple[str, dict]:
    methods = list(next(iter(per_seed.values())))
    summary = {}
    lines = ["| method | ID test macro-F1 | OOD test macro-F1 |", "|---|---|---|"]
    for m in methods:
        stats = {}
        for split in ("id", "ood"):
            vals = [per_seed[s][m][split] for s in per_seed]
            stats[split] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        summary[m] = stats
        lines.append(f"| {m} | {stats['id']['mean']:.3f} ± {stats['id']['std']:.3f} "
                     f"| {stats['ood']['mean']:.3f} ± {stats['ood']['std']:.3f} |")
    seeds = ", ".join(map(str, per_seed))
    text = "\n".join(lines) + f"\n\nmean ± std over seeds {seeds} (world, pretraining and fine-tuning seed each)\n"
    return text, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alpha", type=float, default=0.5, help="WiSE-FT mixing weight of the fine-tuned model")
    parser.add_argument("--out", type=Path, default=Path("outputs/embedded_table"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # open_clip logs every load at INFO on the root logger
    for name in ("autoft", log.name):  # keep pretraining progress and our timings visible
        logging.getLogger(name).setLevel(logging.INFO)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    try:
        for s in args.seeds:
            per_seed[s] = one_seed(s, args.overrides, args.alpha, args.out.resolve())
            atomic_write(args.out / "per_seed.json", json.dumps(per_seed, indent=1))  # partial results survive
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text, summary = table(per_seed)
    atomic_write(args.out / "table.md", text)
    atomic_write(args.out / "table.json", json.dumps({"summary": summary, "per_seed": per_seed}, indent=1))
    print(text)
    print(f"written to {args.out}/table.md and table.json ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
