"""Where a search trial's time goes: the embedded world's default search run in this process, every part named.

``benchmarks/throughput.py --sections trial`` runs ``python -m autoft.finetune -m search=embedded`` here,
in this process (Hydra's basic launcher, the project's sweeper, an SQLite study), and times each trial
(:func:`autoft.trial.run`) by phases: the functions and Lightning hooks a trial goes through are wrapped
with a timer, and each moment of the trial is given to the innermost phase open then (so the phases add
up to the trial, and "unattributed" is what no phase covers). On CUDA every phase boundary synchronises,
so a phase holds the GPU work it queued. Trial 1 builds model and data; later trials are what a search
pays hundreds of times, so the figures are their medians. Also reported, outside the trial: the time
between trials (Hydra's job set-up, the sweeper's ask and tell) and the background thread that writes
each trial's W&B run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

# (phase, what it is), in a trial's order; the keys of the breakdown
PHASES = [
    ("optuna trial", "the job's Optuna trial (trial_from_config: the sweeper's own in its process)"),
    ("reset", "model restored to the pretrained weights, data module kept (build with reuse)"),
    ("logger set-up", "the trial's logger and its hyperparameters (make_logger)"),
    ("seeding", "pl.seed_everything"),
    ("objective + theta0", "CompositeObjective: terms and the theta0 copy"),
    ("module", "FineTuner construction"),
    ("trainer construction", "pl.Trainer(...) (make_trainer)"),
    ("fit set-up", "Lightning from fit() to the first training batch's fetch: strategy, hooks, loaders"),
    ("optimizer construction", "configure_optimizers (fused AdamW)"),
    ("first batch", "the first training batch: loader iterator, fetch, device transform"),
    ("training steps", "training batches: forward, objective, backward, norm gradients, AdamW"),
    ("batch wait: loader", "later training batches: the loader's fetch"),
    ("batch wait: to device", "later training batches: copy to the device"),
    ("batch wait: device transform", "later training batches: crop and normalise on the device"),
    ("batch wait: loop", "Lightning between a batch's end and the next one's start (logging, progress)"),
    ("validation", "validation: set-up, loader, forward, metrics"),
    ("pruning report", "OptunaPruning: report to the study, should_prune"),
    ("fit teardown", "Lightning after the last batch: strategy and loggers' teardown"),
    ("logger finish", "summary and closing the trial's run (finish_logger)"),
    ("results.json", "the trial's results file, written atomically"),
    ("unattributed", "the rest of run(): what no phase above covers"),
]
INSIDE = ("training steps", "validation")  # the trial's own work; everything else is overhead


class Phases:
    """Wall time of the main thread by phase, each moment given to the innermost open phase; and the main
    thread's CPU time by phase (``cpu``): on a machine shared with other work, a phase's CPU time is
    close to its wall time on a quiet one, where it does not wait (on a GPU, a file, another process)."""

    def __init__(self, device: str):
        self.device, self.main = device, threading.main_thread()
        self.stack: list[str] = []
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.mark, self.cpu_mark = time.perf_counter(), time.thread_time()
        self.undo: list[Callable[[], None]] = []

    def _switch(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.thread_time()
        if self.stack:
            self.totals[self.stack[-1]] += now - self.mark
            self.cpu[self.stack[-1]] += cpu - self.cpu_mark
        self.mark, self.cpu_mark = now, cpu

    def push(self, name: str) -> None:
        self._switch()
        self.stack.append(name)

    def pop(self) -> None:
        self._switch()
        self.stack.pop()

    def set_top(self, name: str, under: str) -> None:
        """Make ``name`` the phase just above ``under`` (Lightning's hooks move from one to the next)."""
        self._switch()
        del self.stack[self.stack.index(under) + 1:]
        self.stack.append(name)

    def wrap(self, owner: Any, attr: str, name: str | Callable[[], str]) -> None:
        """Time ``owner.attr`` (a function, method or class attribute) as phase ``name`` while it runs."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            if threading.current_thread() is not self.main or not self.stack:
                return original(*args, **kwargs)
            self.push(name() if callable(name) else name)
            try:
                return original(*args, **kwargs)
            finally:
                self.pop()

        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()


class LightningPhases(pl.Callback):
    """Moves the fit's phase along Lightning's hooks: set-up, first batch, steps, batch wait, validation,
    teardown."""

    def __init__(self, phases: Phases):
        self.phases, self.first = phases, True

    def _to(self, name: str) -> None:
        self.phases.set_top(name, "fit")

    def on_train_start(self, *a) -> None:
        self._to("first batch")

    def on_train_batch_start(self, *a) -> None:
        self._to("training steps")

    def on_train_batch_end(self, *a) -> None:
        self._to("batch wait: loop")

    def on_validation_start(self, trainer: pl.Trainer, *a) -> None:
        if not trainer.sanity_checking:
            self._to("validation")

    def on_validation_end(self, trainer: pl.Trainer, *a) -> None:
        if not trainer.sanity_checking:
            self._to("batch wait: loop")

    def on_train_end(self, *a) -> None:
        self._to("fit teardown")


def _batch_phase(phases: Phases, part: str) -> Callable[[], str]:
    """A batch's loader fetch, copy or device transform: part of validation, the first batch, or the wait."""
    def name() -> str:
        top = phases.stack[-1]
        return top if top in ("validation", "first batch") else f"batch wait: {part}"
    return name


def _named(totals: dict[str, float]) -> dict[str, float]:
    """Totals by the phases of PHASES; the fit's own frame (around Lightning's phases) goes to unattributed."""
    names = dict(PHASES)
    out: dict[str, float] = defaultdict(float)
    for k, v in totals.items():
        out[k if k in names else "unattributed"] += v
    return dict(out)


def instrument(phases: Phases, trials: list[dict[str, float]], writes: list[float]) -> None:
    """Wrap what a trial calls; each finished trial's phases are appended to ``trials``, and the time
    of each background W&B write to ``writes``."""
    import torch.utils.data.dataloader as dl
    from pytorch_lightning.strategies import Strategy

    import autoft.finetune as ft
    import autoft.loggers as loggers
    import autoft.trial as trial
    from autoft.imagecache import CachedLoaders
    from autoft.objective import CompositeObjective

    last_end = [None]
    between: list[float] = []

    original_run = trial.run

    def timed_run(cfg):
        start = time.perf_counter()
        if last_end[0] is not None:
            between.append(start - last_end[0])
        phases.totals.clear()
        phases.cpu.clear()
        phases.push("unattributed")
        try:
            return original_run(cfg)
        finally:
            phases.pop()
            assert not phases.stack, phases.stack
            end = time.perf_counter()
            trials.append(_named(phases.totals) | {f"cpu:{k}": v for k, v in _named(phases.cpu).items()}
                          | {"trial_s": end - start, "between_s": between[-1] if between else float("nan")})
            last_end[0] = end

    trial.run = timed_run
    phases.undo.append(lambda: setattr(trial, "run", original_run))
    phases.wrap(trial, "trial_from_config", "optuna trial")
    phases.wrap(trial, "build", "reset")
    phases.wrap(trial, "make_logger", "logger set-up")
    phases.wrap(trial, "finish_logger", "logger finish")
    phases.wrap(trial, "atomic_write", "results.json")
    phases.wrap(pl, "seed_everything", "seeding")
    phases.wrap(CompositeObjective, "__init__", "objective + theta0")
    phases.wrap(ft.FineTuner, "__init__", "module")
    phases.wrap(ft.FineTuner, "configure_optimizers", "optimizer construction")
    phases.wrap(trial.OptunaPruning, "on_validation_end", "pruning report")
    phases.wrap(dl._SingleProcessDataLoaderIter, "_next_data", _batch_phase(phases, "loader"))
    phases.wrap(dl._MultiProcessingDataLoaderIter, "_next_data", _batch_phase(phases, "loader"))
    phases.wrap(Strategy, "batch_to_device", _batch_phase(phases, "to device"))
    phases.wrap(CachedLoaders, "on_after_batch_transfer", _batch_phase(phases, "device transform"))

    original_trainer = ft.make_trainer

    def make_trainer(cfg, logger=None, **overrides):
        overrides["callbacks"] = [*overrides.get("callbacks", []), LightningPhases(phases)]
        return original_trainer(cfg, logger, **overrides)

    ft.make_trainer = make_trainer
    phases.undo.append(lambda: setattr(ft, "make_trainer", original_trainer))
    phases.wrap(ft, "make_trainer", "trainer construction")

    original_fit = pl.Trainer.fit

    def fit(self, *args, **kwargs):
        phases.push("fit")
        phases.push("fit set-up")
        try:
            return original_fit(self, *args, **kwargs)
        finally:
            phases.set_top("fit teardown", "fit")
            phases.pop()
            phases.pop()

    pl.Trainer.fit = fit
    phases.undo.append(lambda: setattr(pl.Trainer, "fit", original_fit))

    original_write = loggers._write

    def write(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_write(*args, **kwargs)
        finally:
            writes.append(time.perf_counter() - t0)

    loggers._write = write
    phases.undo.append(lambda: setattr(loggers, "_write", original_write))


def sweep_args(args, option: str, out: Path) -> list[str]:
    """The search command's arguments: the embedded world's default search, ``args.trials`` trials of the
    model config ``option``."""
    argv = ["-m", "search=embedded", f"model={option}", f"logger={args.logger}", f"hydra.sweep.dir={out}",
            f"hydra.sweeper.n_trials={args.trials}", f"model.compile={str(args.compile).lower()}",
            f"model.channels_last={str(args.channels_last).lower()}", *args.trial_override]
    if args.model != "tiny":
        argv.append("model.pretrained=null")  # random weights: speed only
    if args.device == "cpu":
        argv.append("trainer.accelerator=cpu")
    return argv


def bench_trial(args, option: str, out: Path) -> dict:
    """The embedded world's default search in this process (model config ``option``); each trial's phases."""
    from autoft import finetune
    from autoft.loggers import wait_for_runs

    phases = Phases(args.device)
    trials: list[dict[str, float]] = []
    writes: list[float] = []
    instrument(phases, trials, writes)
    argv = sys.argv
    sys.argv = ["autoft.finetune", *sweep_args(args, option, out)]
    try:
        finetune.main()
    finally:
        sys.argv = argv
        phases.restore()
    wait_for_runs()
    if len(trials) != args.trials:
        raise RuntimeError(f"{len(trials)} of {args.trials} trials ran: see the search's log above")
    names = [n for n, _ in PHASES]
    cpu_names = [f"cpu:{n}" for n in names]
    rows = [{"trial": i + 1} | {n: t.get(n, 0.0) for n in names + cpu_names}
            | {"trial_s": t["trial_s"], "between_s": t["between_s"]} for i, t in enumerate(trials)]
    for r in rows:
        r["outside_s"] = r["trial_s"] - sum(r[n] for n in INSIDE)
        r["outside_steps_s"] = r["trial_s"] - r["training steps"]
        r["cpu:outside_s"] = sum(r[f"cpu:{n}"] for n in names if n not in INSIDE)
        r["phases_s"] = sum(r[n] for n in names)  # equals trial_s: every moment is in one phase
    later = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in later)
           for k in [*names, *cpu_names, "trial_s", "outside_s", "outside_steps_s", "cpu:outside_s", "between_s"]}
    return {"config": {"search": "embedded", "trials": args.trials, "logger": args.logger, "device": args.device,
                       "overrides": sweep_args(args, option, out)[1:]},
            "phases": dict(PHASES), "trials": rows, "median_later": med,
            "wandb_background_s": writes, "outside_share": med["outside_s"] / med["trial_s"]}


