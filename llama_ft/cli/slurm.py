"""``python main.py slurm``: write an sbatch script for a recipe beside the run's logs and submit it.

The script runs ``srun python main.py fit --config RECIPE --trainer.num_nodes N --trainer.devices D`` with one task
per device (Lightning's ``SLURMEnvironment`` requires ``--ntasks-per-node``), asks SLURM for SIGUSR1 two minutes
before the time limit and allows requeueing. ``llama_ft.callbacks.PreemptionCheckpoint`` answers that signal (checkpoint
at the next optimizer step, ``scontrol requeue``, exit); the requeued job runs the same script, whose
``--ckpt_path last`` resumes from that checkpoint (a fresh job has none: Lightning warns and starts from scratch).
Each job logs under its own version directory, ``slurm-<job id>``, which a requeued job keeps (same job id), so
``last`` finds that job's checkpoint and nothing else.

Everything else the recipe says applies unchanged; arguments this command does not know are passed on to ``fit``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_ft.cli.main import DEFAULT_CONFIG
from llama_ft.errors import ConfigError
from llama_ft.recipe import load_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN = REPO_ROOT / "main.py"
# Seconds before the time limit at which SLURM sends SIGUSR1: enough to finish a step and save a checkpoint.
SIGNAL_WARNING_S = 120
PREEMPTION_CALLBACK = "llama_ft.callbacks.PreemptionCheckpoint"
VERSION_PREFIX = "slurm-"
# The Trainer's logger when a recipe names none (what Lightning would create, but with a version we can pin).
DEFAULT_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"
SUBMIT_TIMEOUT_S = 120


@dataclass(frozen=True)
class SbatchJob:
    """Everything an sbatch script for one ``fit`` needs; paths are absolute."""

    config: Path
    nodes: int
    devices: int
    job_name: str
    output: Path  # with ``%j`` for the job id
    workdir: Path
    logs_dir: Path  # holds the run's version directories (or is the run's directory when there is no logger)
    python: str = sys.executable
    main: Path = MAIN
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    logger_args: tuple[str, ...] = ()  # fit arguments that pin the logger version to the job
    version: str | None = None  # a version the user pins instead (continuing an earlier job's run)
    fit_args: tuple[str, ...] = field(default_factory=tuple)  # passed on by the user, after ours


def render_sbatch_script(job: SbatchJob) -> str:
    """The sbatch script (bash) for ``job``: directives, rendezvous, then ``srun python main.py fit``."""
    q = shlex.quote
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.devices}",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        *([f"--cpus-per-task={job.cpus_per_task}"] if job.cpus_per_task else []),
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        *([f"--time={job.time}"] if job.time else []),
        f"--signal=SIGUSR1@{SIGNAL_WARNING_S}",
        "--requeue",
        "--open-mode=append",
        f"--output={job.output}",
        f"--chdir={job.workdir}",
    ]
    fit = [
        f"{q(job.python)} {q(str(job.main))} fit",
        f"--config {q(str(job.config))}",
        f"--trainer.num_nodes {job.nodes}",
        f"--trainer.devices {job.devices}",
        *job.logger_args,
        f"--trainer.callbacks+={PREEMPTION_CALLBACK}",
        "--ckpt_path last",
        *_option_lines(job.fit_args),
    ]
    srun_cpus = f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task else ""
    lines = [
        "#!/bin/bash",
        f"# Written by `python main.py slurm` (llama_ft): fit {job.config.name} on {job.nodes} node(s) x "
        f"{job.devices} device(s).",
        f"# SIGUSR1 ({SIGNAL_WARNING_S} s before the time limit, or `scancel --signal=USR1 JOBID`): the run saves",
        "# checkpoints/last.ckpt at the next optimizer step, requeues this job and exits; the requeued job (same",
        "# id, same log directory) resumes from it with --ckpt_path last: same weights as an uninterrupted run.",
        *(f"#SBATCH {d}" for d in directives),
        "",
        "set -euo pipefail",
        "# A SIGUSR1 sent to this shell only (`scancel --signal=USR1 --batch JOBID`) is passed on to the tasks.",
        'SRUN_PID=""',
        """trap '[ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null || true' USR1""",
        'echo "llama_ft: job $SLURM_JOB_ID, attempt $((${SLURM_RESTART_COUNT:-0} + 1)), nodes $SLURM_JOB_NODELIST,'
        ' $(date -Is)"',
        "# Rank 0 listens on the first node, where this script runs, on a port free there now (Lightning's default,",
        "# 15000 + the job id's last 4 digits, can clash with other jobs and programs).",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT=\"$({q(job.python)} -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); "
        "print(s.getsockname()[1])')\"",
        "",
        # Slurm 22.05 stopped passing --cpus-per-task from sbatch to srun: say it again.
        f"srun --kill-on-bad-exit=1{srun_cpus} " + " \\\n  ".join(fit) + " &",
        "SRUN_PID=$!",
        "# `wait` returns early when the trap runs: wait again until srun itself has ended.",
        "while true; do",
        '  wait "$SRUN_PID" && status=0 || status=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break',
        "done",
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


def _option_lines(args: tuple[str, ...]) -> list[str]:
    """The user's ``fit`` arguments, quoted, one option (with its value) per line."""
    lines: list[str] = []
    for arg in args:
        if lines and not arg.startswith("-") and lines[-1].startswith("--") and " " not in lines[-1] \
                and "=" not in lines[-1]:
            lines[-1] += f" {shlex.quote(arg)}"
        else:
            lines.append(shlex.quote(arg))
    return lines


