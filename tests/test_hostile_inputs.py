"""Hostile and mistaken input through every command: exit code 2, one ``error:`` line (no traceback, no usage block)
that names what is wrong, and no file of the user's changed.

Each case runs ``main([...])`` in-process from an empty working directory; the user's files (recipes, model JSONs,
data folders, checkpoints) live in a separate folder whose contents are compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llama_ft.cli import main
from llama_ft.errors import ConfigError
from tests.helpers import HUB_README, REPO_ROOT, free_port, news_rows

TINY = json.loads((REPO_ROOT / "llama_ft" / "presets" / "models" / "llama-tiny.json").read_text())


def _write_hub(root: Path, splits: dict[str, pa.Table]) -> Path:
    (root / "3.0.0").mkdir(parents=True)
    (root / "README.md").write_text(HUB_README)
    for split, table in splits.items():
        pq.write_table(table, root / "3.0.0" / f"{split}-00000-of-00001.parquet")
    return root


def _table(rows: list[dict]) -> pa.Table:
    return pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in ("article", "highlights", "id")})


def _good_splits() -> dict[str, pa.Table]:
    return {"train": _table(news_rows(4)), "validation": _table(news_rows(2, prefix="v")),
            "test": _table(news_rows(2, prefix="t"))}


def _model_json(user: Path, name: str, **changes) -> str:
    path = user / name
    path.write_text(json.dumps({**TINY, **changes}))
    return str(path)


def _user_files(user: Path) -> dict[str, str]:
    """The user's world of files, recreated for every case (cheap: a few KiB)."""
    user.mkdir()
    _write_hub(user / "good_data", _good_splits())
    truncated = _write_hub(user / "truncated_data", _good_splits())
    part = truncated / "3.0.0" / "validation-00000-of-00001.parquet"
    part.write_bytes(part.read_bytes()[:-40])
    wrong_type = {**_good_splits(), "train": pa.table({"article": ["a b c"] * 2, "highlights": pa.array([1, 2]),
                                                      "id": ["x", "y"]})}
    _write_hub(user / "int_highlights", wrong_type)
    null_rows = [{**r, "highlights": None} for r in news_rows(2, prefix="v")]
    _write_hub(user / "null_validation", {**_good_splits(), "validation": _table(null_rows)})
    blank_rows = [{**r, "article": "   \n"} for r in news_rows(4)]
    _write_hub(user / "blank_train", {**_good_splits(), "train": _table(blank_rows)})
    torch.save({"state_dict": {"model.lm_head.weight": torch.zeros(64, 8)}}, user / "good.ckpt")
    (user / "truncated.ckpt").write_bytes((user / "good.ckpt").read_bytes()[:300])
    return {
        "string_hidden": _model_json(user, "string_hidden.json", hidden_size="128"),
        "hidden_vs_heads": _model_json(user, "hidden_vs_heads.json", hidden_size=130),
        "heads_vs_kv": _model_json(user, "heads_vs_kv.json", num_attention_heads=4, num_key_value_heads=3),
        "zero_layers": _model_json(user, "zero_layers.json", num_hidden_layers=0),
        "no_model_type": _model_json(user, "no_model_type.json", model_type=None),
    }


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# (case id, argv with {user} for the user's folder and {json:<name>} for a model JSON, expected text in the line)
FIT_BASE = ["--data.max_examples_per_split=4", "--data.global_batch_size=2", "--data.micro_batch_size=2",
            "--trainer.max_steps=1", "--model.max_new_tokens=2"]
