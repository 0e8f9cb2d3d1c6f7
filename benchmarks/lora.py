"""LoRA against full fine-tuning: trainable parameters, checkpoint size and step time on the CPU; the planner's
predicted memory per device for Llama-3-8B and 70B.

Part 1 (measured): the ``llama-tiny`` preset (2 layers, hidden 128, vocabulary 4,096; fp32, SDPA), random init, one
torch thread, micro-batch 8 × 256 random tokens, AdamW over the trainable parameters. Full fine-tuning is the
baseline; LoRA runs with ``llama_ft.lora`` as ``fit`` does (peft adapters injected, base frozen) at rank 8 on
q_proj/v_proj (the default ``--model.lora.r 8``) and at rank 8 on every projection. Steps are interleaved (one step of
each in turn, ``WARMUP`` untimed then ``TIMED`` timed, CPU time of this process), so load on a shared machine hits all
alike. Checkpoint size: ``torch.save`` of what ``fit`` keeps after two steps — the full model and optimizer state, or
for LoRA on a pretrained base the adapters and their optimizer state (the base is referenced by name).

Part 2 (predicted, no GPU): ``plan_parallelism`` for the recipe's shape (sequence 1024, global batch 256,
bf16-mixed) on H100 80 GB nodes, LoRA rank 64 on q_proj/v_proj with dropout 0.05
(``configs/llama3_8b_cnn_dailymail_lora.yaml``) against full fine-tuning: the chosen layout, its predicted peak per
device and tokens/s, and on a fixed layout (FSDP over the node, full checkpointing, micro-batch 1) the predicted peak
of both.

Prints the tables; ``--write`` also writes them to ``benchmarks/results/lora.md``.
Run: ``.venv/bin/python benchmarks/lora.py [--write]``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "lora.md"
MODEL = "llama-tiny"
MICRO_BATCH, SEQ_LEN = 8, 256
WARMUP, TIMED = 2, 8
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"full fine-tuning": None, "LoRA r 8, q_proj v_proj": ["q_proj", "v_proj"],
            "LoRA r 8, all projections": ALL_PROJECTIONS}
CLUSTERS = (("llama-3-8b", 1), ("llama-3-8b", 8), ("llama-3-70b", 8))


def _setup(targets: list[str] | None):
    import torch
    from transformers import LlamaForCausalLM

    from llama_ft.lora import LoraSettings, inject_lora
    from llama_ft.presets import load_llama_config

    torch.manual_seed(0)
    config = load_llama_config(MODEL)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).train()
    if targets is not None:
        inject_lora(model, LoraSettings(r=8, dropout=0.0, target_modules=targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-4, foreach=True)


def _step(model, optimizer, batch) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _checkpoint_bytes(model, optimizer, lora: bool) -> int:
    import torch

    from llama_ft.lora import is_adapter_key

    state = {k: v for k, v in model.state_dict().items() if not lora or is_adapter_key(k)}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


def measure() -> list[dict]:
    """Parameters, checkpoint bytes and mean CPU seconds per step of every variant, steps interleaved."""
    import torch

    torch.set_num_threads(1)
    runs = {name: _setup(targets) for name, targets in VARIANTS.items()}
    batch = torch.randint(0, 4096, (MICRO_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    seconds = dict.fromkeys(VARIANTS, 0.0)
    for step in range(WARMUP + TIMED):
        for name, (model, optimizer) in runs.items():
            start = time.process_time()
            _step(model, optimizer, batch)
            if step >= WARMUP:
                seconds[name] += time.process_time() - start
    rows = []
    for name, (model, optimizer) in runs.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        rows.append({"name": name, "trainable": trainable, "total": total,
                     "checkpoint": _checkpoint_bytes(model, optimizer, VARIANTS[name] is not None),
                     "step_s": seconds[name] / TIMED})
    return rows


def predict() -> list[dict]:
    """The planner's choice and memory for LoRA r 64 (q_proj, v_proj) and full fine-tuning."""
    from llama_ft.parallel.layout import Layout
    from llama_ft.parallel.planning.memory import estimate_memory
    from llama_ft.parallel.planning.planner import plan_parallelism
    from llama_ft.parallel.planning.specs import ClusterSpec, LoraSpec, ModelSpec, TrainSpec
    from llama_ft.presets import load_llama_config

    rows = []
    for name, devices in CLUSTERS:
        spec = ModelSpec.from_llama_config(load_llama_config(name), name=name)
        cluster = ClusterSpec.from_accelerator("h100-80gb", 1, devices)
        for lora in (None, LoraSpec(64, dropout=0.05)):
            train = TrainSpec(1024, 256, "bf16-mixed", lora=lora)
            chosen = plan_parallelism(spec, cluster, train).chosen
            fixed = estimate_memory(spec, train, Layout(dp_shard=devices, activation_checkpointing="full"), 1)
            rows.append({"model": name, "devices": devices, "lora": lora is not None, "plan": chosen.describe(),
                         "peak": chosen.memory.total, "tokens": chosen.tokens_per_s_per_device,
                         "fixed": fixed.total})
    return rows


