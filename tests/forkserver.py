"""Run `python -m MODULE ARGS` or `python SCRIPT ARGS` as a real process, without paying the imports again.

A test whose claim is a process (its exit status, its one error line on stderr, kill -9 and resume) needs a
separate process with its own pid, fds and exit status, not a fresh interpreter: yet each `python -m autoft...`
spent about 12 s importing torch, Lightning and open_clip before doing its few seconds of work. This module is
both ends of a fork server:

- the server (this file run as a script, one per pytest worker, started on first use by :func:`server`) imports
  the training stack once, and never runs any of it: Hydra's, Optuna's and Lightning's singletons are made by the
  job, fresh in each child. Per request it forks a *waiter*, which forks the *job* and reports the job's pid and
  then its wait status (the server itself only reaps waiters, so any number of jobs can run at once, and no
  SIGCHLD disposition is changed for the jobs to inherit). Forking a process with threads would copy locks held
  by threads that do not exist in the child: the server refuses to fork unless it has exactly one thread.
- the job leaves the server's loop and runs the request as the interpreter would: the request's cwd, environment,
  stdin/stdout/stderr (passed as fds over a Unix socket), ``sys.argv``, ``sys.path[0]`` and a fresh ``__main__``
  (``-m`` through runpy's ``_run_module_as_main``, what ``python -m`` calls, so ``__spec__`` is the module's and
  Lightning's DDP launcher rebuilds the same command; a script executed in ``__main__`` as ``python SCRIPT``
  does). It then ends as the interpreter's shutdown ends it (:func:`_finish`): SystemExit's code mapped or an
  uncaught exception's traceback printed (exit 1), non-daemon threads joined, atexit hooks run, stdio flushed; but
  the preloaded modules are not torn down.

What a fresh interpreter reads at start-up the server read once: so the job re-applies what the tests vary (torch's
thread count from OMP_NUM_THREADS, stdout's buffering from PYTHONUNBUFFERED and its fd) and reseeds numpy's global
generator, which a fork would otherwise hand every job in the same state (``random`` reseeds itself in a forked
child). The imported objects are frozen out of the cyclic GC (``gc.freeze``, as Python's docs advise before forking
workers): a child's collections then neither walk them nor copy every page the collector would touch. PYTHONPATH's
entries go after ``sys.path[0]`` as the interpreter puts them, but a module the server imported stays the one it
imported. What cannot be re-applied stays a real subprocess: a PYTHONPATH that changes what an imported module is, a
setting a library reads when imported (huggingface_hub's HF_HUB_OFFLINE and HF_HOME), and any claim about what a
command imports (the preflight answering before the heavy imports). The client side, :class:`Popen` and :func:`run`,
mirrors ``subprocess``. A job whose environment names the server's jobs socket (``JOBS_ENV``) has its own requests
forked by the same server: so does Lightning's DDP launcher start rank 1 in tests/test_ddp.py.
"""

from __future__ import annotations

import atexit
import gc
import io
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

# What the apps launched by the tests import; each is imported once by the server, never run there.
# Optuna's storage imports alembic, its table models and SQLAlchemy's dialects only when a storage is opened, and W&B
# its launch inputs when a run starts: imported here, not again in every job that opens a study or starts a run.
PRELOAD = ("torch", "torchvision", "pytorch_lightning", "open_clip", "hydra", "optuna", "sqlalchemy", "wandb",
           "wilds", "autoft.finetune", "autoft.final", "autoft.datacheck", "autoft.conventions", "autoft.methods",
           "autoft.pipeline", "autoft.trial", "alembic.command", "alembic.config", "alembic.migration",
           "alembic.script", "optuna.storages._rdb.models", "sqlalchemy.dialects.sqlite",
           "sqlalchemy.dialects.postgresql", "wandb.sdk.launch.inputs.internal")
_HEADER = struct.Struct("!I")


