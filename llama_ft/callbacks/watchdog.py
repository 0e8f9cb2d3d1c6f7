"""Stop every rank soon after one dies, with a message that names the dead rank.

Without this (measured on 2 CPU ranks, gloo): the survivor fails in its next collective with gloo's
``Connection reset by peer [127.0.0.1]:<port>``, which names no rank; NCCL ranks instead wait out the
process-group timeout (30 min by default). On one node Lightning's launcher also SIGKILLs everything about 5 s after
a *child* (local rank >= 1) dies, but nothing in the children watches rank 0, and across nodes nothing watches anyone.

:class:`PeerWatchdog` runs a thread on every rank that beats a counter in the rendezvous store (the TCP store
``torch.distributed`` already uses, hosted by rank 0) and watches the next rank's counter:

- the store stops answering → rank 0 died (it hosts the store);
- the next rank's counter stands still for ``stale_after_s`` → that rank died or hangs; the watcher records it in
  the store, where every other rank reads it within ``interval_s``.

Each rank that learns of a failure writes one line naming the dead rank to stderr and exits with
:data:`PEER_FAILURE_EXIT_CODE`. A counter is not a process-group collective: it keeps beating while the main thread
waits in a collective, so a slow step is never mistaken for a death. A rank that finishes normally says so in the
store first, so a rank that is merely done is not mistaken for a dead one.

A rank about to block for long (loading or saving a large checkpoint, where file I/O or a pickler can keep the
heartbeat thread from running for minutes) says so first with :func:`expect_silence`: while its ``quiet`` key is
in the store its watcher allows it ``max_silence_s`` instead of ``stale_after_s``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import NoReturn

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

PEER_FAILURE_EXIT_CODE = 1
DEFAULT_MAX_SILENCE_S = 3600.0


class _HeartbeatMonitor(threading.Thread):
    """Beats this rank's counter and watches the next rank's (see the module docstring)."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, world_size: int, interval_s: float,
                 stale_after_s: float, max_silence_s: float = DEFAULT_MAX_SILENCE_S) -> None:
        super().__init__(daemon=True, name="llama_ft-peer-watchdog")
        self.store, self.prefix, self.rank, self.world_size = store, prefix, rank, world_size
        self.peer = (rank + 1) % world_size
        self.interval_s, self.stale_after_s, self.max_silence_s = interval_s, stale_after_s, max_silence_s
        self.finished = threading.Event()

    def key(self, kind: str, rank: int | None = None) -> str:
        return f"{self.prefix}/{kind}" if rank is None else f"{self.prefix}/{kind}/{rank}"

    def suspect(self) -> None:
        """A collective just failed: a peer that misses three beats is the dead one (name it quickly)."""
        self.stale_after_s = min(self.stale_after_s, 3 * self.interval_s)

    def run(self) -> None:
        beats, changed_at = -1, time.monotonic()
        quiet_seen_at = changed_at  # a peer leaving a quiet period gets stale_after_s from then
        while not self.finished.wait(self.interval_s):
            try:
                self.store.add(self.key("beat", self.rank), 1)
                if self.store.check([self.key("dead")]):
                    self.fail(self.store.get(self.key("dead")).decode())
                if self.store.check([self.key("done", self.peer)]):
                    continue
                peer_beats = self.store.add(self.key("beat", self.peer), 0)
                quiet = self.store.check([self.key("quiet", self.peer)])
                doing = f" while {self.store.get(self.key('quiet', self.peer)).decode()}" if quiet else ""
            except Exception as err:  # the store is gone or unreachable
                if self.finished.is_set():
                    return
                self.fail(f"rank 0 (host of the rendezvous store {os.environ.get('MASTER_ADDR')}:"
                          f"{os.environ.get('MASTER_PORT')}) stopped answering ({type(err).__name__}): it died or its "
                          "node is unreachable")
            now = time.monotonic()
            if quiet:
                quiet_seen_at = now
            if peer_beats != beats:
                beats, changed_at = peer_beats, now
            elif (now - changed_at > self.max_silence_s if quiet
                  else now - max(changed_at, quiet_seen_at) > self.stale_after_s):
                message = (f"rank {self.peer} sent no heartbeat for {now - changed_at:.0f} s{doing} (it died or "
                           f"hangs; its own log says why), noticed by rank {self.rank}")
                self.store.set(self.key("dead"), message)
                self.fail(message)

    def set_quiet(self, doing: str | None) -> None:
        """Tell this rank's watcher that a long silence from this rank is expected now, and why (``None``: no
        longer)."""
        if doing is not None:
            self.store.set(self.key("quiet", self.rank), doing)
        else:
            self.store.delete_key(self.key("quiet", self.rank))

    def fail(self, reason: str) -> NoReturn:
        """Name the failed rank and end this process at once: its collectives can never complete. Written straight
        to stderr because ``os._exit`` follows immediately, whatever logging is configured."""
        sys.stderr.write(f"[rank: {self.rank}] llama_ft.callbacks.watchdog: {reason}. Stopping rank {self.rank} "
                         f"(exit code {PEER_FAILURE_EXIT_CODE}) instead of waiting for it.\n")
        sys.stderr.flush()
        os._exit(PEER_FAILURE_EXIT_CODE)

    def finish(self, wait_for_peers_s: float) -> None:
        """Stop beating and tell the others this rank ended normally. Rank 0 hosts the store, so it waits (bounded)
        until every rank has stopped watching before its process may exit and take the store with it."""
        self.finished.set()
        self.join()
        try:
            self.store.set(self.key("done", self.rank), "1")
            if self.rank == 0:
                others = [self.key("done", r) for r in range(1, self.world_size)]
                self.store.wait(others, timedelta(seconds=wait_for_peers_s))
        except dist.DistError:  # rank 0 is gone, or a peer never finished: the survivors report that, not this exit
            return


