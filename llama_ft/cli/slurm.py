"""``llama-ft slurm``: write an sbatch script for a recipe beside the run's logs and submit it.

The script runs ``srun python -m llama_ft fit --config RECIPE --trainer.num_nodes N --trainer.devices D`` with one task
per device (Lightning's ``SLURMEnvironment`` requires ``--ntasks-per-node``), asks SLURM for SIGUSR1 two minutes
before the time limit and allows requeueing. ``llama_ft.callbacks.PreemptionCheckpoint`` answers that signal (checkpoint
at the next optimizer step, ``scontrol requeue``, exit); the requeued job runs the same script, whose
``--ckpt_path last`` resumes from that checkpoint (a fresh job has none: Lightning warns and starts from scratch).
Each job logs under its own version directory, ``slurm-<job id>``, which a requeued job keeps (same job id), so
``last`` finds that job's checkpoint and nothing else.

Everything else the recipe says applies unchanged. Every other option is a ``fit`` option: it is parsed (and so
checked) here with the ``fit`` parser before anything is written, then passed on to ``fit``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import Namespace
from jsonargparse.typing import NonNegativeInt, PositiveInt, restricted_string_type
from lightning.pytorch.cli import LightningArgumentParser

from llama_ft.errors import ConfigError
from llama_ft.presets import DEFAULT_RECIPE

DESCRIPTION = ("Write an sbatch script that fine-tunes a recipe under SLURM (requeued and resumed on preemption) and "
               "submit it; every fit option is passed on to fit.")
# This command's own options (the rest go to ``fit``): those that take a value, and flags.
OWN_OPTIONS = ("--nodes", "--devices", "--partition", "--time", "--account", "--cpus_per_task", "--gpus_per_node",
               "--job_name")
OWN_FLAGS = ("--dry_run",)
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or unlimited.
SlurmTime = restricted_string_type(
    "SlurmTime", r"^(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|(?i:unlimited|infinite))$"
)
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

    configs: tuple[Path, ...]
    nodes: int
    devices: int
    job_name: str
    output: Path  # with ``%j`` for the job id
    workdir: Path
    logs_dir: Path  # holds the run's version directories (or is the run's directory when there is no logger)
    python: str = sys.executable
    gpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    logger_args: tuple[str, ...] = ()  # fit arguments that pin the logger version to the job
    version: str | None = None  # a version the user pins instead (continuing an earlier job's run)
    fit_args: tuple[str, ...] = field(default_factory=tuple)  # passed on by the user, after ours


def render_sbatch_script(job: SbatchJob) -> str:
    """The sbatch script (bash) for ``job``: directives, rendezvous, then ``srun python -m llama_ft fit``."""
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
        f"{q(job.python)} -m llama_ft fit",
        *(f"--config {q(str(config))}" for config in job.configs),
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
        f"# Written by `llama-ft slurm`: fit {', '.join(c.name for c in job.configs)} on {job.nodes} node(s) x "
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
# Reading the parsed recipe: where the run logs, and how to pin its logger version
# =============================================================================================================


def _given(fit_args: list[str], key: str) -> bool:
    """Whether the user's ``fit`` arguments set ``key`` (``--key value`` or ``--key=value``)."""
    return any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in fit_args)


def run_logs_dir(trainer: Namespace, workdir: Path) -> tuple[Path, list[str]]:
    """(the directory that holds the run's version directories, the fit arguments that pin the version to the job).

    A logger given by ``class_path`` logs under ``save_dir/name`` (its signature's defaults filled in by the parser);
    none given means Lightning's default, TensorBoard under ``default_root_dir/lightning_logs``, made explicit so its
    version can be pinned; ``logger: false`` checkpoints under ``default_root_dir`` (the same for every attempt).
    """
    root = Path(trainer.default_root_dir or workdir)
    logger = trainer.logger
    version = [f'--trainer.logger.init_args.version "{VERSION_PREFIX}$SLURM_JOB_ID"']
    if logger is False:
        return workdir / root, []
    if isinstance(logger, list) and len(logger) == 1:
        logger = logger[0]
    if isinstance(logger, Namespace) and "class_path" in logger:
        init_args = logger.get("init_args") or Namespace()
        save_dir = init_args.get("save_dir") or root
        return workdir / save_dir / (init_args.get("name") or ""), version
    if logger is True or logger is None:
        return workdir / root / "lightning_logs", [
            f"--trainer.logger {DEFAULT_LOGGER}",
            f"--trainer.logger.init_args.save_dir {shlex.quote(str(root))}",
            *version,
        ]
    raise ConfigError(
        f"trainer.logger is {logger!r}; `llama-ft slurm` pins the logger version to the SLURM job so a requeued job "
        "resumes its own checkpoint, which needs one logger given by class_path (or none, or false)."
    )


