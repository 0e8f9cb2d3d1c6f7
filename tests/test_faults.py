"""Faults: a dead rank stops the others within 60 s and is named; a kill during a save never costs the last checkpoint.

The 2-process runs are launched the way torchrun or srun launch them — each rank a child of the test, with
``LOCAL_RANK``/``WORLD_SIZE`` set — so the test sees every rank's exit code and no rank can outlive it. (Under
Lightning's own launcher rank 0 also SIGKILLs the others when a child dies; these runs exercise the harder case where
nothing but llama_ft.callbacks.watchdog watches.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed import HashStore

from llama_ft.callbacks import watchdog as watchdog_module
from llama_ft.callbacks.watchdog import PeerWatchdog, _HeartbeatMonitor, expect_silence
from llama_ft.checkpoint import atomic as checkpointing
from llama_ft.checkpoint import partial_path, publish
from llama_ft.checkpoint.reader import read_checkpoint
from tests.helpers import REPO_ROOT, free_port

MAIN = REPO_ROOT / "main.py"
STALLED_MAIN = Path(__file__).parent / "scripts" / "stalled_save_main.py"
STOP_WITHIN_S = 60
RUN_TIMEOUT_S = 240


def _fit_args(root: Path, strategy: str, *extra: str) -> list[str]:
    return [
        "fit", "--trainer.devices=2", f"--trainer.strategy={strategy}",
        "--trainer.callbacks+=llama_ft.callbacks.PeerWatchdog",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.logger.init_args.version=run", f"--data.cache_dir={root / 'cache'}",
        "--data.max_examples_per_split=64", "--data.max_length=128", "--data.global_batch_size=4",
        "--data.micro_batch_size=2", "--trainer.enable_progress_bar=false", *extra,
    ]


def _launch(
    script: Path, args: list[str], root: Path, env_extra: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Start ranks 0 and 1 as children of this test, each logging to ``root/rank<r>.log``."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    return [
        subprocess.Popen([sys.executable, str(script), *args], cwd=REPO_ROOT, env={**env, "LOCAL_RANK": str(rank)},
                         stdout=(root / f"rank{rank}.log").open("w"), stderr=subprocess.STDOUT)
        for rank in (0, 1)
    ]


def _logs(root: Path) -> str:
    return "\n".join((root / f"rank{r}.log").read_text(errors="replace") for r in (0, 1))


def _wait_until(condition, procs: list[subprocess.Popen], root: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            _kill_all(procs)
            pytest.fail(f"the run ended or stalled before the fault could be injected:\n{_logs(root)[-4000:]}")
        time.sleep(0.2)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _kill_and_time(victim: subprocess.Popen, procs: list[subprocess.Popen]) -> tuple[list[int], float]:
    """SIGKILL ``victim``; return every rank's exit code and the seconds until the last one ended."""
    victim.send_signal(signal.SIGKILL)
    start = time.monotonic()
    try:
        for proc in procs:
            proc.wait(timeout=max(STOP_WITHIN_S + 30 - (time.monotonic() - start), 1))
    finally:
        elapsed = time.monotonic() - start
        _kill_all(procs)
    return [p.returncode for p in procs], elapsed


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
@pytest.mark.parametrize(("victim", "strategy"), [(1, "advanced"), (0, "ddp")])
def test_killing_one_rank_stops_the_other_and_names_it(tmp_path, victim, strategy):
    root = tmp_path / "run"
    procs = _launch(MAIN, _fit_args(root, strategy, "--trainer.max_steps=10000", "--data.val_every_n_steps=10000"),
                    root)
    log0 = root / "rank0.log"
    _wait_until(lambda: "Total params" in log0.read_text(errors="replace"), procs, root, RUN_TIMEOUT_S - 90)
    time.sleep(2)  # well into the training loop
    codes, elapsed = _kill_and_time(procs[victim], procs)
    logs = _logs(root)
    print(f"rank {victim} killed: exit codes {codes}, all ended after {elapsed:.1f} s")
    assert all(code != 0 for code in codes), (codes, logs[-4000:])
    assert elapsed < STOP_WITHIN_S, (elapsed, logs[-4000:])
    survivor = 1 - victim
    if victim == 0:
        expected = f"[rank: {survivor}] llama_ft.callbacks.watchdog: rank 0 (host of the rendezvous store"
        assert expected in logs, logs[-4000:]
    else:
        assert f"[rank: {survivor}] llama_ft.callbacks.watchdog: rank 1 sent no heartbeat" in logs, logs[-4000:]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_kill_during_a_sharded_save_keeps_the_last_checkpoint(tmp_path):
    """FSDP on 2 ranks saves ``last.ckpt`` (a distributed checkpoint) at steps 2 and 4; rank 0 is killed while the
    step-4 save is written but not yet in place. ``last.ckpt`` must still be the complete step-2 checkpoint."""
    root, marker = tmp_path / "run", tmp_path / "stalled"
    args = _fit_args(root, "llama_ft.parallel.AdvancedParallelStrategy",
                     "--trainer.strategy.dp_shard_size=2", "--trainer.strategy.tp_size=1",
                     "--trainer.strategy.dp_replicate_size=1", "--trainer.max_steps=6", "--data.val_every_n_steps=2")
    procs = _launch(STALLED_MAIN, args, root, {"STALL_AT_SAVE": "2", "STALL_MARKER": str(marker)})
    _wait_until(marker.exists, procs, root, RUN_TIMEOUT_S - 90)
    codes, elapsed = _kill_and_time(procs[0], procs)
    logs = _logs(root)
    print(f"rank 0 killed mid-save: exit codes {codes}, all ended after {elapsed:.1f} s")
    assert all(code != 0 for code in codes) and elapsed < STOP_WITHIN_S, (codes, elapsed, logs[-4000:])

    stalled_partial = Path(marker.read_text())
    last = stalled_partial.parent / "last.ckpt"
    assert stalled_partial == partial_path(last) and stalled_partial.is_dir()
    checkpoint = read_checkpoint(last)
    assert checkpoint.metadata["global_step"] == 2
    assert any(key.endswith("embed_tokens.weight") for key in checkpoint.tensors)


