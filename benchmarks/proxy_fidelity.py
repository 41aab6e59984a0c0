"""Is the inner loop long enough to search with? Proxy fidelity of AutoFT's inner budget, before a 500-trial search.

AutoFT scores each proposed objective by a short inner fine-tuning run on the OOD validation subset; the search is
only as good as the ranking that score gives. This benchmark samples ``--n`` seeded objectives from a search space
(the sweeper's own ``hydra.sweeper.params``, any dataset/model config), adds named hand-set points of that space
(plain FT, the L2-SP method's weights, ce + flyp with the search's text-tower setting, the ``robust`` preset), runs
each at every inner budget (and schedule) exactly as a search trial runs, and at the final budget exactly as final
training runs, then reports per inner budget:

* Spearman and Kendall rank correlation between the inner OOD-validation score and the final OOD-test score;
* the fraction of sampled objectives that **collapse** (ID validation more than ``--collapse-margin`` below
  zero-shot's) and that stay **pinned** (moved less than ``--pinned-fraction`` of plain FT's distance from theta0,
  ||theta - theta0|| over the trainable weights, at the same budget);
* seconds per inner run.

    python benchmarks/proxy_fidelity.py --out outputs/proxy [--n 24] [--budgets 25 50 100] [--schedules constant cosine]
    python benchmarks/proxy_fidelity.py --out DIR --search autoft dataset=iwildcam model=vit_b16   # real data, a GPU

Writes ``<out>/points.csv`` (one row per objective and run), ``<out>/summary.json``, ``<out>/summary.md`` and
``<out>/scatter.png``. Each objective runs in its own process (``--parallel`` at a time, one thread each on CPU);
an objective whose result file exists is not run again, so a killed run resumes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from autoft import atomic_write

# Hand-set points of the space: (name, method config whose objective and optimiser they take, extra weights).
# The final run's budget: the dataset's, as the methods suite and the main job use it (conf/benchmark.yaml).
# WiSE-FT at alpha 0.5 only: the other alphas' test passes would add nothing the summary reads.
FINAL_BUDGET = ["trainer.max_epochs=${oc.select:dataset.budget.final_epochs,20}",
                "optim.warmup_steps=${oc.select:dataset.budget.warmup_steps,500}", "wise_alphas=[0.5]"]
NAMED = (("ft", "ft", {}), ("l2sp", "l2sp", {}), ("ce+flyp", "ft", {"flyp": 1.0}), ("robust", "ft", "robust"))


def _compose(name: str, overrides: list[str], hydra: bool = False):
    from hydra import compose, initialize_config_dir

    from autoft.finetune import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


def _override(key: str, value: Any) -> str:
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def search_space(search: str, overrides: list[str], replace: list[str] = ()):
    """The search config's distributions, parsed by the sweeper exactly as a search would; ``replace`` lines
    (``key=spec``, as in ``hydra.sweeper.params``) win over the config's."""
    from omegaconf import OmegaConf

    from hydra_plugins.autoft_optuna_sweeper._search_space import parse_search_space

    cfg = _compose("finetune", [f"search={search}", *overrides], hydra=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    return parse_search_space([*(f"{k}={v}" for k, v in params.items()), *replace])


def sample_points(search: str, overrides: list[str], replace: list[str], n: int,
                  seed: int) -> dict[str, dict[str, Any]]:
    """``n`` objectives drawn independently (Optuna's seeded RandomSampler) from the search space."""
    import optuna

    space = search_space(search, overrides, replace)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = {}
    for i in range(n):
        trial = study.ask(space.distributions)
        points[f"s{i:02d}"] = dict(trial.params)
        study.tell(trial, 0.0)
    return points


def named_points(search: str, overrides: list[str], replace: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """The hand-set points as params of the space: each method config's weights, lr and weight decay."""
    space = search_space(search, overrides, replace)
    searched = set(space.distributions)
    points = {}
    for name, method, extra in NAMED:
        cfg = _compose("benchmark", [f"method={method}", *overrides,
                                     *(["objective=robust"] if extra == "robust" else [])])
        weights = dict(cfg.objective.weights) | (extra if isinstance(extra, dict) else {})
        params: dict[str, Any] = {f"objective.weights.{t}": float(weights.get(t, 0.0)) for t in
                                  ("hinge", "entropy", "dcm", "flyp", "l1init", "l2init", "l1zero", "l2zero")}
        params |= {"optim.lr": float(cfg.optim.lr), "optim.weight_decay": float(cfg.optim.weight_decay), "seed": seed}
        points[name] = {k: v for k, v in params.items() if k in searched or v}
    return points


def _moved(model, pretrained: dict) -> float:
    return sum((p.detach().float() - pretrained[n].float()).square().sum().item()
               for n, p in model.named_parameters() if p.requires_grad) ** 0.5


def run_point(params: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One objective: an inner run per (budget, schedule), as a search trial runs, then the final run."""
    import torch
    from omegaconf import OmegaConf

    from autoft.final import final_train
    from autoft.finetune import VAL_KEYS, build, finetune
    from autoft.trial import trainer_overrides

    given = [_override(k, v) for k, v in params.items()]
    row: dict[str, Any] = {"params": params, "inner": {}}
    for schedule in args.schedules:
        for budget in args.budgets:
            cfg = _compose("finetune", [f"search={args.search}", *args.overrides, "~logger",
                                        f"search.inner_steps={budget}", f"search.eval_every={budget}",
                                        f"optim.schedule={schedule}", f"output_dir={out}", *given])
            t0 = time.time()
            model, data = build(cfg, reuse=True)
            pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
            data.val_keys = VAL_KEYS  # a search trial scores val_ood alone; ID val tells a collapse here
            try:
                module = finetune(cfg, model, data, **trainer_overrides(OmegaConf.to_container(cfg.trainer)))
                res, metric = module.results, cfg.dataset.get("search_metric") or cfg.dataset.metric
                inner = {"score": res[f"val_ood/{metric}"], "val_id": res[f"val_id/{cfg.dataset.metric}"],
                         "moved": _moved(model, pretrained)}
            except FloatingPointError as e:  # a search prunes a diverged trial: it is a collapse
                inner = {"score": None, "val_id": None, "moved": None, "error": str(e)}
            inner["seconds"] = round(time.time() - t0, 2)
            row["inner"][f"{schedule}-{budget}"] = inner
            model.restore(pretrained)
    cfg = _compose("final", [*args.overrides, "~logger", f"output_dir={out / 'final'}", *FINAL_BUDGET,
                             "+trainer.enable_progress_bar=false"])
    pretrained: dict = {}
    try:
        summary = final_train(cfg, params, out / "final", prepare=lambda model, data: pretrained.update(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        res, metric = summary["results"], cfg.dataset.metric
        tuned = torch.load(out / "final" / "finetuned.pt", weights_only=True)
        moved = sum((tuned[n].float() - p.float()).square().sum().item() for n, p in pretrained.items()) ** 0.5
        row["final"] = {"test_id": res[f"test_id/{metric}"], "test_ood": res.get(f"test_ood/{metric}"),
                        "val_id": summary["best_epoch_metric"], "moved": moved,
                        "wise_0.5_ood": next((w["ood"] for w in summary["wise"] if w["alpha"] == 0.5), None)}
    except FloatingPointError as e:
        row["final"] = {"test_id": None, "test_ood": None, "val_id": None, "moved": None, "error": str(e)}
    for ckpt in (out / "final").glob("**/*.ckpt"):
        ckpt.unlink()
    (out / "final" / "finetuned.pt").unlink(missing_ok=True)
    return row


def zero_shot(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Zero-shot ID validation (the collapse reference) and OOD scores, with the search's validation subset."""
    from autoft.finetune import VAL_KEYS, build, evaluate

    cfg = _compose("finetune", [f"search={args.search}", *args.overrides, "~logger", f"output_dir={out}"])
    model, data = build(cfg)
    data.val_keys = VAL_KEYS
    res = evaluate(cfg, model, data, VAL_KEYS)
    metric = cfg.dataset.get("search_metric") or cfg.dataset.metric
    return {"val_id": res[f"val_id/{cfg.dataset.metric}"], "score": res[f"val_ood/{metric}"]}


def _rank_stats(x: list[float], y: list[float]) -> dict[str, float | int]:
    from scipy import stats

    if len(x) < 3:
        return {"n": len(x), "spearman": float("nan"), "kendall": float("nan")}
    return {"n": len(x), "spearman": float(stats.spearmanr(x, y).statistic),
            "kendall": float(stats.kendalltau(x, y).statistic)}


def summarise(rows: dict[str, dict], zs: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """Rank correlations, collapse and pinned fractions per inner run, over the sampled points (and all points)."""
    out: dict[str, Any] = {"zero_shot": zs, "n_sampled": sum(n.startswith("s") for n in rows), "runs": {},
                           "collapse_margin": args.collapse_margin, "pinned_fraction": args.pinned_fraction}
    final_ood = {n: r["final"]["test_ood"] for n, r in rows.items()}
    final_ok = {n: v for n, v in final_ood.items() if v is not None}
    out["final"] = {"collapsed": _fraction(rows, lambda r: _collapsed(r["final"], zs, args), sampled=True),
                    "pinned": _fraction(rows, lambda r: _pinned(r["final"], rows.get("ft", {}).get("final"), args),
                                        sampled=True)}
    for run in next(iter(rows.values()))["inner"]:
        scores = {n: r["inner"][run]["score"] for n, r in rows.items()}
        both = [n for n in final_ok if scores[n] is not None]
        sampled = [n for n in both if n.startswith("s")]
        trained = [n for n in sampled if not _collapsed(rows[n]["final"], zs, args)]
        ft_inner = rows.get("ft", {}).get("inner", {}).get(run)
        out["runs"][run] = {
            "sampled": _rank_stats([scores[n] for n in sampled], [final_ok[n] for n in sampled]),
            "all": _rank_stats([scores[n] for n in both], [final_ok[n] for n in both]),
            # the region a search picks from: collapses rank last at any budget and lift the sampled figure
            "not_collapsed": _rank_stats([scores[n] for n in trained], [final_ok[n] for n in trained]),
            "collapsed": _fraction(rows, lambda r, run=run: _collapsed(r["inner"][run], zs, args), sampled=True),
            "pinned": _fraction(rows, lambda r, run=run, ft=ft_inner: _pinned(r["inner"][run], ft, args), sampled=True),
            "seconds_mean": statistics.fmean(r["inner"][run]["seconds"] for r in rows.values()),
            "named": {n: {"score": scores[n], "final_ood": final_ood[n]} for n in rows if not n.startswith("s")},
        }
    return out


def _collapsed(run: dict, zs: dict[str, float], args: argparse.Namespace) -> bool:
    return run["val_id"] is None or run["val_id"] < zs["val_id"] - args.collapse_margin


def _pinned(run: dict, ft: dict | None, args: argparse.Namespace) -> bool:
    return (run["moved"] is not None and ft is not None and ft["moved"] is not None
            and run["moved"] < args.pinned_fraction * ft["moved"])


def _fraction(rows: dict[str, dict], test, sampled: bool) -> float:
    names = [n for n in rows if n.startswith("s") or not sampled]
    return sum(bool(test(rows[n])) for n in names) / len(names)


def write_csv(rows: dict[str, dict]) -> str:
    buf = io.StringIO()
    fields = ["point", "kind", "params", "run", "score", "val_id", "moved", "seconds", "final_test_id",
              "final_test_ood", "final_val_id", "final_moved", "final_wise_0.5_ood"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for name, r in rows.items():
        f = r["final"]
        for run, inner in r["inner"].items():
            writer.writerow({"point": name, "kind": "sampled" if name.startswith("s") else "named",
                             "params": json.dumps(r["params"], sort_keys=True), "run": run,
                             **{k: inner.get(k) for k in ("score", "val_id", "moved", "seconds")},
                             "final_test_id": f["test_id"], "final_test_ood": f["test_ood"],
                             "final_val_id": f["val_id"], "final_moved": f["moved"],
                             "final_wise_0.5_ood": f.get("wise_0.5_ood")})
    return buf.getvalue()


def scatter(path: Path, rows: dict[str, dict], zs: dict[str, float], summary: dict[str, Any]) -> None:
    """Inner score vs final OOD test, one panel per inner run; named points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(summary["runs"])
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        for name, r in rows.items():
            x, y = r["inner"][run]["score"], r["final"]["test_ood"]
            if x is None or y is None:
                continue
            named = not name.startswith("s")
            ax.scatter([x], [y], c="tab:red" if named else "tab:blue", s=30 if named else 14)
            if named:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(zs["score"], color="grey", lw=0.8, ls="--")
        st = summary["runs"][run]["sampled"]
        ax.set_title(f"{run}: Spearman {st['spearman']:.2f}, Kendall {st['kendall']:.2f} (n={st['n']})", fontsize=8)
        ax.set_xlabel("inner OOD-val score")
        ax.set_ylabel("final OOD test")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def table(summary: dict[str, Any]) -> str:
    lines = ["| inner run | Spearman (sampled) | Kendall (sampled) | n | Spearman (all) | Spearman (not collapsed) | n "
             "| collapsed | pinned | s/run |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run, s in summary["runs"].items():
        sampled, kept = s["sampled"], s["not_collapsed"]
        lines.append(f"| {run} | {sampled['spearman']:.2f} | {sampled['kendall']:.2f} | {sampled['n']} "
                     f"| {s['all']['spearman']:.2f} | {kept['spearman']:.2f} | {kept['n']} | {s['collapsed']:.2f} "
                     f"| {s['pinned']:.2f} | {s['seconds_mean']:.1f} |")
    f = summary["final"]
    lines.append(f"| final run | | | | | | | {f['collapsed']:.2f} | {f['pinned']:.2f} | |")
    return "\n".join(lines) + "\n"


def _spawn(args: list[str], log: Path) -> int:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") as f:
        return subprocess.run([sys.executable, __file__, *args], env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--search", default="embedded", help="search config whose space is sampled and run")
    parser.add_argument("--n", type=int, default=24, help="objectives sampled from the space")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=SPEC",
                        help="replace a searched param's range, e.g. 'optim.lr=tag(log, interval(1e-6, 1e-2))'")
    parser.add_argument("--sample-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="the named points' seed")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100], help="inner steps")
    parser.add_argument("--schedules", nargs="+", default=["constant"], choices=["constant", "cosine"],
                        help="inner lr schedules (Hydra overrides go before the options or after --)")
    parser.add_argument("--collapse-margin", type=float, default=0.05)
    parser.add_argument("--pinned-fraction", type=float, default=0.1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. dataset.world.seed=10")
    return parser.parse_intermixed_args(argv)


def child_argv(args: argparse.Namespace) -> list[str]:
    """What one objective's process is given besides ``--point``: the overrides first, so that no list-valued
    option takes them for its own."""
    return [*args.overrides, "--out", str(args.out), "--search", args.search, "--budgets", *map(str, args.budgets),
            "--schedules", *args.schedules]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    points_file = args.out / "points.json"
    if args.point:  # a child process: one objective
        params = json.loads(points_file.read_text())[args.point]
        row = run_point(params, args, args.out / "work" / args.point)
        atomic_write(args.out / "rows" / f"{args.point}.json", json.dumps(row, indent=1))
        return 0
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    if not points_file.is_file():
        points = named_points(args.search, args.overrides, args.param, args.seed) | sample_points(
            args.search, args.overrides, args.param, args.n, args.sample_seed)
        atomic_write(points_file, json.dumps(points, indent=1))
    points = json.loads(points_file.read_text())
    zs_file = args.out / "zero_shot.json"
    if not zs_file.is_file():  # also generates the world and pretrains the model before the children start
        atomic_write(zs_file, json.dumps(zero_shot(args, args.out / "work" / "zero-shot")))
    zs = json.loads(zs_file.read_text())
    todo = [n for n in points if not (args.out / "rows" / f"{n}.json").is_file()]
    log = args.out / "log.txt"
    t0 = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(lambda n: _spawn(["--point", n, *child_argv(args)], log), todo))
    if any(codes):
        print(f"error: {sum(map(bool, codes))} point(s) failed (see {log})", file=sys.stderr)
        return 2
    rows = {n: json.loads((args.out / "rows" / f"{n}.json").read_text()) for n in points}
    summary = summarise(rows, zs, args) | {"command": sys.argv[1:], "seconds": round(time.time() - t0)}
    atomic_write(args.out / "summary.json", json.dumps(summary, indent=1))
    atomic_write(args.out / "points.csv", write_csv(rows))
    scatter(args.out / "scatter.png", rows, zs, summary)
    text = table(summary)
    atomic_write(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
