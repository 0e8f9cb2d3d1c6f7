"""Peak host memory per rank while loading and exporting a ~0.5 B-parameter Llama: rank-0 paths against sharded ones.

Target: every rank's peak ≤ model size / world + 20% (sharded load, fit-end export), and the one-process ``export``
of a distributed checkpoint bounded by a tensor, not by the model.

Set-up: a random-init Llama of 0.51 B parameters (hidden 1536, 16 layers, MLP 4096, vocabulary 32,000, untied),
saved once in bf16 with ``save_pretrained`` (one 1.0 GB safetensors file). Each world size (1, 2, 4 CPU processes,
gloo) is one launch; every rank builds the model on the meta device, shards it with FSDP2 over all ranks
(``apply_layout``) in bf16, then loads and exports it. Each method runs in fresh processes (so none inherits
another's allocator state):

- before: rank 0 reads every tensor (``safetensors.load_file``), ``set_model_state_dict(full_state_dict,
  broadcast_from_rank0)`` scatters the slices; the fit-end export gathers the full state dict
  (``get_model_state_dict(full_state_dict, cpu_offload)``) and rank 0 calls ``save_pretrained``;
- now: ``load_sharded_weights`` (each rank reads only its slices) and ``save_hf_directory`` (every rank writes its
  own slices into the files rank 0 laid out; no gather);
- fallback: ``save_hf_directory(gather=True)``, what it does when the ranks do not share the output directory (one
  tensor gathered at a time, rank 0 streams it into the file), after an unmeasured sharded load.

The world-2 launch also saves the shards as a distributed checkpoint (``dcp.save``, Lightning's key layout); then one
process runs ``export`` both ways: all tensors read, ``save_pretrained`` (before) against ``export_checkpoint``
(now: tensor by tensor).

Memory: the kernel's high-water mark of resident memory (``VmHWM``), reset before each phase by writing 5 to
``/proc/self/clear_refs``. The runtime baseline — the process's resident memory with torch, transformers and the
process group up and the model on the meta device (no weights) — is measured in the same process and subtracted,
so a number is what the weights cost that rank: its shards plus whatever the phase holds besides. A load phase
starts from unallocated shards (``to_empty`` memory is not resident until written); an export phase starts with the
loaded shards resident. Ratio = peak above baseline / model size (1.0 GB). Prints the table; ``--write`` also writes
it to ``benchmarks/results/load_memory.md``. Run: ``.venv/bin/python benchmarks/load_memory.py [--write]`` (about 4
minutes on 2 cores, 6 GB of free memory and 4 GB of disk under the temporary directory).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "load_memory.md"
WORLD_SIZES = (1, 2, 4)
MODEL = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
TARGET_SLACK = 0.20
LAUNCH_TIMEOUT_S = 900
GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMeter:
    """Resident-memory high-water mark of this process per phase, above a baseline taken at construction."""

    def __init__(self) -> None:
        gc.collect()
        self.baseline = _status_kib("VmRSS") * 1024

    def phase(self):
        meter = self

        class _Phase:
            def __enter__(self):
                gc.collect()
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
                return self

            def __exit__(self, *exc):
                self.bytes = _status_kib("VmHWM") * 1024 - meter.baseline

        return _Phase()


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(**{**MODEL, "num_hidden_layers": int(os.environ.get("LOAD_MEMORY_LAYERS", "16"))})


def make_checkpoint(directory: Path) -> int:
    """The random bf16 checkpoint; returns the model's size in bytes."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(_config())
    model.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sharded_model(world: int):
    import torch
    from transformers import LlamaForCausalLM

    from llama_ft.parallel.applying.apply import apply_layout, build_device_mesh, materialize
    from llama_ft.parallel.layout import Layout

    layout = Layout(dp_shard=world)
    mesh = build_device_mesh(layout, "cpu")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config())
    apply_layout(model, layout, mesh, param_dtype=None, reduce_dtype=None)
    return model, lambda: materialize(model, "cpu")