def markdown(report: dict) -> str:
    """The breakdown as a table: each phase's median over trials 2.., and the first trial's."""
    m, first = report["median_later"], report["trials"][0]
    n = len(report["trials"])
    lines = [f"Search trials (`search=embedded`, logger {report['config']['logger']}, {report['config']['device']}); "
             f"seconds per trial: wall and the main thread's CPU time, median of trials 2..{n}, and trial 1's "
             "wall (it builds model and data):", "",
             "| phase | wall | CPU | trial 1 wall | what |", "|---|---|---|---|---|"]
    for name, what in report["phases"].items():
        lines.append(f"| {name} | {m[name]:.3f} | {m['cpu:' + name]:.3f} | {first[name]:.3f} | {what} |")
    writes = report["wandb_background_s"]
    lines += [f"| **trial** | **{m['trial_s']:.3f}** | | {first['trial_s']:.3f} | run(), all of the above |",
              f"| **outside steps and validation** | **{m['outside_s']:.3f}** | **{m['cpu:outside_s']:.3f}** | "
              f"{first['outside_s']:.3f} | the trial less training steps and validation "
              f"({report['outside_share']:.1%} of its wall time) |",
              f"| **outside training steps** | **{outside_steps(m):.3f}** | | {outside_steps(first):.3f} | "
              f"the trial less its training steps ({outside_steps(m) / m['trial_s']:.1%}) |",
              f"| between trials | {m['between_s']:.3f} | | | not in the trial: Hydra's job set-up, the sweeper's "
              "ask and tell |",
              f"| W&B run, background | {statistics.median(writes) if writes else 0:.3f} | | "
              f"{writes[0] if writes else 0:.3f} | not on the trial's path: writing its W&B run, beside the "
              "next trial |", ""]
    return "\n".join(lines)


def outside_steps(row: dict) -> float:
    """A trial's seconds outside its training steps (validation included); reports written before this
    figure had its own key give it from their medians."""
    return row.get("outside_steps_s", row["trial_s"] - row["training steps"])


def summary(files: list[Path]) -> str:
    """One line per saved breakdown (``trial-overhead.json``, or ``throughput.json``'s trial section)."""
    lines = ["| file | trial s | training steps s | validation s | outside steps s (share) "
             "| outside steps and validation s (share) |", "|---|---|---|---|---|---|"]
    for f in files:
        report = json.loads(f.read_text())
        m = report.get("trial", report)["median_later"]
        lines.append(f"| {f} | {m['trial_s']:.3f} | {m['training steps']:.3f} | {m['validation']:.3f} | "
                     f"{outside_steps(m):.3f} ({outside_steps(m) / m['trial_s']:.1%}) | "
                     f"{m['outside_s']:.3f} ({m['outside_s'] / m['trial_s']:.1%}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python benchmarks/trial_overhead.py FILE.json ... [--out F.md]: the summary table
    parser = argparse.ArgumentParser(description=summary.__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    table = summary(options.files)
    print(table, end="")
    if options.out:
        options.out.write_text(table)
