"""The run's report: ID/OOD results table, best searched objective, search plots and effective-robustness plot.

Why: AutoFT claims OOD robustness beyond what ID performance predicts. A table alone hides that, so the report also
draws every method (and the WiSE-FT interpolation curves) in ID-vs-OOD space next to the y = x line, and shows how the
Optuna search went (history, parameter importances). The main job calls ``write_report`` at the very end of a run,
so every file goes to a temporary name first and is moved into place with ``os.replace``: an interrupted or failing
run never leaves a half-written report under a final name. Plots are rendered with the Agg backend (no display).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # batch job on headless nodes: never open a GUI backend

import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from autoft import atomic_write  # noqa: E402

log = logging.getLogger(__name__)

DPI = 150
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def results_table(rows: Mapping[str, Mapping[str, float]], metric: str = "macro-F1") -> str:
    """Markdown table of ID and OOD test ``metric`` per method, 3 decimals, ``± std`` where the row has one."""
    lines = [f"| method | ID test {metric} | OOD test {metric} |", "|---|---:|---:|"]
    for name, row in rows.items():
        cells = [
            name.replace("|", r"\|"),
            _mean_std(row["id"], row.get("id_std")),
            _mean_std(row["ood"], row.get("ood_std")),
        ]
        lines.append("| " + " | ".join(cells) + " |")  # a literal pipe in a name would split its cell: escaped
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: Path,
    rows: Mapping[str, Mapping[str, float]],
    best: Mapping[str, Any],
    wise: Mapping[str, list[dict[str, float]]] | None,
    study: optuna.Study | None,
    metric: str = "macro-F1",
) -> dict[str, Path]:
    """Write results.md, results.json, the study's plots (where it has enough trials) and effective_robustness.png.

    ``rows`` maps a method to ``{"id", "ood"}`` (optionally ``"id_std"``, ``"ood_std"``); ``best`` holds the best
    searched objective (``"value"``/``"values"``, ``"params"``, anything else worth listing); ``wise`` maps a curve
    name to ``[{"alpha", "id", "ood"}, ...]`` sorted by alpha. Returns file name -> path of each file written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = f"# Results\n\n{results_table(rows, metric)}\n{_best_section(best)}"
    payload = json.dumps({"results": rows, "best": best, "wise": wise}, indent=1, default=_to_json)
    written = {
        "results.md": atomic_write(out_dir / "results.md", markdown),
        "results.json": atomic_write(out_dir / "results.json", payload),
    }
    if study is None:
        log.warning("No study given: skipping the optimization history and parameter importance plots.")
    else:
        written.update(plot_study(study, out_dir))
    fig = _robustness_figure(rows, wise or {}, metric)
    written["effective_robustness.png"] = _save_figure(fig, out_dir / "effective_robustness.png")
    log.info("Report written to %s: %s", out_dir, ", ".join(written))
    return written


def plot_study(study: optuna.Study, out_dir: Path) -> dict[str, Path]:
    """Save optimization_history.png (>= 1 COMPLETE trial) and param_importances.png (>= 2 with varying params).

    Multi-objective studies are plotted for their last objective. Returns file name -> path of each plot written.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        log.warning("Study %r has no COMPLETE trial: skipping its plots.", study.study_name)
        return {}
    target, target_name = _study_target(study)
    vis = optuna.visualization.matplotlib
    written: dict[str, Path] = {}
    # optuna's plots are experimental (warning) and switch pyplot to its ggplot style: keep both local.
    with warnings.catch_warnings(), plt.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = vis.plot_optimization_history(study, target=target, target_name=target_name)
        path = out_dir / "optimization_history.png"
        written[path.name] = _save_figure(ax.figure, path)

        if len(complete) < 2 or not _params_vary(complete):
            log.warning(
                "Study %r needs >= 2 COMPLETE trials with varying params: skipping importances.", study.study_name
            )
            return written
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        try:
            ax = vis.plot_param_importances(study, evaluator=evaluator, target=target, target_name=target_name)
        except (ValueError, RuntimeError) as err:  # dynamic search space; zero total variance in fANOVA's trees
            log.warning("Skipping parameter importances of study %r: %s", study.study_name, err)
            return written
        path = out_dir / "param_importances.png"
        written[path.name] = _save_figure(ax.figure, path)
    return written


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _best_section(best: Mapping[str, Any]) -> str:
    """Markdown listing of the best objective: its value(s) and other fields, then its params as a table."""
    lines = ["## Best objective", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in best.items() if key != "params"]
    params = best.get("params") or {}
    if params:
        lines += ["", "| param | value |", "|---|---:|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in params.items()]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _to_json(obj: Any) -> Any:
    """Numpy / torch scalars (e.g. metrics straight from a trainer) as plain Python numbers."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as PNG atomically and release it from pyplot."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _study_target(study: optuna.Study) -> tuple[Callable[[FrozenTrial], float] | None, str]:
    """What to plot: the objective of a single-objective study, the last objective of a multi-objective one."""
    names = study.metric_names
    if len(study.directions) == 1:
        return None, names[0] if names else "Objective Value"
    last = len(study.directions) - 1
    return (lambda trial: trial.values[last]), names[last] if names else f"Objective {last}"