# --- the server ------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    """One request as the job child runs it."""

    argv: list[str]  # after the interpreter: ["-m", MODULE, *args] or [SCRIPT, *args]
    cwd: str
    env: dict[str, str]
    start_new_session: bool = False
    fds: list[int] = field(default_factory=list)  # stdin, stdout, stderr

    def run(self) -> None:
        """Become the process ``python ARGV`` would be, then run it in a fresh ``__main__``; returns (or raises)
        as that run does, for :func:`_finish` to end the process."""
        if self.start_new_session:
            os.setsid()
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in set(self.fds):
            os.close(fd)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        _apply_environment(self.env)
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        if self.argv[0] == "-m":
            import runpy

            sys.argv = ["-m", *self.argv[2:]]
            sys.modules.pop(self.argv[1], None)  # preloaded as a plain module; `python -m` imports it only as __main__
            sys.path[:] = [os.getcwd(), *_pythonpath(self.env), *_BASE_PATH]
            runpy._run_module_as_main(self.argv[1], alter_argv=True)  # what `python -m` itself calls
        else:
            script = os.path.abspath(self.argv[0])
            sys.argv = list(self.argv)
            sys.path[:] = [os.path.dirname(script), *_pythonpath(self.env), *_BASE_PATH]
            with io.open_code(script) as f:
                code = compile(f.read(), script, "exec")
            from importlib.machinery import SourceFileLoader

            main.__dict__.update(__file__=script, __cached__=None, __package__=None,
                                 __loader__=SourceFileLoader("__main__", script))
            exec(code, main.__dict__)


def _pythonpath(env: dict[str, str]) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


# The server's sys.path but its script's folder and its own PYTHONPATH entries: what a job's path ends with.
_BASE_PATH: list[str] = []


def _apply_environment(env: dict[str, str]) -> None:
    """What a fresh interpreter would take from ``env`` at start-up or at its imports, and a forked one inherits
    from the server instead."""
    import torch

    try:
        torch.set_num_threads(max(1, int(env["OMP_NUM_THREADS"])))
    except (KeyError, ValueError):
        torch.set_num_threads(os.cpu_count() or 1)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=bool(env.get("PYTHONUNBUFFERED")))


def _threads() -> int:
    """Threads of this process as the kernel counts them (native ones included, which ``threading`` misses)."""
    return len(os.listdir("/proc/self/task"))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _receive(ctl: socket.socket) -> tuple[dict, list[int]] | None:
    """One request from the control socket: its JSON and its fds (reply socket, stdin, stdout, stderr); None
    once the client is gone."""
    head, fds, _, _ = socket.recv_fds(ctl, _HEADER.size, 4)
    if not head:
        return None
    head += _recv_exact(ctl, _HEADER.size - len(head))
    return json.loads(_recv_exact(ctl, _HEADER.unpack(head)[0])), fds


def _waiter(conn: socket.socket, job: _Job) -> _Job | None:
    """In the waiter: fork the job (returned in the job's child) and report its pid, then its wait status."""
    pid = os.fork()
    if pid == 0:
        conn.close()
        return job
    try:
        for fd in job.fds:
            os.close(fd)
        conn.sendall(f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"status {status}\n".encode())
    finally:
        os._exit(0)


def serve(ctl: socket.socket, listener: socket.socket | None = None) -> _Job:
    """Serve requests until the client closes ``ctl`` (then exit), and those of its jobs on ``listener`` (one
    connection a request); returns only in a job's child."""
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:  # reap finished waiters
                pass
        except ChildProcessError:
            pass
        ready = select.select([ctl] + ([listener] if listener is not None else []), [], [], 1.0)[0]
        if not ready:
            continue
        if ctl in ready:
            received = _receive(ctl)
            if received is None:
                sys.exit(0)
        else:
            try:  # a job's request: a job that dies while it sends one must not end the server
                with listener.accept()[0] as source:
                    received = _receive(source)
            except (EOFError, OSError):
                continue
            if received is None:
                continue
        request, fds = received
        conn = socket.socket(fileno=fds[0])
        job = _Job(fds=fds[1:], **request)
        if _threads() != 1 or threading.active_count() != 1:
            conn.sendall(f"error the fork server has {_threads()} threads, it forks only with one\n".encode())
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                ctl.close()
                if listener is not None:
                    listener.close()
                child = _waiter(conn, job)
                if child is not None:
                    return child
        conn.close()
        for fd in job.fds:
            os.close(fd)


def _serve_main() -> None:
    """``forkserver.py FD PATH [MODULE...]``: serve on the control socket FD, and jobs' own requests on the Unix socket
    PATH, after importing the modules (PRELOAD)."""
    ctl = socket.socket(fileno=int(sys.argv[1]))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[2])
    listener.listen()
    _BASE_PATH[:] = [p for p in sys.path[1:] if p not in _pythonpath(dict(os.environ))]
    for name in sys.argv[3:]:
        __import__(name)
    if "hydra" in sys.modules:  # jobs compose their configs as the tests' own process does
        import hydra_cache  # tests/hydra_cache.py (this file's folder is sys.path[0])

        hydra_cache.install()
    gc.freeze()
    _finish(serve(ctl, listener))


