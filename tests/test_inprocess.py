"""tests/inprocess.py: a command run in the test process gives the exit status its process would, and leaves the
caller's Hydra run, argv and loggers as they were (the paper.py suite nests a search inside a methods job)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from tests.inprocess import call_main, run_module, subprocess_in_process


def _app(conf: Path, body):
    conf.mkdir(exist_ok=True)
    (conf / "config.yaml").write_text("name: outer\n")
    return hydra.main(config_path=str(conf), config_name="config", version_base="1.3")(body)


def test_a_nested_run_hands_the_outer_hydra_run_back(tmp_path):
    seen = []

    def inner(cfg):
        seen.append(("inner", cfg.name, HydraConfig.get().job.num))

    def outer(cfg):
        code = call_main(_app(tmp_path / "inner-conf", inner), ["-m", "name=inner,other",
                                                                f"hydra.sweep.dir={tmp_path / 'in'}"], prog="inner")
        seen.append(("outer", cfg.name, HydraConfig.get().job.num, code, HydraConfig.get().sweep.dir))

    argv = sys.argv[:]
    code = call_main(_app(tmp_path / "conf", outer), ["-m", "name=a,b", f"hydra.sweep.dir={tmp_path / 'out'}"], "outer")
    assert code == 0 and sys.argv == argv and not GlobalHydra.instance().is_initialized()
    out = str(tmp_path / "out")
    assert seen == [("inner", "inner", 0), ("inner", "other", 1), ("outer", "a", 0, 0, out),
                    ("inner", "inner", 0), ("inner", "other", 1), ("outer", "b", 1, 0, out)]


def test_exit_status_is_the_commands_and_loggers_are_put_back(tmp_path, capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def fails(cfg):
        logging.getLogger(__name__).info("job log line")
        print("error: one line", file=sys.stderr)
        sys.exit(2)

    assert call_main(_app(tmp_path / "conf", fails), [f"hydra.run.dir={tmp_path / 'run'}"], "fails") == 2
    assert capsys.readouterr().err == "error: one line\n"
    assert "job log line" in next((tmp_path / "run").glob("*.log")).read_text()  # Hydra's job logging ran ...
    assert root.handlers == handlers and root.level == level  # ... and is undone
    assert call_main(_app(tmp_path / "conf", lambda cfg: None), [f"hydra.run.dir={tmp_path / 'ok'}"], "ok") == 0
    assert call_main(lambda: 2, [], "returns") == 2  # a module that exits with sys.exit(main())


def test_only_plain_python_m_multiruns_run_in_process():
    fake = subprocess_in_process()
    assert fake.run is run_module and fake.PIPE is not None and fake.Popen.__name__ == "Popen"
    for cmd, kwargs in (([sys.executable, "-c", "pass"], {}),  # not python -m
                        ([sys.executable, "-m", "autoft.finetune", "-m"], {"capture_output": True}),  # captured
                        ([sys.executable, "-m", "autoft.finetune", "dataset=iwildcam"], {})):  # a run: its preflight
        try:
            run_module(cmd, **kwargs)
        except AssertionError as e:
            assert "run it as a subprocess" in str(e), e
        else:
            raise AssertionError(f"ran in process: {cmd} {kwargs}")