# =============================================================================================================
# Reading the recipe: where the run logs, and how to pin its logger version
# =============================================================================================================


def _override(fit_args: list[str], key: str) -> str | None:
    """The last value the user's ``fit`` arguments give ``key`` (``--key value`` or ``--key=value``), else None."""
    value = None
    for i, arg in enumerate(fit_args):
        if arg == f"--{key}" and i + 1 < len(fit_args):
            value = fit_args[i + 1]
        elif arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
    return value


def _trainer(recipe: dict[str, Any]) -> dict[str, Any]:
    trainer = recipe.get("trainer")
    return trainer if isinstance(trainer, dict) else {}


def run_logs_dir(recipe: dict[str, Any], fit_args: list[str], workdir: Path) -> tuple[Path, list[str]]:
    """(the directory that holds the run's version directories, the fit arguments that pin the version to the job).

    A recipe logger given by ``class_path`` logs under ``save_dir/name``; none given means Lightning's default,
    TensorBoard under ``default_root_dir/lightning_logs``, which is made explicit so its version can be pinned;
    ``logger: false`` checkpoints under ``default_root_dir`` (already the same for every attempt).
    """
    trainer = _trainer(recipe)
    root = Path(_override(fit_args, "trainer.default_root_dir") or trainer.get("default_root_dir") or workdir)
    logger = trainer.get("logger", True)
    version = [f'--trainer.logger.init_args.version "{VERSION_PREFIX}$SLURM_JOB_ID"']
    logger_override = _override(fit_args, "trainer.logger")
    if logger is False or (logger_override is not None and logger_override.lower() in ("false", "null", "none")):
        return workdir / root, []
    if isinstance(logger, dict) and "class_path" in logger:
        init_args = logger.get("init_args") or {}
        save_dir = _override(fit_args, "trainer.logger.init_args.save_dir") or init_args.get("save_dir") or root
        name = _override(fit_args, "trainer.logger.init_args.name") or init_args.get("name", "lightning_logs")
        return workdir / save_dir / (name or ""), version
    if logger is True or logger is None:
        return workdir / root / "lightning_logs", [
            f"--trainer.logger {DEFAULT_LOGGER}",
            f"--trainer.logger.init_args.save_dir {shlex.quote(str(root))}",
            *version,
        ]
    raise ConfigError(
        f"trainer.logger in the recipe is {logger!r}; `main.py slurm` pins the logger version to the SLURM job so a "
        "requeued job resumes its own checkpoint, which needs one logger given by class_path (or none, or false)."
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_job(args: argparse.Namespace, fit_args: list[str], workdir: Path) -> SbatchJob:
    config = Path(args.config or DEFAULT_CONFIG).expanduser()
    recipe = load_recipe(str(config))
    trainer = _trainer(recipe)
    nodes = args.nodes if args.nodes is not None else _int_or_none(trainer.get("num_nodes")) or 1
    devices = args.devices if args.devices is not None else _int_or_none(trainer.get("devices"))
    if devices is None:
        given = trainer.get("devices")
        raise ConfigError(f"pass --devices (tasks per node); the recipe's trainer.devices is {given!r}.")
    if nodes < 1 or devices < 1:
        raise ConfigError(f"--nodes and --devices must be positive, got {nodes} and {devices}.")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus_per_task must be positive, got {args.cpus_per_task}.")
    for key in ("ckpt_path", "trainer.num_nodes", "trainer.devices"):
        if _override(fit_args, key) is not None:
            raise ConfigError(
                f"--{key} is set by the script (from --nodes/--devices, and --ckpt_path last so a requeued job resumes"
                " its own checkpoint); drop it. To continue an earlier job's run, pass"
                f" --trainer.logger.init_args.version {VERSION_PREFIX}OLD_JOB_ID."
            )
    accelerator = str(_override(fit_args, "trainer.accelerator") or trainer.get("accelerator") or "auto").lower()
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (0 if accelerator == "cpu" else devices)
    logs_dir, logger_args = run_logs_dir(recipe, fit_args, workdir)
    job_name = args.job_name or f"llama_ft-{config.stem}"
    if not re.fullmatch(r"[\w.+-]+", job_name):
        raise ConfigError(f"--job_name {job_name!r}: use letters, digits and . _ + - only.")
    return SbatchJob(
        config=config.resolve(),
        nodes=nodes,
        devices=devices,
        job_name=job_name,
        output=(logs_dir / "slurm" / f"{job_name}-%j.out").resolve(),
        workdir=workdir,
        logs_dir=logs_dir.resolve(),
        gpus_per_node=gpus or None,
        partition=args.partition,
        time=args.time,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        logger_args=tuple(logger_args),
        version=_override(fit_args, "trainer.logger.init_args.version"),
        fit_args=tuple(fit_args),
    )


# =============================================================================================================
# Submission
# =============================================================================================================


@dataclass(frozen=True)
class Submission:
    job_id: str
    script: Path
    log: Path
    run_dir: Path  # the job's logger version directory: checkpoints, plan.json, hf_model


def submit(job: SbatchJob, script_text: str, stamp: str) -> Submission:
    """Write the script beside the run's logs, ``sbatch --parsable`` it, rename it after the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("sbatch is not on PATH: run this on a SLURM login node (--dry_run prints the script).")
    slurm_dir = job.output.parent
    slurm_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens --output there but does not create directories
    script = slurm_dir / f"{job.job_name}-{stamp}.sbatch"
    script.write_text(script_text)
    try:
        result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True,
                                timeout=SUBMIT_TIMEOUT_S, cwd=job.workdir)
    except subprocess.TimeoutExpired as err:
        raise ConfigError(f"sbatch did not answer within {SUBMIT_TIMEOUT_S} s; the script is {script}.") from err
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {script} ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"
    named = slurm_dir / f"{job.job_name}-{job_id}.sbatch"  # sbatch keeps its own copy: renaming is safe
    script.rename(named)
    return Submission(
        job_id=job_id,
        script=named,
        log=Path(str(job.output).replace("%j", job_id)),
        run_dir=job.logs_dir / (job.version or f"{VERSION_PREFIX}{job_id}") if job.logger_args else job.logs_dir,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py slurm",
        allow_abbrev=False,  # an abbreviation must never swallow an argument meant for `fit`
        description="Write an sbatch script that fine-tunes a recipe under SLURM (requeued and resumed on preemption) "
        "and submit it. Arguments not listed here are passed on to `main.py fit` (e.g. --trainer.max_steps 100).",
    )
    parser.add_argument("--config", help="recipe YAML (default: the embedded default, configs/default.yaml)")
    parser.add_argument("--nodes", type=int, help="nodes (default: trainer.num_nodes, else 1)")
    parser.add_argument("--devices", type=int, help="devices = tasks per node (default: trainer.devices)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (default: the partition's)")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--cpus_per_task", type=int, help="CPUs per task (e.g. for data loader workers)")
    parser.add_argument("--gpus_per_node", type=int,
                        help="GPUs to request per node (default: --devices, or none when trainer.accelerator is cpu)")
    parser.add_argument("--job_name", help="SLURM job name (default: llama_ft-<recipe name>)")
    parser.add_argument("--dry_run", action="store_true", help="print the script; write and submit nothing")
    return parser


def main(argv: list[str]) -> int:
    args, fit_args = build_parser().parse_known_args(argv)
    if fit_args and fit_args[0] == "--":
        fit_args = fit_args[1:]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        job = build_job(args, fit_args, Path.cwd())
        script = render_sbatch_script(job)
        if args.dry_run:
            print(script, end="")
            return 0
        submission = submit(job, script, stamp)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cwd = Path.cwd()
    show = lambda p: os.path.relpath(p, cwd) if p.is_relative_to(cwd) else str(p)  # noqa: E731
    print(f"Submitted batch job {submission.job_id}")
    print(f"script:  {show(submission.script)}")
    print(f"log:     {show(submission.log)}")
    print(f"run dir: {show(submission.run_dir)}  (TensorBoard, checkpoints/last.ckpt, plan.json, hf_model)")
    return 0