# ----------------------------------------------------------------------------------------- single-process checks


SAVER = """
import sys
from pathlib import Path
import torch
from llama_ft.checkpoint import AtomicCheckpointIO, partial_path, publish, remove_path

target, as_directory = Path(sys.argv[1]) / "last.ckpt", sys.argv[2] == "directory"
for step in range(1_000_000):
    payload = {"step": step, "weights": torch.full((256, 1024), float(step))}
    if as_directory:
        partial = partial_path(target)
        remove_path(partial)
        partial.mkdir()
        for shard in range(3):
            torch.save(payload, partial / f"shard{shard}.pt")
        publish(partial, target)
    else:
        AtomicCheckpointIO().save_checkpoint(payload, target)
"""


def _check_consistent(target: Path, as_directory: bool) -> int:
    files = [target / f"shard{s}.pt" for s in range(3)] if as_directory else [target]
    payloads = [torch.load(f, weights_only=True) for f in files]
    steps = {p["step"] for p in payloads}
    assert len(steps) == 1, f"torn checkpoint: shards from steps {steps}"
    for payload in payloads:
        assert torch.equal(payload["weights"], torch.full((256, 1024), float(payload["step"])))
    return steps.pop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["file", "directory"])
def test_kill_at_random_moments_never_tears_last(tmp_path, mode):
    """SIGKILL a process that saves in a loop at 6 random moments: ``last.ckpt`` is a whole checkpoint every time."""
    target, generator = tmp_path / "last.ckpt", torch.Generator().manual_seed(0)
    steps = []
    for _ in range(6):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), mode], cwd=REPO_ROOT)
        deadline = time.monotonic() + 60
        while not target.exists() and saver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2 + 0.5 * float(torch.rand(1, generator=generator)))
        saver.kill()
        saver.wait()
        steps.append(_check_consistent(target, mode == "directory"))
    assert max(steps) > 0, "no save completed before a kill; the test never raced a save against a kill"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside-fallback"])