CASES = [
    # options typed and ranged, refused at parse time by every command that reads a recipe
    ("fit-lr-zero", ["fit", "--model.learning_rate=0"], "model.learning_rate=0: Input should be greater than 0"),
    ("fit-lr-negative", ["fit", "--model.learning_rate=-1e-5"], "model.learning_rate=-1e-5: Input should be greater"),
    ("fit-lr-text", ["fit", "--model.learning_rate=fast"], "model.learning_rate=fast: Input should be a valid number"),
    ("fit-warmup-negative", ["fit", "--model.warmup_steps=-1"], "model.warmup_steps=-1: Input should be greater than"),
    ("fit-min-lr-ratio", ["fit", "--model.min_lr_ratio=1.5"], "model.min_lr_ratio=1.5: Input should be less than"),
    ("fit-beta-one", ["fit", "--model.betas=[0.9,1.0]"], "model.betas=1.0: Input should be less than 1"),
    ("fit-weight-decay", ["fit", "--model.weight_decay=-0.1"], "model.weight_decay=-0.1: Input should be greater"),
    ("fit-attn-unknown", ["fit", "--model.attn_implementation=flash"], "model.attn_implementation=flash: expected one"),
    ("fit-lr-schedule", ["fit", "--model.lr_schedule=linear"], "model.lr_schedule=linear: expected one of"),
    ("fit-max-examples-zero", ["fit", "--data.max_examples_per_split=0"],
     "data.max_examples_per_split=0: Input should be greater than 0"),
    ("fit-num-workers", ["fit", "--data.num_workers=-1"], "data.num_workers=-1: Input should be greater than or equal"),
    ("fit-option-typo", ["fit", "--model.lerning_rate=1e-4"], "unrecognized arguments: --model.lerning_rate"),
    ("fit-max-steps-text", ["fit", "--trainer.max_steps=ten"], "trainer.max_steps=ten: expected type int"),
    ("fit-missing-recipe", ["fit", "--config={user}/nowhere.yaml"], "--config: File does not exist"),
    ("validate-global-batch", ["validate", "--data.global_batch_size=0"], "data.global_batch_size=0: Input should be"),
    ("test-max-new-tokens", ["test", "--model.max_new_tokens=0"], "model.max_new_tokens=0: Input should be greater"),
    ("predict-val-every", ["predict", "--data.val_every_n_steps=-3"], "data.val_every_n_steps=-3: Input should be"),
    ("plan-devices-zero", ["plan", "--devices=0"], "devices=0"),
    ("plan-memory-fraction", ["plan", "--memory_fraction=1.5"], "memory_fraction=1.5"),
    ("plan-unknown-preset", ["plan", "--model=nosuch"], "'nosuch' is neither a preset nor a file"),
    ("plan-lr-zero", ["plan", "--model.learning_rate=0"], "model.learning_rate=0: Input should be greater than 0"),
    ("slurm-time", ["slurm", "--time=24h", "--dry_run"], "time=24h"),
    ("slurm-fit-option-typo", ["slurm", "--dry_run", "--model.lerning_rate=1"], "unrecognized arguments"),
    ("slurm-lr-zero", ["slurm", "--dry_run", "--model.learning_rate=0"], "model.learning_rate=0: Input should be"),
    ("export-missing-ckpt", ["export", "--ckpt={user}/none.ckpt", "--out={out}/hf"], "does not exist"),
    ("export-truncated-ckpt", ["export", "--ckpt={user}/truncated.ckpt", "--out={out}/hf"], "truncated.ckpt"),
    # model JSON: types and shapes, refused when the module is built (before data or weights)
    ("fit-json-string-size", ["fit", "--model.model_config={json:string_hidden}"],
     "hidden_size='128' must be a positive integer"),
    ("fit-json-hidden-heads", ["fit", "--model.model_config={json:hidden_vs_heads}"],
     "hidden_size=130 is not divisible by num_attention_heads=4"),
    ("fit-json-heads-kv", ["fit", "--model.model_config={json:heads_vs_kv}"],
     "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ("plan-json-zero-layers", ["plan", "--model={json:zero_layers}"], "num_hidden_layers=0 must be a positive integer"),
    ("plan-json-no-model-type", ["plan", "--model={json:no_model_type}"], 'has no "model_type"'),
    ("fit-trainer-strategy", ["fit", "--trainer.strategy=nosuch"], "trainer settings refused"),
    ("fit-trainer-accelerator", ["fit", "--trainer.accelerator=mps"], "MPSAccelerator"),
    # data: refused before tokenizing
    ("fit-missing-dataset", ["fit", "--data.dataset={user}/no_data", *FIT_BASE], "does not exist"),
    ("fit-missing-tokenizer", ["fit", "--data.dataset={user}/good_data", "--data.tokenizer={user}/no_tok", *FIT_BASE],
     "tokenizer path"),
    ("fit-truncated-parquet", ["fit", "--data.dataset={user}/truncated_data", *FIT_BASE],
     "validation-00000-of-00001.parquet is not a readable parquet file"),
    ("fit-wrong-column-type", ["fit", "--data.dataset={user}/int_highlights", *FIT_BASE],
     "column 'highlights' of"),
    ("validate-null-highlights", ["validate", "--data.dataset={user}/null_validation", *FIT_BASE],
     "every validation row of"),
    ("fit-blank-articles", ["fit", "--data.dataset={user}/blank_train", *FIT_BASE], "every train row of"),
    ("fit-global-batch-over-data", ["fit", "--data.dataset={user}/good_data", *FIT_BASE, "--data.global_batch_size=8"],
     "data.global_batch_size=8 is larger than the 4 training examples"),
    # checkpoints handed to the Trainer
    ("fit-truncated-ckpt", ["fit", "--data.dataset={user}/good_data", "--ckpt_path={user}/truncated.ckpt", *FIT_BASE],
     "truncated.ckpt"),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gets_one_line_and_exit_code_2(argv, expected, tmp_path, monkeypatch, capsys):
    user, out = tmp_path / "user", tmp_path / "out"
    models = _user_files(user)
    out.mkdir()
    monkeypatch.chdir(out)
    before = _snapshot(user)
    args = []
    for arg in argv:
        for name, path in models.items():
            arg = arg.replace(f"{{json:{name}}}", path)
        args.append(arg.format(user=user, out=out))
    if args[0] in ("fit", "validate", "test", "predict"):
        args += [f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                 f"--data.cache_dir={out / 'cache'}"]

    assert main(args) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in stderr and "usage:" not in stderr
    assert _snapshot(user) == before


@pytest.mark.slow
def test_the_command_line_shows_exactly_one_line(tmp_path):
    """Through a real process: stderr holds the error line and nothing else (no usage block, no traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("LLAMA_FT_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "llama_ft", "fit", "--model.learning_rate=0"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: --model.learning_rate=0: Input should be greater than 0.")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_an_error_in_launched_processes_ends_as_one_line(tmp_path):
    """Rank 0 fails on the data while rank 1 waits for it: one line, exit 2, no peer's traceback."""
    user = tmp_path / "user"
    _write_hub(user / "blank_train", {**_good_splits(), "train": _table([{**r, "article": " "} for r in news_rows(4)])})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_PORT": str(free_port())}
    env.pop("LLAMA_FT_DEBUG", None)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "llama_ft", "fit", f"--data.dataset={user / 'blank_train'}", "--trainer.devices=2",
         "--trainer.strategy=ddp", f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
         f"--data.cache_dir={out / 'cache'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "every train row of" in errors[0]
    assert "Traceback" not in result.stderr


def test_debug_mode_raises_with_the_traceback(monkeypatch):
    monkeypatch.setenv("LLAMA_FT_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"model\.learning_rate=0"):
        main(["fit", "--model.learning_rate=0"])


def test_help_still_prints_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--model.learning_rate" in capsys.readouterr().out
