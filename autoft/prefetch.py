"""Training batches made one ahead on a thread, while the current batch trains.

Reading a cached batch and making it the model's input (random resized crop, normalise: milliseconds
a batch on one CPU core) runs in Lightning's loop between two training steps, so a search paid it once
per step, hundreds of steps per trial. On CPU,
:class:`PrefetchLoader` does both on a background thread, one or two batches ahead, on another core.
On a GPU the crop is a few kernels queued on the device, so the thread there only reads the batch and
pins it, for training and evaluation alike: what the main thread paid between two steps while the GPU
idled (about 6 ms a batch of 128 on the H200 machine, 0.3 s of a 50-step trial).

Randomness stays the trial's: the loader's own generator, seeded from the global RNG (which the trial
seeded) when an epoch's iterator is made in the main thread, shuffles the batches and draws the crops;
the thread touches no global RNG. So a trial's batches depend only on its seed, not on the thread's
timing nor on earlier trials in the process.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

_END = object()
_RUNNING: dict[threading.Thread, threading.Event] = {}  # the threads alive, and how to stop each


@atexit.register
def _stop_all(timeout: float = 10.0) -> None:
    """Stop and join every prefetch thread before the interpreter finalizes. A daemon thread still inside
    a torch call then (pinning a batch, a crop) is ended in C++ mid-call, which aborts the process
    ("terminate called without an active exception", exit 134), as the H200 check saw after a finished
    search whose last train iterator was left mid-epoch."""
    for thread, stop in list(_RUNNING.items()):
        stop.set()
        thread.join(timeout)


class PrefetchLoader(DataLoader):
    """A ``DataLoader`` whose batches ``prepare(batch, generator)`` turns into model input on a background
    thread; ``prepare=None``: a plain ``DataLoader``. Lightning can rebuild it (a distributed sampler):
    ``prepare`` is kept as an attribute of the same name."""

    def __init__(self, *args: Any, prepare: Callable[[Any, torch.Generator], Any] | None = None, **kwargs: Any):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.prepare = prepare
        self._early: tuple[torch.Tensor, _Ahead] | None = None  # (global RNG state it was drawn from, epoch)

    def start_epoch(self) -> None:
        """Start the next epoch's thread now, from the seed the next ``iter()`` would draw, without drawing it.

        A search trial calls this right after seeding, so its first batch is made while the trial builds its
        objective and trainer, instead of being waited for once Lightning asks for it. ``iter()`` takes this
        epoch only if the global RNG is still where it was (nothing drew from it in between), and then draws
        from it as usual; else it drops it and draws anew. Batches, crops and the global RNG's sequence are
        those of a plain ``iter()`` either way."""
        self._drop_early()
        if self.prepare is None:
            return
        state = torch.get_rng_state()
        self._early = state, self._epoch(_draw_seed(torch.Generator().set_state(state)))

    def __iter__(self) -> Iterator:
        # one draw from the global RNG, in the main thread: the epoch's shuffle and crops follow from it
        if self._early is not None and torch.equal(self._early[0], torch.get_rng_state()):
            early, self._early = self._early[1], None
            _draw_seed()
            return early
        self._drop_early()
        return self._epoch(_draw_seed())

    def _epoch(self, seed: int) -> Iterator:
        self.generator.manual_seed(seed)
        batches = super().__iter__()
        if self.prepare is None:
            return batches
        crops = torch.Generator().manual_seed(seed + 1)
        return _Ahead(batches, self.prepare, crops)

    def _drop_early(self) -> None:
        """Stop an epoch started early and not taken; joined, as it may still draw its shuffle from the loader's
        generator, which the next epoch reseeds."""
        if self._early is not None:
            ahead, self._early = self._early[1], None
            ahead.stop.set()
            ahead.thread.join()


def _draw_seed(generator: torch.Generator | None = None) -> int:
    """An epoch's seed: one draw from ``generator`` (the global RNG by default)."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class _Ahead:
    """Iterates ``prepare(batch)`` for the batches of ``batches``, made on a daemon thread. The thread stops
    when this iterator is dropped (Lightning leaves an epoch at ``max_steps``, mid-way)."""

    def __init__(self, batches: Iterator, prepare: Callable, generator: torch.Generator):
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        # pinning needs the main thread's CUDA device (a DDP rank's own), not device 0 by default
        device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self.thread = threading.Thread(target=_fill, args=(batches, prepare, generator, self.ready, self.stop, device),
                                       name="autoft-prefetch", daemon=True)
        _RUNNING[self.thread] = self.stop
        self.thread.start()

    def __iter__(self) -> _Ahead:
        return self

    def __next__(self):
        item = self.ready.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __del__(self) -> None:
        self.stop.set()


def read_ahead(batch: Any, generator: torch.Generator) -> Any:
    """``prepare`` for a loader whose thread only reads (and pins) its batches ahead: the batch as read."""
    return batch


def _fill(batches: Iterator, prepare: Callable, generator: torch.Generator, ready: queue.Queue,
          stop: threading.Event, device: int | None) -> None:
    """The thread: prepare each batch and hand it over, until the batches end, an error, or ``stop``."""
    try:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            for batch in batches:
                if not _hand_over(prepare(batch, generator), ready, stop) or stop.is_set():
                    return
            item = _END
        except BaseException as e:  # raised in the main thread, at its next batch
            item = e
        _hand_over(item, ready, stop)
    finally:
        _RUNNING.pop(threading.current_thread(), None)


def _hand_over(item: Any, ready: queue.Queue, stop: threading.Event) -> bool:
    """Put ``item`` in ``ready`` once there is room; False if ``stop`` came first."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
