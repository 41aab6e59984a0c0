"""Run `python -m autoft.<app> ARGS` inside the test process: the same ``main``, argv and exit status, no new
interpreter.

Each `python -m autoft...` pays its imports again (about 12 s on the 2-core CI machine), and benchmarks/paper.py
starts one per sweep plus one per AutoFT search: most of the methods suite's time was start-up. Tests whose claim
is not about the process boundary (exit codes of a whole command, kill -9, DDP keep their subprocesses) swap the
``subprocess`` of the launching module for :func:`subprocess_in_process`, so the production launch code (its
command line, its error handling) still runs, and only the process start is skipped.

What a process would have isolated is restored here: Hydra's per-run singletons (a nested app, the search inside
a methods job, gets its own and hands the outer run's back), ``sys.argv``, and the loggers Hydra's job logging
reconfigures. What a module runs only as ``__main__`` does not run here: the apps' preflight (autoft/preflight.py),
which checks no data for a multirun (``-m``, it only composes one); so :func:`run_module` takes multiruns only.
"""

from __future__ import annotations

import importlib
import logging
import os
import runpy
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobRuntime


@contextmanager
def _own_hydra() -> Iterator[None]:
    """A fresh GlobalHydra, HydraConfig and JobRuntime for one app run; the caller's are back afterwards. The
    ConfigStore and the plugins stay shared: they were filled at import, which a process would do again."""
    saved = dict(Singleton._instances)
    for cls in (GlobalHydra, HydraConfig, JobRuntime):
        Singleton._instances.pop(cls, None)
    try:
        yield
    finally:
        Singleton._instances.clear()
        Singleton._instances.update(saved)


@contextmanager
def _own_logging() -> Iterator[None]:
    """Hydra's job logging replaces the root logger's handlers (console, a log file in the job's folder) and
    sets levels: close what the run added and put every logger back as it was."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]
    state = {lg: (lg.level, lg.handlers[:], lg.propagate, lg.disabled) for lg in loggers}
    try:
        yield
    finally:
        for lg in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                          if isinstance(v, logging.Logger))]:
            level, handlers, propagate, disabled = state.get(lg, (logging.NOTSET, [], True, False))
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled


def call_main(main: Callable[[], Any], argv: list[str], prog: str) -> int:
    """``main()`` as its command line would run it with ``argv``: its exit status (SystemExit's code; else what
    ``main`` returns if that is an int, as ``sys.exit(main())`` would exit with it; else 0)."""
    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        with _own_hydra(), _own_logging():
            result = main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return result if isinstance(result, int) else 0


def run_script(script: Path, argv: list[str]) -> int:
    """`python SCRIPT ARGV` run from the script's folder, in this process (as ``__main__``): its exit status."""
    cwd = os.getcwd()
    os.chdir(script.parent)
    try:
        return call_main(lambda: runpy.run_path(str(script), run_name="__main__"), argv, prog=str(script))
    finally:
        os.chdir(cwd)


def run_module(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Stands in for ``subprocess.run([sys.executable, "-m", module, "-m", *overrides])`` (a Hydra multirun, as
    paper.py's sweeps and the AutoFT search are) of a launcher that neither captures output nor passes other
    options: output goes where the test's output goes."""
    if cmd[:2] != [sys.executable, "-m"] or "-m" not in cmd[3:] or kwargs:
        raise AssertionError(f"not a plain `python -m` multirun, run it as a subprocess: {cmd} {kwargs}")
    module = importlib.import_module(cmd[2])
    return subprocess.CompletedProcess(cmd, call_main(module.main, cmd[3:], prog=module.__file__))


def subprocess_in_process() -> types.ModuleType:
    """A ``subprocess`` module whose ``run`` is :func:`run_module`, for ``monkeypatch.setattr(mod, "subprocess",
    ...)``: only the patched module's launches change."""
    fake = types.ModuleType("subprocess")
    fake.__dict__.update({k: v for k, v in vars(subprocess).items() if not k.startswith("__")})
    fake.run = run_module
    return fake