def _finish(job: _Job) -> NoReturn:
    """Run ``job`` in this child, then end it as the interpreter's shutdown does, without the module teardown.

    What a process shows of its shutdown is kept, in the interpreter's order: an uncaught exception's traceback
    (``sys.excepthook``, exit 1) or SystemExit's code mapped, non-daemon threads joined, atexit hooks run, stdio
    flushed. Then ``os._exit``: tearing down the server's preloaded modules, object by object, took about 0.5 s a
    job (each page it touched copied from the server: benchmarks/forkserver_exit_time.py). A job that relied on the
    teardown, say to flush a file object it never closed, loses that write here: a test then fails, it cannot pass
    where a real run would fail.
    """
    code = 0
    try:
        job.run()
    except KeyboardInterrupt:  # the interpreter ends by the signal itself: left to it
        raise
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: the interpreter ignores it too
            pass
    os._exit(code)


# --- the client ------------------------------------------------------------------------------------------------

def _send(sock: socket.socket, argv: list[str], cwd: str, env: dict[str, str], fds: list[int],
          start_new_session: bool) -> socket.socket:
    """Send one request on ``sock``; the returned socket brings the job's pid, then its wait status."""
    ours, theirs = socket.socketpair()
    body = json.dumps({"argv": argv, "cwd": cwd, "env": env, "start_new_session": start_new_session}).encode()
    socket.send_fds(sock, [_HEADER.pack(len(body))], [theirs.fileno(), *fds])
    sock.sendall(body)
    theirs.close()
    return ours


class _Server:
    """The client's end of one fork server: the control socket and the server's process; its jobs reach it on the
    Unix socket ``path`` (:class:`_JobsEnd`)."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        ours, theirs = socket.socketpair()
        self.ctl = ours
        self.lock = threading.Lock()
        folder = tempfile.mkdtemp(prefix="forkserver-")
        atexit.register(shutil.rmtree, folder, True)
        self.path = os.path.join(folder, "jobs.sock")
        # one OpenMP thread: torch's import starts a pool thread otherwise (when OMP_NUM_THREADS is unset, as outside
        # pytest-xdist), and the server forks only with one thread; each job sets its own from its environment
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno()), self.path,
                                      *preload], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
                                     stdout=subprocess.DEVNULL, cwd=os.path.dirname(os.path.dirname(__file__)))
        theirs.close()

    def request(self, argv: list[str], cwd: str, env: dict[str, str], fds: list[int],
                start_new_session: bool) -> socket.socket:
        with self.lock:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fork server exited with {self.proc.returncode}")
            return _send(self.ctl, argv, cwd, env, fds, start_new_session)


class _JobsEnd:
    """A job's way to the server that forked it (``JOBS_ENV`` in its environment holds the socket's path): so that a
    job's own subprocess, such as the rank Lightning's DDP launcher starts, is forked too."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, argv: list[str], cwd: str, env: dict[str, str], fds: list[int],
                start_new_session: bool) -> socket.socket:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self.path)
            return _send(sock, argv, cwd, env, fds, start_new_session)


JOBS_ENV = "FORKSERVER_JOBS"
_server: _Server | None = None


def server() -> _Server | _JobsEnd:
    """This process's fork server, started on first use (its imports then take the usual ~12 s, once); it exits
    when this process closes its end of the control socket, at the latest when this process ends. In a job given
    ``JOBS_ENV``: the server that forked it."""
    global _server
    if os.environ.get(JOBS_ENV) and _server is None:
        return _JobsEnd(os.environ[JOBS_ENV])
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    return _server


def _job_argv(args: list[str]) -> list[str]:
    """The request for ``[sys.executable, "-m", MODULE, ...]`` or ``[sys.executable, SCRIPT, ...]``."""
    args = [os.fspath(a) for a in args]
    if len(args) >= 2 and args[0] == sys.executable and (args[1] == "-m" and len(args) >= 3
                                                         or not args[1].startswith("-")):
        return args[1:]
    raise ValueError(f"not `python -m MODULE ...` or `python SCRIPT ...`, run it as a subprocess: {args}")


