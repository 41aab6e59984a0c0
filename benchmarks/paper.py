"""One command per comparison of the AutoFT paper: methods x seeds, one table, one plot per dataset.

    python benchmarks/paper.py wilds                # on the embedded world (no data needed), seeds 0 1 2
    python benchmarks/paper.py wilds --paper        # iWildCam and FMoW, CLIP ViT-B/16, data under $AUTOFT_DATA
    python benchmarks/paper.py COMPARISON [--paper] [--seeds 0 1 2] [--model M] [--out DIR] [overrides ...]

Comparisons: wilds, imagenet, fewshot, transfer (the paper's tables) and the ablations
objective-transfer (an objective learned on iWildCam applied to FMoW), val-set (the search scored on
ID vs OOD validation) and sampler (TPE vs random, QMC and CMA-ES). Each runs Hydra multiruns of
``python -m autoft.methods`` (every method through the same training and evaluation, see
autoft/methods.py), then writes ``<out>/<comparison>/table.md`` and ``table.csv`` (mean and std over
seeds, in percent, with the paper's published figure beside ours where one exists) and
``<dataset>-id-vs-ood.png``. Runs live in ``<out>/runs/<dataset>-<model>/<method>-seed<k>``, shared by
all comparisons: a job already done with the same configuration is reused, so a killed command resumes.

Without ``--paper`` every comparison runs on the embedded world, a procedural stand-in written in
WILDS iWildCam layout: its figures are not the paper's datasets' and have no published counterpart. There seed k
is also the world's seed (world k, its own pretrained tiny CLIP, search seed k).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from autoft import atomic_write
from autoft.report import write_robustness_plot

Dataset = tuple[str, tuple[str, ...]]  # (label, overrides)
MAIN = "method=zeroshot,lp,ft,lpft,l2sp,flyp,autoft"
NO_L2SP = "method=zeroshot,lp,ft,lpft,flyp,autoft"
EMBEDDED: tuple[Dataset, ...] = (("embedded", ("dataset=embedded",)),)


def _shots(dataset: str, label: str, ks: tuple[int, ...] = (4, 16, 32)) -> tuple[Dataset, ...]:
    return tuple((f"{label}-{k}shot", (f"dataset={dataset}", f"dataset.shots={k}")) for k in ks)


@dataclass(frozen=True)
class Comparison:
    title: str
    paper: tuple[Dataset, ...]
    embedded: tuple[Dataset, ...]
    variants: Callable[[bool], list[tuple[str, ...]]]  # paper mode -> override sets, each swept over seeds


def _objective_transfer(paper: bool) -> list[tuple[str, ...]]:
    source, name = ("dataset=iwildcam", "iWildCam") if paper else ("dataset.world.seed=99", "world 99")
    return [("method=ft,autoft",), ("method=autoft", "method.name=autoft-transfer",
                                    f"method.label='AutoFT (objective from {name})'",
                                    f'method.search_overrides=["{source}"]')]


COMPARISONS: dict[str, Comparison] = {
    "wilds": Comparison("WILDS (iWildCam macro-F1, FMoW worst-region accuracy)",
                        (("iwildcam", ("dataset=iwildcam",)), ("fmow", ("dataset=fmow",))), EMBEDDED,
                        lambda paper: [(MAIN,)]),
    "imagenet": Comparison("ImageNet; OOD = mean of ImageNet-V2, -R, -A, -Sketch and ObjectNet",
                           (("imagenet", ("dataset=imagenet",)),), EMBEDDED, lambda paper: [(NO_L2SP,)]),
    "fewshot": Comparison("Few-shot: PatchCamelyon, SST2, ImageNet at k = 4, 16, 32",
                          (*_shots("pcam_fewshot", "pcam"), *_shots("sst2_fewshot", "sst2"),
                           ("imagenet-4shot", ("dataset=imagenet_4shot",)),
                           ("imagenet-16shot", ("dataset=imagenet_16shot",)),
                           ("imagenet-32shot", ("dataset=imagenet_32shot",))),
                          tuple((f"embedded-{k}shot", ("dataset=embedded", f"++dataset.shots={k}",
                                                       "++dataset.search_metric=neg_ce")) for k in (4, 16, 32)),
                          lambda paper: [(NO_L2SP,)]),
    "transfer": Comparison("Transfer learning: Caltech101, StanfordCars, Flowers102 (accuracy)",
                           (("caltech101", ("dataset=caltech101",)), ("stanford_cars", ("dataset=stanford_cars",)),
                            ("flowers102", ("dataset=flowers102",))), EMBEDDED, lambda paper: [(NO_L2SP,)]),
    "objective-transfer": Comparison("Ablation: an objective learned on another task (iWildCam -> FMoW)",
                                     (("fmow", ("dataset=fmow",)),), EMBEDDED, _objective_transfer),
    "val-set": Comparison("Ablation: the search scored on ID or OOD validation data",
                          (("iwildcam", ("dataset=iwildcam",)),), EMBEDDED,
                          lambda paper: [("method=ft,autoft",),
                                         ("method=autoft", "method.name=autoft-idval", "method.label='AutoFT (ID val)'",
                                          'method.search_overrides=["returns=[val_id]"]')]),
    "sampler": Comparison("Ablation: the search's sampler", (("iwildcam", ("dataset=iwildcam",)),), EMBEDDED,
                          lambda paper: [("method=autoft", f"method.sampler={s}", f"method.name=autoft-{s}",
                                          f"method.label='AutoFT ({s})'") for s in ("tpe", "random", "qmc", "cmaes")]),
}

# Published figures (percent): (ID, OOD, source), for CLIP ViT-B/16 unless the source says otherwise.
PUBLISHED: dict[tuple[str, str], tuple[float | None, float | None, str]] = {
    ("iwildcam", "flyp"): (52.2, 35.6, "FLYP, ViT-B/16"),
    ("fmow", "flyp"): (68.6, 41.3, "FLYP, ViT-B/16"),
    ("iwildcam", "autoft"): (63.5, 52.0, "WILDS leaderboard: ViT-L/14@336 + WiSE-FT"),
    ("fmow", "autoft"): (None, 51.8, "WILDS leaderboard"),
    ("imagenet", "zeroshot"): (68.3, 58.7, "ViT-B/16, later papers"),
    ("imagenet", "ft"): (81.3, 54.9, "ViT-B/16, later papers"),
    ("imagenet", "lpft"): (81.7, 60.3, "ViT-B/16, later papers"),
    ("imagenet", "flyp"): (82.2, 59.5, "ViT-B/16, later papers"),
}
WISE_ALPHA = 0.5


def method_names(variant: tuple[str, ...]) -> list[str]:
    """The method names (run directories) a variant's jobs get."""
    named = [o.split("=", 1)[1] for o in variant if o.startswith("method.name=")]
    return named or [n for o in variant if o.startswith("method=") for n in o.split("=", 1)[1].split(",")]