def _params_vary(trials: Iterable[FrozenTrial]) -> bool:
    """Whether some parameter takes more than one value across ``trials`` (else importances are meaningless)."""
    seen: dict[str, set[Any]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(value)
    return any(len(values) > 1 for values in seen.values())


def write_robustness_plot(path: Path, rows: Mapping[str, Mapping[str, float]],
                          wise: Mapping[str, list[dict[str, float]]], metric: str) -> Path:
    """The ID-vs-OOD scatter (methods with error bars, WiSE-FT curves, y = x) as a PNG, written atomically."""
    return _save_figure(_robustness_figure(rows, wise, metric), Path(path))


def _robustness_figure(
    rows: Mapping[str, Mapping[str, float]], wise: Mapping[str, list[dict[str, float]]], metric: str
) -> Figure:
    """ID-vs-OOD scatter of the methods, WiSE-FT curves over alpha, and the y = x line, on shared axis limits."""
    fig, ax = plt.subplots(figsize=(6.5, 6.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    method_color: dict[str, str] = {}
    handles: list[Any] = []  # legend order: methods, curves, y = x (matplotlib would put lines before errorbars)
    for i, (name, row) in enumerate(rows.items()):
        method_color[name] = colors[i % len(colors)]
        handle = ax.errorbar(
            row["id"],
            row["ood"],
            xerr=row.get("id_std"),
            yerr=row.get("ood_std"),
            fmt=_MARKERS[i % len(_MARKERS)],
            color=method_color[name],
            markersize=9,
            capsize=3,
            label=name,
            zorder=3,
        )
        handles.append(handle)
    annotated: set[tuple[float, float, float]] = set()
    for j, (name, points) in enumerate(wise.items()):
        # A curve "X + WiSE-FT" takes the colour of method "X" when there is one.
        owner = max((m for m in rows if name == m or name.startswith(m + " ")), key=len, default=None)
        color = method_color[owner] if owner else colors[(len(rows) + j) % len(colors)]
        xs, ys = [p["id"] for p in points], [p["ood"] for p in points]
        handles += ax.plot(xs, ys, "-o", color=color, markersize=4, linewidth=1.5, alpha=0.85, label=name, zorder=2)
        for p in (points[0], points[-1]) if points else ():
            key = (round(p["id"], 4), round(p["ood"], 4), p["alpha"])
            if key not in annotated:  # curves share their alpha = 0 (zero-shot) end: label it once
                annotated.add(key)
                ax.annotate(
                    f"α={p['alpha']:g}",
                    (p["id"], p["ood"]),
                    xytext=(6, -10),
                    textcoords="offset points",
                    fontsize=8,
                    color=color,
                )
    points = [(r["id"], r["ood"]) for r in rows.values()] + [(p["id"], p["ood"]) for ps in wise.values() for p in ps]
    lo, hi = _shared_limits([v for point in points for v in point])
    handles += ax.plot([lo, hi], [lo, hi], "--", color="0.5", linewidth=1, label="y = x", zorder=1)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"ID test {metric}", ylabel=f"OOD test {metric}")
    ax.set_title("Effective robustness")
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="best", fontsize=8)
    return fig


def _shared_limits(values: list[float]) -> tuple[float, float]:
    """Limits covering every finite value with an 8% margin (room for alpha labels), shared so y = x is the diagonal."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = max(0.08 * (hi - lo), 0.02)
    return lo - pad, hi + pad