class Popen:
    """What ``subprocess.Popen`` gives for the same command (pid, poll, wait, returncode with -N for signal N,
    send_signal/kill/terminate, communicate), the process forked by the fork server."""

    def __init__(self, args: list[str], *, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 stdin: Any = None, stdout: Any = None, stderr: Any = None, text: bool = False,
                 start_new_session: bool = False) -> None:
        self.args = args
        self.returncode: int | None = None
        self.stdin: IO | None = None
        self.stdout: IO | None = None
        self.stderr: IO | None = None
        self._buffer = b""
        self._readers: dict[str, tuple[threading.Thread, list]] = {}
        argv = _job_argv(args)
        mine: list[IO] = []  # our ends of pipes
        theirs: list[int] = []  # fds to send, closed here once sent
        child_fds: list[int] = []
        for target, spec in enumerate((stdin, stdout, stderr)):
            if spec is None:
                fd = target
            elif spec == subprocess.STDOUT and target == 2:
                fd = child_fds[1]
            elif spec == subprocess.DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                theirs.append(fd)
            elif spec == subprocess.PIPE:
                r, w = os.pipe()
                ours, fd = (w, r) if target == 0 else (r, w)
                theirs.append(fd)
                f = os.fdopen(ours, "w" if target == 0 else "r") if text else os.fdopen(ours, "wb" if target == 0
                                                                                         else "rb")
                mine.append(f)
                setattr(self, ("stdin", "stdout", "stderr")[target], f)
            elif isinstance(spec, int):
                fd = spec
            else:
                fd = spec.fileno()
            child_fds.append(fd)
        try:
            self._conn = server().request(argv, os.fspath(cwd) if cwd is not None else os.getcwd(),
                                          dict(os.environ if env is None else env), child_fds, start_new_session)
        finally:
            for fd in theirs:
                os.close(fd)
        kind, value = self._line(None)
        if kind != "pid":
            for f in mine:
                f.close()
            raise RuntimeError(f"the fork server refused {args}: {value}")
        self.pid = int(value)

    def _line(self, timeout: float | None) -> tuple[str, str]:
        """The next line from the waiter, split in two; TimeoutError after ``timeout`` seconds."""
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._conn.recv(4096)
            except (TimeoutError, BlockingIOError) as e:
                raise TimeoutError from e
            if not chunk:
                raise RuntimeError(f"the fork server's waiter for {self.args} ended without an exit status")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        kind, value = line.decode().split(" ", 1)
        return kind, value

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self._status(0)
            except TimeoutError:
                pass
        return self.returncode

    def _status(self, timeout: float | None) -> None:
        kind, value = self._line(timeout)
        assert kind == "status", (kind, value)
        self.returncode = os.waitstatus_to_exitcode(int(value))
        self._conn.close()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self._status(timeout)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as subprocess does: never signal a pid that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: str | bytes | None = None, timeout: float | None = None) -> tuple[Any, Any]:
        """Feed ``input``, read the piped outputs to their end and wait, as ``subprocess.Popen.communicate``
        (callable again after its TimeoutExpired)."""
        if not self._readers:
            if self.stdin is not None:
                stdin = self.stdin

                def feed() -> None:
                    try:
                        if input:
                            stdin.write(input)
                    finally:
                        stdin.close()
                threading.Thread(target=feed, daemon=True).start()
            for name in ("stdout", "stderr"):
                f = getattr(self, name)
                if f is not None:
                    chunks: list = []
                    t = threading.Thread(target=lambda f=f, chunks=chunks: chunks.append(f.read()), daemon=True)
                    t.start()
                    self._readers[name] = (t, chunks)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t, _ in self._readers.values():
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out = [self._readers[n][1][0] if n in self._readers else None for n in ("stdout", "stderr")]
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return out[0], out[1]

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()


def run(args: list[str], *, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, ...)`` with the process forked by the fork server:
    on a timeout the process is killed and TimeoutExpired raised, with what it had written."""
    proc = Popen(args, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else None,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def as_subprocess_module() -> types.ModuleType:
    """A stand-in for the ``subprocess`` module of code a job runs (its ``JOBS_ENV`` set), so that the commands
    that code starts are forked too: ``Popen`` is this module's, and ``run(cmd)`` (no options: the command inherits
    the caller's fds, as ``subprocess.run(cmd)`` does) waits for it. Lightning's DDP launcher (tests/test_ddp.py)
    and benchmarks/paper.py (tests/test_methods.py) get it in place of theirs."""
    module = types.ModuleType("forked_subprocess")
    module.Popen = Popen
    module.run = lambda cmd: subprocess.CompletedProcess(cmd, Popen(cmd).wait())
    return module


if __name__ == "__main__":
    _serve_main()