def restrict(variant: tuple[str, ...], keep: set[str] | None) -> tuple[str, ...] | None:
    """``variant`` with only the methods in ``keep`` (None: all); None when none of its methods is kept."""
    if keep is None:
        return variant
    names = [n for n in method_names(variant) if n in keep]
    if not names:
        return None
    if any(o.startswith("method.name=") for o in variant):
        return variant
    return tuple(f"method={','.join(names)}" if o.startswith("method=") else o for o in variant)


def merge_search_overrides(overrides: list[str]) -> list[str]:
    """One ``method.search_overrides`` list from the variant's and the user's (the last would replace the first)."""
    key = "method.search_overrides="
    lists = [yaml.safe_load(o[len(key):]) for o in overrides if o.startswith(key)]
    rest = [o for o in overrides if not o.startswith(key)]
    return rest + ([key + json.dumps([x for part in lists for x in part], separators=(",", ":"))] if lists else [])


def seed_overrides(seeds: list[int], paper: bool) -> list[list[str]]:
    """One multirun over the seeds on real data; on the embedded world one per seed k, in world k with its own
    pretrained tiny CLIP, so the spread over seeds includes the world's (an interpolation ``${seed}`` would not
    do: inside a search trial ``seed`` is a searched parameter)."""
    if paper:
        return [["seed=" + ",".join(map(str, seeds))]]
    return [[f"seed={k}", f"dataset.world.seed={k}"] for k in seeds]