def check_arguments(argv: list[str]) -> None:
    """Refuse, before parsing, the ``fit`` options the script sets itself."""
    for key in ("ckpt_path", "trainer.num_nodes", "trainer.devices"):
        if _given(argv, key):
            raise ConfigError(
                f"--{key} is set by the script (from --nodes/--devices, and --ckpt_path last so a requeued job resumes"
                " its own checkpoint); drop it. To continue an earlier job's run, pass"
                f" --trainer.logger.init_args.version {VERSION_PREFIX}OLD_JOB_ID."
            )


def split_arguments(argv: list[str]) -> tuple[list[Path], list[str]]:
    """(the recipe files, the arguments for ``fit``): everything that is not this command's own option."""
    configs: list[Path] = []
    fit_args: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in ("-c", "--config"):
            configs.append(Path(value if eq else next(args)).expanduser().resolve())
        elif flag in OWN_FLAGS:
            continue
        elif flag in OWN_OPTIONS:
            if not eq:
                next(args, None)
        else:
            fit_args.append(arg)
    return configs, fit_args


def build_job(config: Namespace, argv: list[str], workdir: Path) -> SbatchJob:
    """The job for the parsed recipe; ``argv`` is what the user typed, of which the ``fit`` options are passed on."""
    configs, fit_args = split_arguments(argv)
    trainer = config.trainer
    nodes = config.nodes or trainer.num_nodes
    devices = config.devices or (trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0
                                 else None)
    if devices is None:
        raise ConfigError(f"pass --devices (tasks per node); the recipe's trainer.devices is {trainer.devices!r}.")
    accelerator = str(trainer.accelerator or "auto").lower()
    gpus = config.gpus_per_node if config.gpus_per_node is not None else (0 if accelerator == "cpu" else devices)
    logs_dir, logger_args = run_logs_dir(trainer, workdir)
    recipe = configs[0] if configs else DEFAULT_RECIPE
    job_name = config.job_name or f"llama_ft-{recipe.stem}"
    if not re.fullmatch(r"[\w.+-]+", job_name):
        raise ConfigError(f"--job_name {job_name!r}: use letters, digits and . _ + - only.")
    version = None
    if _given(fit_args, "trainer.logger.init_args.version") and isinstance(trainer.logger, Namespace):
        version = str(trainer.logger.init_args.version)
    return SbatchJob(
        configs=tuple(configs) or (DEFAULT_RECIPE,),
        nodes=nodes,
        devices=devices,
        job_name=job_name,
        output=(logs_dir / "slurm" / f"{job_name}-%j.out").resolve(),
        workdir=workdir,
        logs_dir=logs_dir.resolve(),
        gpus_per_node=gpus or None,
        partition=config.partition,
        time=config.time,
        account=config.account,
        cpus_per_task=config.cpus_per_task,
        logger_args=tuple(logger_args),
        version=version,
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


def add_arguments(parser: LightningArgumentParser) -> None:
    """SLURM's options; every other option is a ``fit`` option, parsed here and passed on to ``fit``."""
    group = parser.add_argument_group("SLURM")
    group.add_argument("--nodes", type=PositiveInt | None, help="nodes (default: trainer.num_nodes)")
    group.add_argument("--devices", type=PositiveInt | None, help="devices = tasks per node (default: trainer.devices)")
    group.add_argument("--partition", type=str | None, help="SLURM partition")
    group.add_argument("--time", type=SlurmTime | None, help="time limit, e.g. 24:00:00 or 1-12:00 (default: the "
                       "partition's)")
    group.add_argument("--account", type=str | None, help="SLURM account to charge")
    group.add_argument("--cpus_per_task", type=PositiveInt | None, help="CPUs per task (e.g. for data loader workers)")
    group.add_argument("--gpus_per_node", type=NonNegativeInt | None,
                       help="GPUs per node (default: --devices, or none when trainer.accelerator is cpu)")
    group.add_argument("--job_name", type=str | None, help="SLURM job name (default: llama_ft-<recipe name>)")
    group.add_argument("--dry_run", action="store_true", help="print the script; write and submit nothing")


def run(config: Namespace, argv: list[str]) -> int:
    """Write and submit the script, or print it with ``--dry_run``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job = build_job(config, argv, Path.cwd())
    script = render_sbatch_script(job)
    if config.dry_run:
        print(script, end="")
        return 0
    submission = submit(job, script, stamp)
    cwd = Path.cwd()
    show = lambda p: os.path.relpath(p, cwd) if p.is_relative_to(cwd) else str(p)  # noqa: E731
    print(f"Submitted batch job {submission.job_id}")
    print(f"script:  {show(submission.script)}")
    print(f"log:     {show(submission.log)}")
    print(f"run dir: {show(submission.run_dir)}  (TensorBoard, checkpoints/last.ckpt, plan.json, hf_model)")
    return 0
