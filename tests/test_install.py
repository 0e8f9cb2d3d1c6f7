"""A normal (non-editable) ``pip install`` of the project works on its own, away from the repository.

One wheel build + install into a fresh virtual environment is shared by every test here. The environment reuses
the packages of the interpreter running the tests (torch, Lightning, transformers ...) through a ``.pth`` file, so
nothing is downloaded; llama_ft itself is installed from a copy of the working tree with ``--no-deps``. Every
command then runs from a directory outside the repository, so only the installed package and its package data can
be found: the console script, the presets, the embedded default recipe and the bundled sample.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("fit", "validate", "test", "predict", "plan", "slurm", "export")
# Never copied into the build: environments, VCS data, build outputs, caches, run outputs.
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    "runs", "lightning_logs",
)


def _source_files() -> list[Path] | None:
    """The files a clone of the working tree has (tracked and untracked-but-not-ignored), or None without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT, capture_output=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [Path(p) for p in out.decode().split("\0") if p and (REPO_ROOT / p).is_file()]


def _copy_source(dest: Path) -> None:
    files = _source_files()
    if files is None:
        shutil.copytree(REPO_ROOT, dest, ignore=COPY_IGNORE)
        return
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest / rel)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(home / "hf"),
        HF_DATASETS_CACHE=str(home / "hf" / "datasets"),
        TOKENIZERS_PARALLELISM="false",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
    )
    return env


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


class Installed:
    def __init__(self, root: Path) -> None:
        self.venv = root / "venv"
        self.work = root / "work"  # the cwd of every command: outside the repository
        self.env = _env(root)
        self.python = self.venv / "bin" / "python"
        self.llama_ft = self.venv / "bin" / "llama-ft"

    def run(self, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return _run(list(args), self.work, self.env, timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    inst = Installed(root)
    inst.work.mkdir()
    src = root / "src"
    _copy_source(src)

    # A bare venv that sees this interpreter's packages through a .pth (a venv made from .venv with
    # --system-site-packages would see the system Python's, not .venv's). pip and setuptools come from there too.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", inst.venv], check=True, timeout=120)
    site_packages = Path(
        subprocess.run(
            [inst.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.strip()
    )
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in here))

    # Not editable; --ignore-installed: never touch (uninstall) the llama_ft of the outer environment.
    proc = _run(
        [inst.python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--ignore-installed",
         src],
        root, inst.env, timeout=600,
    )
    assert proc.returncode == 0, _output(proc)
    shutil.rmtree(src)  # nothing may depend on the source tree after the install
    return inst


def test_installed_package_is_not_the_repository(installed):
    # find_spec, not import: locating the package needs none of torch/Lightning (seconds saved).
    proc = installed.run(
        installed.python, "-c",
        "import importlib.util; print(importlib.util.find_spec('llama_ft').submodule_search_locations[0])",
    )
    assert proc.returncode == 0, _output(proc)
    package = Path(proc.stdout.strip())
    assert package.resolve().is_relative_to(installed.venv.resolve()), package
    # The package data the runtime reads (presets, embedded default recipe, bundled sample) came with it.
    assert (package / "presets" / "default.yaml").is_file()
    assert (package / "presets" / "recipe_schema.json").is_file()  # plan reads recipes through it
    assert {p.stem for p in (package / "presets" / "models").glob("*.json")} >= {"llama-3-8b", "llama-tiny"}
    sample = package / "data" / "sample"
    assert list((sample / "cnn_dailymail" / "3.0.0").glob("train-*.parquet"))
    assert list((sample / "cnn_dailymail" / "3.0.0").glob("validation-*.parquet"))
    assert (sample / "cnn_dailymail" / "README.md").is_file()
    assert (sample / "tokenizer" / "tokenizer.json").is_file()


def test_module_entry_point_propagates_the_exit_code(installed):
    """``python -m llama_ft`` is the same program, and a failing command exits non-zero."""
    proc = installed.run(installed.python, "-m", "llama_ft", "plan", "--model", "no-such-model", "--nodes", "1",
                         "--devices", "8", "--gpu", "h100-80gb")
    assert proc.returncode != 0, _output(proc)
    assert "no-such-model" in proc.stdout + proc.stderr, _output(proc)


def test_help_lists_every_command(installed):
    proc = installed.run(installed.llama_ft, "--help")
    assert proc.returncode == 0, _output(proc)
    # The subcommand choices as the usage line spells them, "{fit,validate,...}" (not words of the description).
    choices = re.search(r"\{([\w,-]+)\}", proc.stdout)
    listed = set(choices.group(1).split(",")) if choices else set()
    missing = [c for c in COMMANDS if c not in listed]
    assert not missing, f"`llama-ft --help` does not list {missing}\n{_output(proc)}"


def test_plan(installed):
    """With no recipe and with one (the full recipe, copied beside the user's work), without importing torch."""
    shutil.copy(REPO_ROOT / "configs" / "llama3_8b_cnn_dailymail.yaml", installed.work / "recipe.yaml")
    for recipe in ([], ["--config", "recipe.yaml"]):
        proc = installed.run(installed.python, "-X", "importtime", installed.llama_ft, "plan", "--model", "llama-3-8b",
                             "--nodes", "1", "--devices", "8", "--gpu", "h100-80gb", *recipe)
        assert proc.returncode == 0, _output(proc)
        # A layout as the report spells it, e.g. "FSDP 8 × TP 1, AC none".
        assert re.search(r"\b(DDP|FSDP|HSDP) [0-9×]+ × TP \d+", proc.stdout), _output(proc)
        assert not re.search(r"\| torch$", proc.stderr, re.MULTILINE), "plan imported torch"


def test_fit_embedded_default(installed):
    proc = installed.run(
        installed.llama_ft, "fit", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--data.val_every_n_steps", "1", "--data.max_examples_per_split", "32",
        timeout=600,
    )
    assert proc.returncode == 0, _output(proc)
    versions = sorted((installed.work / "runs" / "default" / "tiny").glob("version_*"))
    assert versions, f"no run directory under {installed.work / 'runs'}\n{_output(proc)}"
    assert (versions[-1] / "checkpoints" / "last.ckpt").exists(), _output(proc)
    assert (versions[-1] / "hf_model" / "config.json").is_file(), _output(proc)