def launch(overrides: list[str]) -> int:
    cmd = [sys.executable, "-m", "autoft.methods", "-m", *overrides]
    print("+ " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd).returncode


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict], names: list[str]) -> dict[str, dict]:
    """Per method (in ``names`` order): label, per-seed ID/OOD, mean/std, and the mean WiSE-FT curve."""
    out: dict[str, dict] = {}
    for name in names:
        rows = sorted((r for r in records if r["method"] == name), key=lambda r: r["seed"])
        if not rows:
            continue
        row = {"label": rows[0]["label"], "seeds": [r["seed"] for r in rows], "metric": rows[0]["metric"],
               "id": [r["id"] for r in rows], "ood": [r["ood"] for r in rows]}
        if len(rows[0]["wise"]) > 1:  # a trained method: its WiSE-FT curve, averaged over seeds per alpha
            alphas = [w["alpha"] for w in rows[0]["wise"]]
            row["wise"] = [{"alpha": a, **{k: statistics.fmean(r["wise"][i][k] for r in rows) for k in ("id", "ood")
                                           if rows[0]["wise"][i][k] is not None}} for i, a in enumerate(alphas)]
            row["wise_at"] = {k: [min(r["wise"], key=lambda w: abs(w["alpha"] - WISE_ALPHA))[k] for r in rows]
                              for k in ("id", "ood")}
        out[name] = row
    return out