def test_publish_replaces_directories_and_files(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(checkpointing, "_exchange", lambda first, second: False)
    target = tmp_path / "last.ckpt"
    for step in range(3):
        partial = partial_path(target)
        partial.mkdir()
        (partial / "step").write_text(str(step))
        publish(partial, target)
        assert (target / "step").read_text() == str(step)
    file_target = tmp_path / "epoch=0.ckpt"
    for step in range(2):
        partial_path(file_target).write_text(str(step))
        publish(partial_path(file_target), file_target)
        assert file_target.read_text() == str(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0.ckpt", "last.ckpt"]


def test_a_crash_between_the_fallback_renames_is_recovered(tmp_path):
    """The fallback renames ``last.ckpt`` aside, then the new one onto it; a crash in between leaves only the aside."""
    target = tmp_path / "last.ckpt"
    aside = tmp_path / ".last.ckpt.replaced"
    aside.mkdir()
    (aside / "step").write_text("1")
    assert checkpointing.resolve_checkpoint(target) == aside
    partial = partial_path(target)
    partial.mkdir()
    (partial / "step").write_text("2")
    publish(partial, target)
    assert (target / "step").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class _RecordingMonitor(_HeartbeatMonitor):
    def fail(self, reason: str) -> None:
        self.reason = reason
        self.finished.set()


@pytest.mark.timeout(30)
def test_a_silent_peer_is_declared_dead_and_named():
    store = HashStore()
    monitor = _RecordingMonitor(store, "t", rank=0, world_size=2, interval_s=0.05, stale_after_s=0.5)
    monitor.start()
    monitor.join(timeout=10)
    assert "rank 1 sent no heartbeat" in monitor.reason
    assert store.get("t/dead").decode() == monitor.reason


@pytest.mark.timeout(30)
def test_a_beating_or_finished_peer_is_not_declared_dead():
    store = HashStore()
    monitor = _RecordingMonitor(store, "t", rank=0, world_size=2, interval_s=0.05, stale_after_s=0.5)
    monitor.start()
    for _ in range(20):
        store.add("t/beat/1", 1)
        time.sleep(0.05)
    store.set("t/done/1", "1")
    time.sleep(1.0)
    assert monitor.is_alive() and not hasattr(monitor, "reason")
    monitor.finished.set()
    monitor.join()


@pytest.mark.timeout(30)
def test_a_rank_blocked_in_a_long_load_or_save_is_not_declared_dead(monkeypatch):
    """Rank 1 stops beating inside ``expect_silence`` (as a rank whose main thread holds the GIL in a multi-minute
    save would): rank 0's watcher waits ``max_silence_s`` then, and gives ``stale_after_s`` again after it."""
    store = HashStore()
    monitor = _RecordingMonitor(store, "t", rank=0, world_size=2, interval_s=0.05, stale_after_s=0.3,
                                max_silence_s=30)
    monkeypatch.setattr(watchdog_module, "_active_monitor",
                        _HeartbeatMonitor(store, "t", rank=1, world_size=2, interval_s=0.05, stale_after_s=0.3))
    monitor.start()
    with expect_silence("saving a checkpoint"):
        time.sleep(1.2)  # four times stale_after_s without a beat
        assert not hasattr(monitor, "reason")
    time.sleep(0.15)
    assert not hasattr(monitor, "reason")  # the grace restarts when the quiet period ends
    monitor.join(timeout=10)
    assert "rank 1 sent no heartbeat" in monitor.reason  # still silent afterwards: dead


@pytest.mark.timeout(30)
def test_a_quiet_period_has_a_limit(monkeypatch):
    store = HashStore()
    monitor = _RecordingMonitor(store, "t", rank=0, world_size=2, interval_s=0.05, stale_after_s=0.2,
                                max_silence_s=0.8)
    monkeypatch.setattr(watchdog_module, "_active_monitor",
                        _HeartbeatMonitor(store, "t", rank=1, world_size=2, interval_s=0.05, stale_after_s=0.2))
    monitor.start()
    with expect_silence("loading /models/llama"):
        monitor.join(timeout=10)
    assert re.search(r"rank 1 sent no heartbeat for \d+ s while loading /models/llama", monitor.reason)


@pytest.mark.timeout(30)
def test_a_deliberate_exit_signs_off_instead_of_looking_like_a_death():
    """PreemptionCheckpoint ends a preempted run with SystemExit on every rank: no rank may report another as dead."""
    store = HashStore()
    watchdog = PeerWatchdog(interval_s=0.05, stale_after_s=0.5)
    watchdog._monitor = _RecordingMonitor(store, "t", rank=1, world_size=2, interval_s=0.05, stale_after_s=0.5)
    watchdog._monitor.start()
    monitor = watchdog._monitor
    watchdog.on_exception(None, None, SystemExit(3))
    assert watchdog._monitor is None and not monitor.is_alive() and not hasattr(monitor, "reason")
    assert store.check(["t/done/1"])


def test_watchdog_refuses_a_stale_limit_below_the_interval():
    with pytest.raises(ValueError, match="0 < interval_s < stale_after_s"):
        PeerWatchdog(interval_s=5, stale_after_s=2)
