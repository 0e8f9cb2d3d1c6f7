"""A single-node SLURM cluster on localhost, from Debian's packages (slurmctld, slurmd, slurm-client, munge).

Everything lives in one fresh directory under /tmp: slurm.conf, state, spool, logs and a private munged (its own
socket and key, so it needs no system munged and disturbs none); the daemons listen on free ports. So several
sessions on one machine never meet. ``stop`` cancels the cluster's jobs, waits until SLURM has ended their
processes, then ends exactly the daemons ``start`` launched, by PID.

Needs root (slurmd runs jobs; munged runs as the ``munge`` user). ``make slurm-packages`` installs the packages.
By hand: ``python -m tests.slurm.cluster`` starts one, prints ``export SLURM_CONF=...`` and stops it on Enter.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = Path("/usr/sbin")  # where Debian puts the daemons (often not on a user's PATH)
CLIENTS = ("munge", "unmunge", "setpriv", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 90
COMMAND_TIMEOUT_S = 30
# How long a requeued job waits before it may start again (SLURM's default is 120 s: too slow for a test).
REQUEUE_DELAY_S = 5
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


def missing_requirements() -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = [d for d in DAEMONS if not (SBIN / d).is_file()]
    missing += [c for c in CLIENTS if shutil.which(c) is None]
    if os.geteuid() != 0:
        missing.append("root (slurmd runs the jobs)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("the munge user (package munge)")
    return missing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurmCluster:
    """One slurmctld + one slurmd (node ``localhost``, all its CPUs) + a private munged."""

    def __init__(self, root: Path | None = None) -> None:
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="llama_ft-slurm-", dir="/tmp"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            self.env.pop(key)  # a session that itself runs inside a SLURM job must not leak that job's settings

    # ---------------------------------------------------------------------------------------------- control
    def start(self) -> LocalSlurmCluster:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged, running as munge, must reach its directory
        self._start_munged()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            self._spawn(daemon, [str(SBIN / daemon), "-D", "-f", str(self.conf)])
        self._wait(lambda: self._node_state() == "idle", START_TIMEOUT_S, "the node to become idle")
        return self

    def stop(self) -> None:
        """Cancel every job, wait until SLURM has ended them, then end the daemons this object started."""
        try:
            if self._alive("slurmctld") and self._alive("slurmd"):
                jobs = self._queued_jobs()
                if jobs:
                    self.command("scancel", "--full", *jobs, check=False)
                    self._wait(lambda: not self._queued_jobs(), STOP_TIMEOUT_S, "cancelled jobs to end",
                               fail=False)
        finally:
            for name in reversed(DAEMONS):
                proc = self.procs.pop(name, None)
                if proc is None:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=30)
                proc.log_file.close()  # type: ignore[attr-defined]
            if self._owns_root and not self.procs:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalSlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------------- commands
    def command(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
        """Run a SLURM client command against this cluster; its stdout."""
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...); empty once forgotten."""
        out = self.command("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_job(self, job_id: str, done: Callable[[dict[str, str]], bool], timeout: float,
                     what: str) -> dict[str, str]:
        """Poll the job until ``done(job)``; raise TimeoutError (with its state) after ``timeout`` seconds."""
        state: dict[str, str] = {}

        def check() -> bool:
            nonlocal state
            state = self.job(job_id)
            return done(state)

        self._wait(check, timeout, f"job {job_id}: {what}", detail=lambda: str(state))
        return state

    def logs(self) -> str:
        """The daemons' own logs (for a failure message)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((self.root / "log").glob("*")))

    # ------------------------------------------------------------------------------------------------ parts
    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        self.munge_dir.chmod(0o755)  # munged wants its socket directory reachable by all
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        # setpriv execs munged (no fork), so the PID we hold is munged's; -F keeps it in the foreground.
        self._spawn("munged", [
            "setpriv", f"--reuid={munge.pw_uid}", f"--regid={munge.pw_gid}", "--init-groups",
            str(SBIN / "munged"), "-F", f"--socket={self.socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir / 'munged.pid'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
        ])

        def answers() -> bool:
            credential = subprocess.run(["munge", "-n", "-S", str(self.socket)], capture_output=True, timeout=10)
            if credential.returncode != 0:
                return False
            return subprocess.run(["unmunge", "-S", str(self.socket)], input=credential.stdout,
                                  capture_output=True, timeout=10).returncode == 0

        self._wait(answers, 30, "munged to answer")

    def _write_conf(self) -> None:
        hardware = subprocess.run([str(SBIN / "slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        first = hardware.splitlines()[0]
        node = re.sub(r"^NodeName=\S+\s*", "", first)  # CPUs=.. Boards=.. ... RealMemory=..
        d = self.root
        self.conf.write_text(f"""# A single-node SLURM cluster for llama_ft's tests (tests/slurm/cluster.py)
ClusterName=llamaft
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire={REQUEUE_DELAY_S}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
# slurmd falls back to the name "localhost" when no NodeName matches the host's: works on any machine.
NodeName=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115  (closed in stop)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, start_new_session=True)
        proc.log_file = log  # type: ignore[attr-defined]
        self.procs[name] = proc

    def _alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def _node_state(self) -> str:
        for daemon in ("munged", "slurmctld", "slurmd"):
            if not self._alive(daemon):
                raise RuntimeError(f"{daemon} exited ({self.procs[daemon].returncode}):\n{self.logs()}")
        return self.command("sinfo", "-h", "-N", "-o", "%t", check=False).strip()

    def _queued_jobs(self) -> list[str]:
        return self.command("squeue", "-h", "-o", "%i", check=False).split()

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str, *, fail: bool = True,
              detail: Callable[[], str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        if fail:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}" + (f": {detail()}" if detail else ""))


if __name__ == "__main__":
    with LocalSlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}")
        input("cluster up; press Enter to stop it\n")