def _cell(values: list[float | None]) -> str:
    if not values or values[0] is None:
        return "—"
    mean, std = _stats([100 * v for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def tables(comparison: str, dataset: str, summary: dict[str, dict], paper: bool) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows for one dataset: each method, then each trained method + WiSE-FT."""
    lines = ["| method | ID test | OOD test | published ID | published OOD | seeds |", "|---|---:|---:|---:|---:|---:|"]
    rows = []
    entries = [(n, s["label"], s["id"], s["ood"]) for n, s in summary.items()]
    entries += [(f"{n}+wise", f"{s['label']} + WiSE-FT (α={WISE_ALPHA:g})", s["wise_at"]["id"], s["wise_at"]["ood"])
                for n, s in summary.items() if "wise_at" in s]
    for name, label, ids, oods in entries:
        pub_id, pub_ood, source = PUBLISHED.get((dataset, name), (None, None, "")) if paper else (None, None, "")
        seeds = summary[name.removesuffix("+wise")]["seeds"]
        pub = ["—" if v is None else f"{v:.1f}" for v in (pub_id, pub_ood)]
        note = f" ({source})" if source else ""
        lines.append(f"| {label} | {_cell(ids)} | {_cell(oods)} | {pub[0]} | {pub[1]}{note} | {len(seeds)} |")
        id_mean, id_std = _stats(ids)
        ood_mean, ood_std = _stats(oods) if oods[0] is not None else (None, None)
        rows.append({"comparison": comparison, "dataset": dataset, "method": name, "label": label,
                     "metric": summary[name.removesuffix("+wise")]["metric"], "seeds": " ".join(map(str, seeds)),
                     "id_mean": id_mean, "id_std": id_std, "ood_mean": ood_mean, "ood_std": ood_std,
                     "published_id": pub_id, "published_ood": pub_ood, "published_source": source,
                     "id_per_seed": " ".join(f"{v:.4f}" for v in ids),
                     "ood_per_seed": " ".join("" if v is None else f"{v:.4f}" for v in oods)})
    return lines, rows


def plot(path: Path, summary: dict[str, dict]) -> Path | None:
    """ID-vs-OOD scatter (mean ± std over seeds) with the mean WiSE-FT curves; None without an OOD test set."""
    if any(v is None for s in summary.values() for v in s["ood"]):
        return None
    rows = {}
    for s in summary.values():
        (id_mean, id_std), (ood_mean, ood_std) = _stats(s["id"]), _stats(s["ood"])
        rows[s["label"]] = {"id": id_mean, "ood": ood_mean, "id_std": id_std, "ood_std": ood_std}
    wise = {f"{s['label']} + WiSE-FT": s["wise"] for s in summary.values() if "wise" in s}
    metric = next(iter(summary.values()))["metric"]
    return write_robustness_plot(path, rows, wise, metric)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--paper", action="store_true", help="the paper's datasets (default: the embedded world)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=None, help="model config (default: vit_b16 with --paper, else tiny_clip)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (names as in the runs)")
    parser.add_argument("--datasets", nargs="+", default=None, help="only these of the comparison's datasets")
    parser.add_argument("--out", type=Path, default=Path("outputs/paper"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. logger=csv")
    args = parser.parse_intermixed_args(argv)
    comp = COMPARISONS[args.comparison]
    model = args.model or ("vit_b16" if args.paper else "tiny_clip")
    keep = set(args.methods) if args.methods else None
    variants = [v for v in (restrict(v, keep) for v in comp.variants(args.paper)) if v is not None]
    datasets = comp.paper if args.paper else comp.embedded
    if args.datasets:
        datasets = tuple(d for d in datasets if d[0] in args.datasets)
    known = [n for v in comp.variants(args.paper) for n in method_names(v)]
    if not variants or not datasets:
        print(f"error: nothing to run: methods of {args.comparison}: {' '.join(known)}; datasets: "
              f"{' '.join(d[0] for d in (comp.paper if args.paper else comp.embedded))}", file=sys.stderr)
        return 2
    names = [n for v in variants for n in method_names(v)]
    t0 = time.time()
    md = [f"# {comp.title}", "", f"Model {model}; seeds {' '.join(map(str, args.seeds))}; mean ± std in percent."]
    if not args.paper:
        md.append("Embedded world: a procedural stand-in in WILDS iWildCam layout, not a dataset of the paper; "
                  "no published figure applies.")
    csv_rows: list[dict] = []
    out = args.out / args.comparison
    for label, dataset_overrides in datasets:
        study = f"{label}-{model}"
        runs = (args.out / "runs" / study).resolve()
        for variant in variants:
            for seeds in seed_overrides(args.seeds, args.paper):
                overrides = [*dataset_overrides, f"model={model}", f"study={study}", f"hydra.sweep.dir={runs}",
                             *seeds, *variant, *args.overrides]
                if launch(merge_search_overrides(overrides)) != 0:
                    print(f"error: the {label} runs failed (see above); re-running resumes them", file=sys.stderr)
                    return 2
        records = [json.loads(p.read_text()) for p in sorted(runs.glob("*/method.json"))]
        summary = summarise([r for r in records if r["seed"] in args.seeds], names)
        lines, rows = tables(args.comparison, label, summary, args.paper)
        csv_rows += rows
        md += ["", f"## {label} ({next(iter(summary.values()))['metric']})", "", *lines]
        out.mkdir(parents=True, exist_ok=True)
        png = plot(out / f"{label}-id-vs-ood.png", summary)
        md += ["", f"![ID vs OOD]({png.name})" if png else "No OOD test set: no ID-vs-OOD plot."]
    md += ["", f"{time.time() - t0:.0f} s in all (jobs already done were reused)."]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write(out / "table.csv", buf.getvalue())
    atomic_write(out / "table.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
