"""Where a model's pretrained weights come from, found out before anything is downloaded.

open_clip fetches a tag's weights (``pretrained: openai``) from the Hugging Face hub; with no network,
huggingface_hub retries for about a minute before open_clip gives up. :func:`resolve` answers first,
in this order:

1. a local checkpoint path: the file must exist;
2. a tag whose weights file is in the local Hugging Face cache (``$HF_HUB_CACHE``, else
   ``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``; found with huggingface_hub's
   ``try_to_load_from_cache``): open_clip loads it with the hub in offline mode (:func:`hub_offline`),
   so no request is made at all;
3. any other tag: the hub is asked only if it answers a quick check (:func:`hub_reachable`: one
   request, :data:`CHECK_TIMEOUT` seconds at most; never under ``HF_HUB_OFFLINE``); if it does not,
   one line says how to provide the weights: the repository and file names the cache needs, or a
   local checkpoint.

The tag's own settings travel with it: OpenAI's weights were trained with QuickGELU, which open_clip
only warns about for a plain architecture name (``ViT-B-16``), so :class:`Weights` forces it.

The tags' hub entries come from open_clip's own registry (:func:`open_clip_registry`). Importing
open_clip takes about 8 s here, so an entry point's first check (:mod:`autoft.preflight`) reads the
same registry from a snapshot shipped with the package (``data_files/open_clip_registry.json``,
written by ``python -m autoft.weights --write-registry``; a test compares it with the installed
open_clip) and only when the snapshot's open_clip version is the installed one.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from importlib.resources import files
from pathlib import Path
from typing import Any

from autoft import UserError, atomic_write

CHECK_TIMEOUT = 3.0  # seconds the hub has to answer before it counts as unreachable
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
REGISTRY_FILE = "open_clip_registry.json"
# A registry: {"open_clip": version, "weights_names": [safetensors, other], "models": {name: {tag: entry}}},
# each entry {"hf_hub": "org/repo/file" or "", "quick_gelu": bool}: the part of open_clip's that resolve() reads.
Registry = dict[str, Any]


@dataclass(frozen=True)
class Weights:
    """What to hand open_clip: ``pretrained`` (a tag, a file path, or None), whether to load with the hub
    offline (the tag's file is cached), and whether the weights need QuickGELU."""

    pretrained: str | None
    offline: bool = False
    quick_gelu: bool = False


def is_path(pretrained: str) -> bool:
    """A checkpoint path rather than a tag: it has a directory part or a weights suffix, or exists."""
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES) or Path(pretrained).exists()


def open_clip_registry() -> Registry:
    """The installed open_clip's pretrained tags, as :func:`resolve` reads them."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    models: dict[str, dict[str, dict[str, Any]]] = {}
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        models.setdefault(name, {})[tag] = {"hf_hub": cfg.get("hf_hub", ""),
                                            "quick_gelu": bool(cfg.get("quick_gelu", False))}
    return {"open_clip": open_clip.__version__, "weights_names": [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME],
            "models": models}


def shipped_registry() -> Registry | None:
    """The snapshot shipped with the package, or None when it was taken from another open_clip version than
    the installed one (its tags could differ: only open_clip itself answers then)."""
    registry = json.loads(files("autoft").joinpath("data_files", REGISTRY_FILE).read_text())
    try:
        installed = metadata.version("open_clip_torch")
    except metadata.PackageNotFoundError:
        return None
    return registry if registry["open_clip"] == installed else None


def hub_files(registry: Registry, name: str, tag: str) -> tuple[str, list[str]] | None:
    """The hub repository of a tag's weights and the file names open_clip asks for, in its order (the
    safetensors version first), or None for a tag without a hub entry."""
    hub = registry["models"][name][tag]["hf_hub"]
    if not hub:
        return None
    safe_name, default_name = registry["weights_names"]
    repo, filename = os.path.split(hub)  # 'org/repo/file' or 'org/repo/' (open_clip's default file name)
    filename = filename or default_name
    if filename == default_name:
        return repo, [safe_name, filename]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def cached_file(repo: str, names: list[str]) -> str | None:
    """The first of ``names`` that the local Hugging Face cache holds for ``repo``."""
    from huggingface_hub import try_to_load_from_cache

    for filename in names:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def hub_reachable(timeout: float = CHECK_TIMEOUT) -> bool:
    """Whether the Hugging Face endpoint answers one HEAD request within ``timeout`` seconds (any HTTP
    answer counts; proxies from the environment are used, as huggingface_hub does). The request runs in
    a daemon thread, so a resolver that hangs cannot hold the caller past the timeout."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
            answered.append(True)
        except urllib.error.HTTPError:  # it answered, with an error status
            answered.append(True)
        except (OSError, ValueError):  # no route, no name, refused, timed out, TLS failure
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def cache_folder() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve(name: str, pretrained: str | None, registry: Registry | None = None) -> Weights:
    """Where ``pretrained`` weights for open_clip model ``name`` come from; one :class:`UserError` line
    (within about :data:`CHECK_TIMEOUT` seconds) when they are neither local nor downloadable.
    ``registry``: open_clip's tags (default: asked of open_clip itself)."""
    if not pretrained:
        return Weights(None)
    if is_path(pretrained):
        if not Path(pretrained).is_file():
            raise UserError(f"checkpoint file not found: {pretrained}")
        return Weights(pretrained)
    registry = registry or open_clip_registry()
    tags = list(registry["models"].get(name, {}))
    if pretrained not in tags:
        raise UserError(f"unknown pretrained tag '{pretrained}' for {name}; known: {', '.join(tags) or 'none'}")
    quick_gelu = registry["models"][name][pretrained]["quick_gelu"]
    found = hub_files(registry, name, pretrained)
    if found is None:  # a tag open_clip downloads from a URL: leave it to open_clip
        return Weights(pretrained, quick_gelu=quick_gelu)
    repo, names = found
    if cached_file(repo, names):
        return Weights(pretrained, offline=True, quick_gelu=quick_gelu)
    if hub_reachable():
        return Weights(pretrained, quick_gelu=quick_gelu)
    raise UserError(
        f"'{pretrained}' weights for {name} are not in the Hugging Face cache ({cache_folder()}) and the hub "
        f"cannot be reached: on a connected machine run `hf download {repo} {names[0]}` and copy "
        f"models--{repo.replace('/', '--')} into that folder (or set HF_HOME to a copy), or give a local "
        f"checkpoint: model.pretrained=/path/to/checkpoint.pt")


@contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """huggingface_hub in offline mode (as ``HF_HUB_OFFLINE=1`` would set it at import) for the duration:
    it answers from the local cache without a request."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def main(argv: list[str] | None = None) -> None:
    """``python -m autoft.weights --write-registry``: refresh the shipped snapshot of open_clip's registry
    (after an open_clip upgrade; the registry test says when)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--write-registry", action="store_true", required=True)
    p.parse_args(argv)
    path = Path(__file__).parent / "data_files" / REGISTRY_FILE
    atomic_write(path, json.dumps(open_clip_registry(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
