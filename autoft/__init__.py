"""autoft: robust fine-tuning of CLIP-like models with a learned objective (AutoFT)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input from the user (paths, names, data): reported as one line, non-zero exit."""

    # In a search job it ends the whole search, not just the trial (hydra_plugins/autoft_optuna_sweeper/_outcome.py).
    ends_sweep = True


class MissingData(UserError):
    """A file or folder the dataset needs is not there (the data checker reports it as missing)."""


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], object]) -> Path:
    """Write ``data`` (text, bytes, or a function writing to a binary file) to a temporary file next to
    ``path`` and move it onto ``path``: a crash never leaves a half-written file where a good one was."""
    path = Path(path)
    # Not tempfile.mkstemp: its files are private (0600); outputs must be as readable as any other file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