_active_monitor: _HeartbeatMonitor | None = None


@contextmanager
def expect_silence(what: str) -> Iterator[None]:
    """Around a load or save that may block this rank for minutes (``what`` names it): its peers then allow it
    ``PeerWatchdog.max_silence_s`` before declaring it dead. Nothing happens when no watchdog runs."""
    monitor = _active_monitor
    if monitor is None:
        yield
        return
    monitor.set_quiet(what)
    try:
        yield
    finally:
        if _active_monitor is monitor:
            monitor.set_quiet(None)


class PeerWatchdog(Callback):
    """Ends all ranks within about ``stale_after_s`` of one rank's death, naming it — within a few seconds when a
    collective already failed or rank 0 died. Add it to ``trainer.callbacks``; it works under any strategy that
    initializes ``torch.distributed`` (``advanced``, ``ddp``, ``fsdp``) and does nothing in a single process.

    Args:
        interval_s: seconds between heartbeats.
        stale_after_s: a rank whose counter stands still this long is declared dead. Keep it above the longest time
            one rank can hold Python's GIL (a heartbeat thread needs it) outside checkpoint loads and saves.
        max_silence_s: the allowance during loads and saves (``expect_silence``: weight loading, checkpoint saves,
            the fit-end export), which for 70B+ models can block a rank for minutes.
    """

    def __init__(self, interval_s: float = 1.0, stale_after_s: float = 30.0,
                 max_silence_s: float = DEFAULT_MAX_SILENCE_S) -> None:
        if interval_s <= 0 or stale_after_s <= interval_s or max_silence_s < stale_after_s:
            raise ValueError(f"PeerWatchdog(interval_s={interval_s}, stale_after_s={stale_after_s}, max_silence_s="
                             f"{max_silence_s}) needs 0 < interval_s < stale_after_s <= max_silence_s, e.g. 1, 30, "
                             "3600.")
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.max_silence_s = max_silence_s
        self._monitor: _HeartbeatMonitor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or not dist.is_initialized():
            return
        prefix = trainer.strategy.broadcast(f"llama_ft/watchdog/{uuid.uuid4().hex[:8]}")  # fresh keys per run
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=self.stale_after_s))
        self._monitor = _HeartbeatMonitor(store, prefix, trainer.global_rank, trainer.world_size, self.interval_s,
                                          self.stale_after_s, self.max_silence_s)
        self._monitor.start()
        global _active_monitor
        _active_monitor = self._monitor

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A collective usually fails within a second of a peer's death, before the heartbeat rule fires; hold the
        exception a few seconds so the monitor can name the dead rank (it then ends the process). An exception with
        every rank alive passes after that wait, and the monitor stops: this rank now fails on its own error.
        ``SystemExit`` and ``KeyboardInterrupt`` are deliberate stops (e.g. the preemption exit, raised on every
        rank), not deaths: the rank signs off at once, as at a normal end, and keeps its exit code."""
        if self._monitor is None:
            return
        if isinstance(exception, (SystemExit, KeyboardInterrupt)):
            self.teardown(trainer, pl_module, "exception")
            return
        self._monitor.suspect()
        self._monitor.join(timeout=self._monitor.stale_after_s + 3 * self.interval_s)
        self._monitor.finished.set()
        self._stop_watching()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._monitor is not None:
            self._monitor.finish(wait_for_peers_s=self.stale_after_s)
            self._stop_watching()

    def _stop_watching(self) -> None:
        global _active_monitor
        if _active_monitor is self._monitor:
            _active_monitor = None
        self._monitor = None