def worker(rank: int, world: int, port: int, work: Path, group: str) -> None:
    """One rank of a launch: load then export, ``before``, ``now`` or ``fallback``; writes
    ``work/<group>-rank<r>-world<w>.json``."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from llama_ft.checkpoint.huggingface import load_sharded_weights, save_hf_directory

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    checkpoint = work / "hf"
    model, materialize = _sharded_model(world)
    meter = PeakMeter()
    peaks: dict[str, float] = {}
    times: dict[str, float] = {}

    def measure(name, fn):
        dist.barrier()
        start = time.perf_counter()
        with meter.phase() as phase:
            fn()
            dist.barrier()
        peaks[name], times[name] = phase.bytes, time.perf_counter() - start

    def rank0_load():
        full = load_file(checkpoint / "model.safetensors") if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def gather_export():
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(work / f"out-gather-{world}", state_dict=full)

    materialize()
    if group == "before":
        measure("load_rank0", rank0_load)
        measure("export_gather", gather_export)
    elif group == "now":
        measure("load_sharded", lambda: load_sharded_weights(model, checkpoint))
        measure("export_in_place", lambda: save_hf_directory(model, None, work / f"out-in-place-{world}"))
    else:
        load_sharded_weights(model, checkpoint)
        measure("export_streamed", lambda: save_hf_directory(model, None, work / f"out-streamed-{world}",
                                                             gather=True))
    if world == 2 and group == "now":
        state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
        dcp.save(state, checkpoint_id=work / "dcp")
        if rank == 0:
            torch.save({"hyper_parameters": {"model_config": str(work / "config.json")}}, work / "dcp" / "meta.pt")
    (work / f"{group}-rank{rank}-world{world}.json").write_text(json.dumps({"peaks": peaks, "times": times,
                                                                    "baseline": meter.baseline}))
    dist.destroy_process_group()


def export_worker(method: str, work: Path) -> None:
    """One process exporting the distributed checkpoint: everything read at once, or tensor by tensor."""
    import torch
    import torch.distributed.checkpoint as dcp
    from jsonargparse import Namespace
    from transformers import LlamaForCausalLM

    from llama_ft.cli.export import export_checkpoint

    meter = PeakMeter()
    start = time.perf_counter()
    with meter.phase() as phase:
        if method == "export_cli_whole":
            reader = dcp.FileSystemReader(str(work / "dcp"))
            state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                     for key, meta in reader.read_metadata().state_dict_metadata.items()}
            dcp.load(state, storage_reader=reader, no_dist=True)
            with torch.device("meta"):
                model = LlamaForCausalLM(_config())
            model.load_state_dict({k[len("state_dict.model."):]: v for k, v in state.items()}, assign=True)
            model.save_pretrained(work / "out-cli-whole")
        else:
            recipe = Namespace(model=Namespace(model_config=None, model_name_or_path=None),
                               data=Namespace(tokenizer=None))
            export_checkpoint(work / "dcp", work / "out-cli-streamed", recipe, max_shard_size="5GB")
    (work / f"{method}.json").write_text(json.dumps({"peaks": {method: phase.bytes},
                                                     "times": {method: time.perf_counter() - start}}))


def _run(command: list[str], timeout_s: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}… failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def launch(world: int, work: Path, group: str) -> list[dict]:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world), str(store.port),
                               str(work), group], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"world {world} failed:\n" + "\n".join(o[-3000:] for o in outputs))
    return [json.loads((work / f"{group}-rank{r}-world{world}.json").read_text()) for r in range(world)]


LABELS = {
    "load_rank0": ("load", "rank 0 reads all, broadcasts (before)"),
    "load_sharded": ("load", "each rank reads its slices (now)"),
    "export_gather": ("fit-end export", "full state dict gathered (before)"),
    "export_streamed": ("fit-end export", "one tensor gathered at a time, rank 0 writes (fallback)"),
    "export_in_place": ("fit-end export", "each rank writes its slices in place (now)"),
    "export_cli_whole": ("`export` (1 process)", "whole checkpoint read (before)"),
    "export_cli_streamed": ("`export` (1 process)", "tensor by tensor (now)"),
}


def table(results: dict[tuple[str, int], list[dict]], model_bytes: int) -> str:
    rows = ["| phase | method | processes | peak per rank above baseline, max (GiB) | rank 0 (GiB) | ratio to "
            "model size | target (1/world + 20%) | met | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for (method, world), ranks in results.items():
        peaks = [r["peaks"][method] for r in ranks]
        ratio = max(peaks) / model_bytes
        target = 1 / world + TARGET_SLACK
        phase, how = LABELS[method]
        seconds = max(r["times"][method] for r in ranks)
        rows.append(f"| {phase} | {how} | {world} | {max(peaks) / GIB:.2f} | {peaks[0] / GIB:.2f} | {ratio:.2f} | "
                    f"{target:.2f} | {'yes' if ratio <= target else 'no'} | {seconds:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"also write the table to {RESULT}")
    parser.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"],
                        help="decoder layers (fewer for a quick check of the script; the table uses 16)")
    parser.add_argument("--worker", nargs=5, metavar=("RANK", "WORLD", "PORT", "WORK", "GROUP"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--export-worker", nargs=2, metavar=("METHOD", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, port, work, group = args.worker
        worker(int(rank), int(world), int(port), Path(work), group)
        return
    if args.export_worker:
        export_worker(args.export_worker[0], Path(args.export_worker[1]))
        return
    os.environ["LOAD_MEMORY_LAYERS"] = str(args.layers)  # the workers inherit it
    with tempfile.TemporaryDirectory(prefix="load_memory-") as tmp:
        work = Path(tmp)
        model_bytes = make_checkpoint(work / "hf")
        (work / "config.json").write_text((work / "hf" / "config.json").read_text())
        gc.collect()
        results: dict[tuple[str, int], list[dict]] = {}
        for world in WORLD_SIZES:
            for group, methods in (("before", ("load_rank0", "export_gather")),
                                   ("now", ("load_sharded", "export_in_place")), ("fallback", ("export_streamed",))):
                ranks = launch(world, work, group)
                results.update({(method, world): ranks for method in methods})
            for out in work.glob(f"out-*-{world}"):
                subprocess.run(["rm", "-rf", str(out)], check=True)
        for method in ("export_cli_whole", "export_cli_streamed"):
            _run([sys.executable, __file__, "--export-worker", method, str(work)], LAUNCH_TIMEOUT_S)
            results[(method, 1)] = [json.loads((work / f"{method}.json").read_text())]
        order = list(LABELS)
        results = dict(sorted(results.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])))
        text = table(results, model_bytes)
    n_params = model_bytes // 2
    note = (f"# Host memory to load and export a {n_params / 1e9:.2f} B-parameter Llama ({model_bytes / GIB:.2f} GiB "
            "in bf16)\n\nFrom `benchmarks/load_memory.py` (CPU processes, gloo, FSDP2 over all ranks). Peak = the "
            "kernel's resident high-water mark during the phase minus the rank's runtime baseline (torch, "
            "transformers, process group, meta-device model), so it is what the weights cost that rank: its "
            "shards plus whatever the method holds besides. The fit-end export's fallback (gathering) is what it "
            "does when the ranks do not share the output directory. The one-process `export` rows read a "
            "distributed checkpoint written by the 2-process run.\n\n")
    print(note + text)
    if args.write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(note + text + "\n")


if __name__ == "__main__":
    main()