def render(measured: list[dict], predicted: list[dict]) -> str:
    gib = 2 ** 30
    base = measured[0]
    lines = [
        "# LoRA against full fine-tuning",
        "",
        f"Measured on this CPU: `{MODEL}`, fp32, one thread, micro-batch {MICRO_BATCH} × {SEQ_LEN} tokens, AdamW, "
        f"mean CPU seconds of {TIMED} interleaved steps after {WARMUP} warm-up steps. Ratios against full "
        "fine-tuning in the same run. Checkpoint: what `fit` keeps (LoRA on a pretrained base: adapters and their "
        "optimizer state; the base is referenced by name).",
        "",
        "| run | trainable params | share | checkpoint MiB | × full | step s | × full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in measured:
        lines.append(
            f"| {row['name']} | {row['trainable']:,} | {row['trainable'] / row['total']:.2%} | "
            f"{row['checkpoint'] / 2 ** 20:.2f} | {row['checkpoint'] / base['checkpoint']:.3f} | "
            f"{row['step_s']:.3f} | {row['step_s'] / base['step_s']:.2f} |")
    lines += [
        "",
        "Predicted by the planner (no GPU): sequence 1024, global batch 256, bf16-mixed, H100 80 GB, LoRA r 64 on "
        "q_proj/v_proj, dropout 0.05 (the LoRA recipe) against full fine-tuning. Peak = predicted per-device memory "
        "with the allowance; fixed layout = FSDP over all devices, full checkpointing, micro-batch 1.",
        "",
        "| model | devices | training | chosen plan | peak GiB | tokens/s/device | fixed-layout GiB | × full |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for full, lora in zip(predicted[::2], predicted[1::2], strict=True):
        for row in (full, lora):
            ratio = row["fixed"] / full["fixed"]
            lines.append(
                f"| {row['model']} | {row['devices']} | {'LoRA r 64' if row['lora'] else 'full'} | {row['plan']} | "
                f"{row['peak'] / gib:.1f} | {row['tokens']:,.0f} | {row['fixed'] / gib:.1f} | {ratio:.2f} |")
    small = measured[1]
    lines += ["", f"Headline: LoRA r 8 on q_proj/v_proj trains {small['trainable'] / base['trainable']:.2%} of the "
              f"parameters, its checkpoint is {small['checkpoint'] / base['checkpoint']:.1%} of full fine-tuning's, "
              f"a step takes {small['step_s'] / base['step_s']:.2f}× as long; Llama-3-70B LoRA on 8 × H100 plans "
              f"{predicted[5]['plan']} with no CPU offload (full fine-tuning: {predicted[4]['plan']}).",
              "", "Command: `.venv/bin/python benchmarks/lora.py --write`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/lora.md")
    args = parser.parse_args(argv)
    text = render(measure(), predict())
    print(text)
    if args.write:
        RESULT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
