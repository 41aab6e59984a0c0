"""What lets several sweeper processes share one study: a lock around "count, then ask", and trial heartbeats."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

log = logging.getLogger(__name__)


class StudyLock:
    """A lock shared by every sweeper process of one study: creating the study and "count, then ask" must not
    interleave, or concurrent workers would each ask the last trial and overshoot ``n_trials``.

    PostgreSQL: a session advisory lock on a connection of its own; SQLite: ``flock`` on ``<db>.lock``. Both are
    released by the OS or the server when the process dies, so kill -9 never leaves the study locked. Other
    backends get no lock (a warning): concurrent workers may then finish up to one trial each beyond n_trials.
    """

    def __init__(self, url: str, study_name: str):
        self.url, self.study_name = url, study_name
        self._engine: sqlalchemy.Engine | None = None
        self._conn: sqlalchemy.Connection | None = None
        self._file: Any = None
        self._key = int.from_bytes(hashlib.sha256(f"autoft:{study_name}".encode()).digest()[:8], "big", signed=True)
        parsed = sqlalchemy.engine.make_url(url)
        self.backend = parsed.get_backend_name()
        file_db = self.backend == "sqlite" and parsed.database not in (None, "", ":memory:")
        self.path = Path(parsed.database) if file_db else None
        if self.backend not in ("postgresql", "sqlite"):
            log.warning("no cross-process lock for %s storage: concurrent workers may overshoot n_trials", self.backend)

    def __enter__(self) -> StudyLock:
        if self.backend == "postgresql":
            if self._conn is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        elif self.path is not None:
            import fcntl

            if self._file is None:
                self._file = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    @property
    def exclusive(self) -> bool:
        """Whether holding this lock excludes every other sweeper process of the study (PostgreSQL, SQLite file)."""
        return self.backend == "postgresql" or self.path is not None

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        elif self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()
            self._conn = self._engine = None
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> Iterator[None]:
    """Beat for the running batch: Optuna only beats inside optimize(), and a trial that never had a
    heartbeat is never failed as stale, so a killed sweep would leave it RUNNING forever."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for trial_id in trial_ids:
                    storage.record_heartbeat(trial_id)
            except Exception as e:  # e.g. a locked SQLite file: keep beating rather than die silently
                log.warning("heartbeat not recorded: %s", e)
            if stop.wait(storage.heartbeat_interval):
                return

    thread = threading.Thread(target=beat, name="autoft-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
