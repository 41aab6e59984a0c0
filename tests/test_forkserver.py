"""The fork server's own tests: a forked job ends, reports and is handled as `python ...` in a subprocess is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests import forkserver


def _script(tmp_path: Path, body: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("import sys; sys.exit(2)", 2), ("raise SystemExit(None)", 0),
                                            ("import sys; sys.exit('bad input')", 1)])
def test_exit_status_is_the_interpreters(tmp_path, body, code):
    proc = forkserver.run([sys.executable, str(_script(tmp_path, body))])
    assert proc.returncode == code, proc
    assert proc.stderr == ("bad input\n" if code == 1 else ""), proc


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(tmp_path):
    proc = forkserver.run([sys.executable, str(_script(tmp_path, "print('before', flush=True)\n1 / 0\n"))])
    assert proc.returncode == 1
    assert proc.stdout == "before\n"
    assert proc.stderr.startswith("Traceback (most recent call last):"), proc.stderr
    assert proc.stderr.endswith("ZeroDivisionError: division by zero\n"), proc.stderr


def test_kill_9_is_minus_9_and_poll_wait_follow_it(tmp_path):
    script = _script(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = forkserver.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\n"
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -9
    assert proc.returncode == -9 and proc.poll() == -9
    proc.stdout.close()


def test_outputs_are_captured_and_stdin_fed(tmp_path):
    script = _script(tmp_path, """\
        import sys
        print("out:" + sys.stdin.read())
        print("err line", file=sys.stderr)
    """)
    proc = forkserver.run([sys.executable, str(script)], input="fed")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "out:fed\n", "err line\n")
    both = forkserver.Popen([sys.executable, str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out, err = both.communicate(timeout=60)
    assert (both.returncode, out, err) == (0, b"out:\nerr line\n", None)


def test_cwd_and_environment_are_the_requests(tmp_path):
    script = _script(tmp_path, """\
        import os, sys, torch
        import fs_extra  # importable from PYTHONPATH only
        print(os.getcwd(), os.environ.get("FS_SET"), os.environ.get("FS_UNSET"), torch.get_num_threads(), sys.argv,
              sys.path[:2])
    """)
    work, extra = tmp_path / "work", tmp_path / "extra"
    work.mkdir()
    extra.mkdir()
    (extra / "fs_extra.py").write_text("")
    os.environ["FS_UNSET"] = "from the client"
    try:
        lines = [forkserver.run([sys.executable, str(script), "a b"], cwd=work,
                                env={"FS_SET": "x", "OMP_NUM_THREADS": n, "PYTHONPATH": str(extra)}).stdout
                 for n in ("1", "2")]
    finally:
        del os.environ["FS_UNSET"]
    argv, path = repr([str(script), "a b"]), repr([str(tmp_path), str(extra)])
    assert lines == [f"{work} x None {n} {argv} {path}\n" for n in (1, 2)]


def test_module_runs_as_python_m_does(tmp_path):
    pkg = tmp_path / "fspkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "app.py").write_text(textwrap.dedent("""\
        import atexit, sys, __main__
        assert sys.modules["__main__"] is __main__ and __main__.__dict__ is globals()
        atexit.register(lambda: print("at exit:", sys.modules["__main__"].__spec__.name))  # still this module
        assert "serve" not in globals(), "the server's globals leaked into __main__"
        print(__name__, __spec__.name, __main__.__spec__.name, sys.argv[1:], sys.argv[0] == __file__, sys.path[0])
    """))
    proc = forkserver.run([sys.executable, "-m", "fspkg.app", "x=1"], cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"__main__ fspkg.app fspkg.app ['x=1'] True {tmp_path}\nat exit: fspkg.app\n"


def test_a_preloaded_module_runs_as_main_without_runpy_s_warning(tmp_path):
    """The server imported autoft.conventions as a plain module; `python -m` of it must not find it imported."""
    assert "autoft.conventions" in forkserver.PRELOAD
    proc = forkserver.run([sys.executable, "-m", "autoft.conventions", "--help"], cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith("usage: ")


def test_non_daemon_thread_is_joined_and_atexit_runs_before_the_exit(tmp_path):
    script = _script(tmp_path, """\
        import atexit, sys, threading, time
        atexit.register(lambda: print("atexit", flush=True))
        def late():
            time.sleep(0.5)
            print("thread", flush=True)
        threading.Thread(target=late).start()
        print("main", end="\\n")  # left in the buffer: the shutdown flushes it
        sys.exit(3)
    """)
    proc = forkserver.run([sys.executable, str(script)])
    assert (proc.returncode, proc.stdout.split()) == (3, ["main", "thread", "atexit"]), proc


def test_what_is_left_in_stdout_and_stderr_buffers_is_flushed_at_the_exit(tmp_path):
    script = _script(tmp_path, "import sys\nsys.stdout.write('out')\nsys.stderr.write('err')\nsys.exit(4)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as a pipe's is
    proc = forkserver.run([sys.executable, str(script)], env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (4, "out", "err"), proc


def test_concurrent_children_report_their_own_status(tmp_path):
    script = _script(tmp_path, "import sys, time\ntime.sleep(float(sys.argv[1]))\nsys.exit(int(sys.argv[2]))\n")
    start = time.monotonic()
    procs = [forkserver.Popen([sys.executable, str(script), str(delay), str(code)])
             for delay, code in ((1.5, 4), (0.2, 5), (0.8, 0))]
    assert len({p.pid for p in procs}) == 3
    assert [p.wait(timeout=60) for p in procs] == [4, 5, 0]
    assert time.monotonic() - start < 2.5 + 1.0  # they ran at once (one after the other: 2.5 s and more)


def test_a_timeout_kills_the_child_and_keeps_its_output(tmp_path):
    script = _script(tmp_path, "import time\nprint('partial', flush=True)\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as e:
        forkserver.run([sys.executable, str(script)], timeout=1)
    assert e.value.output == "partial\n"


def test_each_child_gets_its_own_random_state(tmp_path):
    script = _script(tmp_path, "import random, numpy\nprint(random.random(), numpy.random.rand())\n")
    first, second = (forkserver.run([sys.executable, str(script)]).stdout.split() for _ in range(2))
    assert first[0] != second[0] and first[1] != second[1]


def test_what_is_not_an_interpreter_run_is_refused():
    for cmd in ([sys.executable, "-c", "pass"], ["python3", "x.py"], [sys.executable, "-u", "x.py"]):
        with pytest.raises(ValueError, match="run it as a subprocess"):
            forkserver.Popen(cmd)


def test_the_server_exits_with_its_client(tmp_path):
    """A client process starts a server that imports nothing, forks one job, and dies by SIGKILL: the server
    (whose pid the job reports as its parent's parent) must be gone soon after."""
    root = Path(__file__).resolve().parents[1]
    client = textwrap.dedent(f"""\
        import os, sys
        sys.path.insert(0, {str(root)!r})
        from tests import forkserver
        forkserver._server = forkserver._Server(preload=())
        print(forkserver._server.proc.pid, flush=True)
        forkserver.run([sys.executable, {str(_script(tmp_path, 'pass'))!r}])
        os.kill(os.getpid(), 9)
    """)
    with open(tmp_path / "client.err", "w") as err:  # the server writes its errors there: not a pipe to wait on
        proc = subprocess.run([sys.executable, "-c", client], stdout=subprocess.PIPE, stderr=err, text=True,
                              timeout=120)
    assert proc.returncode == -9, (proc, (tmp_path / "client.err").read_text())
    server = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{server}").exists() \
            and Path(f"/proc/{server}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{server}").exists() or Path(f"/proc/{server}/stat").read_text().split()[2] == "Z"


def test_a_server_with_a_thread_refuses_to_fork(tmp_path, monkeypatch):
    (tmp_path / "fs_threaded.py").write_text("import threading, time\n"
                                            "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    threaded = forkserver._Server(preload=("fs_threaded",))
    monkeypatch.setattr(forkserver, "_server", threaded)
    try:
        with pytest.raises(RuntimeError, match="has 2 threads, it forks only with one"):
            forkserver.Popen([sys.executable, str(_script(tmp_path, "pass"))])
    finally:
        threaded.ctl.close()
        threaded.proc.wait(timeout=30)


def test_a_server_started_without_omp_num_threads_still_forks(tmp_path, monkeypatch):
    """torch's import starts an OpenMP pool thread when OMP_NUM_THREADS is unset (`make test-faults-real` runs
    without pytest-xdist, which sets it): the server imports with one thread, so it can still fork."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with_torch = forkserver._Server(preload=("torch",))
    monkeypatch.setattr(forkserver, "_server", with_torch)
    try:
        proc = forkserver.run([sys.executable, str(_script(tmp_path, "print('ok')"))])
    finally:
        with_torch.ctl.close()
        with_torch.proc.wait(timeout=30)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc


def test_a_job_given_the_jobs_socket_has_its_own_subprocess_forked_by_the_server(tmp_path):
    """As Lightning's DDP launcher starts rank 1 from rank 0 (tests/test_ddp.py): the inner job is forked by this
    worker's server (its parent is a waiter of that server), not started by the outer job nor by a server of its
    own, and its exit status reaches the outer job's Popen."""
    root = Path(__file__).resolve().parents[1]
    inner = _script(tmp_path, "import os, sys\nwaiter = os.getppid()\n"
                    "print(waiter, open(f'/proc/{waiter}/stat').read().split()[3], flush=True)\nsys.exit(7)\n",
                    "inner.py")
    outer = _script(tmp_path, f"""\
        import os, subprocess, sys
        sys.path.insert(0, {str(root)!r})
        from tests import forkserver
        proc = forkserver.Popen([sys.executable, {str(inner)!r}], stdout=subprocess.PIPE, text=True)
        print(os.getpid(), proc.stdout.read().strip(), proc.wait(timeout=60))
    """, "outer.py")
    env = {**os.environ, forkserver.JOBS_ENV: forkserver.server().path}
    proc = forkserver.run([sys.executable, str(outer)], env=env, timeout=120)
    assert proc.returncode == 0, proc
    outer_pid, waiter, server_pid, code = proc.stdout.split()
    assert code == "7" and waiter != outer_pid
    assert int(server_pid) == forkserver.server().proc.pid
