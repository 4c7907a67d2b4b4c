"""FISH at keep 0.5%: training-state memory, peak training memory and DDP bytes per step vs full fine-tuning.

Configs: MiniLM-sized (hidden 384, 6 layers, 12 heads, ffn 1536) and BERT-large-sized (hidden 1024, 24 layers,
16 heads, ffn 4096), vocab 30522, BertForSequenceClassification with 2 labels, random init (no downloads).

* memory (measured, CPU): one real AdamW step per method; gradient bytes = every ``.grad`` after backward,
  optimizer-state bytes = every tensor in ``optimizer.state``; peak = ``leantune.memory``'s tracker (every live
  tensor storage during a warm step, torch's MemTracker). fish uses a random mask of the same size: memory and
  bytes depend on k only, not on which entries are chosen.
* bytes per step (measured for MiniLM with 2 torchrun/gloo processes, one step each): the payload each rank hands
  to all-reduce, counted by the communication hook -- dense DDP (full fine-tuning) vs fish masked mode with the
  sparse hook vs fish sparse mode. For BERT-large the same count is computed from the tensor sizes on the meta
  device (values 4 bytes each, int32 indices 4 bytes each), the formula the MiniLM run checks.

    python benchmarks/fish_bench.py            # writes benchmarks/results/fish_bench.json and .png
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers as hf

import leantune
from leantune.memory import measure_peak_training_memory, training_step

RESULTS = Path(__file__).parent / "results"
KEEP_RATIO = 0.005
CONFIGS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def make_model(name: str, device: str = "cpu") -> torch.nn.Module:
    config = hf.BertConfig(vocab_size=30522, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **CONFIGS[name])
    torch.manual_seed(0)
    with torch.device(device):
        return hf.BertForSequenceClassification(config)


def wrap(name: str, method: str, mode: str = "sparse") -> leantune.TunedModel:
    if method == "full":
        return leantune.wrap(make_model(name), leantune.make_config("full"))
    config = leantune.make_config("fish", keep_ratio=KEEP_RATIO, mask_type="random", mode=mode)
    return leantune.wrap(make_model(name), config)


def make_batch(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_memory(name: str, method: str, batch: int, seq: int) -> dict:
    """One counted step (gradients and optimizer state), then the tracker's peak of a warm step."""
    tuned = wrap(name, method).train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    inputs = make_batch(batch, seq)
    tuned(**inputs).loss.backward()
    grad_bytes = state_bytes(p.grad for p in tuned.parameters() if p.grad is not None)
    optimizer.step()
    optimizer_bytes = state_bytes(t for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    optimizer.zero_grad(set_to_none=True)
    peak = measure_peak_training_memory(training_step(tuned, optimizer, inputs), tuned, optimizer, warmup_steps=0)
    deltas = tuned.method.deltas().values() if method == "fish" else []
    return {
        "trainable_parameters": sum(p.numel() for p in params),
        "base_parameters": sum(p.numel() for p in tuned.base_model.parameters()),
        "gradient_bytes": grad_bytes,
        "optimizer_state_bytes": optimizer_bytes,
        "index_bytes": state_bytes(d.indices for d in deltas),
        "peak_bytes": peak["peak_bytes"],
        "peak_breakdown": peak["breakdown"],
    }


def analytic_bytes(name: str) -> dict:
    """Per-step all-reduce payload from tensor sizes (meta device): dense DDP vs fish at KEEP_RATIO."""
    model = make_model(name, device="meta")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    k = int(total * KEEP_RATIO)
    return {"parameters": total, "k": k, "head": head, "dense_bytes": 4 * total, "fish_value_bytes": 4 * k,
            "fish_value_and_index_bytes": 4 * k + 4 * (k - head)}


def comm_worker(out: str, batch: int, seq: int) -> None:
    """Run under torchrun: one step of dense DDP, fish masked + sparse hook, fish sparse; rank 0 writes bytes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.weak import WeakIdKeyDictionary

    from leantune.methods.fish import SparseCommState, register_sparse_comm_hook, sparse_allreduce_hook

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for label, method, mode in [("dense_ddp", "full", None), ("fish_masked_hook", "fish", "masked"),
                                ("fish_sparse", "fish", "sparse")]:
        tuned = wrap("minilm", method, mode or "sparse")
        ddp = DistributedDataParallel(tuned)
        if method == "full":
            state = SparseCommState(WeakIdKeyDictionary())  # no selections: counts a plain dense all-reduce
            ddp.register_comm_hook(state, sparse_allreduce_hook)
        else:
            state = register_sparse_comm_hook(ddp, tuned)
        ddp(**make_batch(batch, seq, seed=rank)).loss.backward()
        results[label] = {"bytes_per_step": state.bytes_per_step[0],
                          "dense_bytes_per_step": state.dense_bytes_per_step[0]}
        del ddp, tuned
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def measure_comm(batch: int, seq: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "comm.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), __file__, "--comm-worker", out,
                   "--batch", str(batch), "--seq", str(seq)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
        return json.loads(Path(out).read_text())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["memory"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    mib = 1024**2
    panels = [
        ("gradient + optimizer state (MiB, log)",
         lambda n, m: (results["memory"][n][m]["gradient_bytes"] + results["memory"][n][m]["optimizer_state_bytes"])
         / mib, True),
        ("peak training memory (MiB)", lambda n, m: results["memory"][n][m]["peak_bytes"] / mib, False),
        ("all-reduce payload per step (MiB, log)",
         lambda n, m: results["bytes"][n]["dense_bytes" if m == "full" else "fish_value_bytes"] / mib, True),
    ]
    for ax, (title, value, log) in zip(axes, panels):
        for offset, method in ((-0.2, "full"), (0.2, "fish")):
            heights = [value(n, method) for n in names]
            bars = ax.bar([i + offset for i in range(len(names))], heights, 0.4,
                          label="full fine-tuning" if method == "full" else f"fish sparse, keep {KEEP_RATIO:.1%}")
            ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FISH keep {KEEP_RATIO:.1%} vs full fine-tuning (CPU, batch {results['batch']} x seq "
                 f"{results['seq']}, fp32, AdamW)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="minilm,bert-large")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--comm-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.comm_worker:
        comm_worker(args.comm_worker, args.batch, args.seq)
        return
    torch.set_num_threads(2)
    results = {"keep_ratio": KEEP_RATIO, "batch": args.batch, "seq": args.seq, "memory": {}, "bytes": {}}
    for name in args.configs.split(","):
        results["bytes"][name] = analytic_bytes(name)
        results["memory"][name] = {m: measure_memory(name, m, args.batch, args.seq) for m in ("full", "fish")}
        full, fish = results["memory"][name]["full"], results["memory"][name]["fish"]
        ratio = (fish["gradient_bytes"] + fish["optimizer_state_bytes"]) / (
            full["gradient_bytes"] + full["optimizer_state_bytes"])
        print(f"{name}: grad+optimizer state fish/full = {ratio:.4%}, peak {fish['peak_bytes'] / 2**20:.0f} MiB vs "
              f"{full['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    if "minilm" in results["memory"]:
        results["bytes_measured_minilm_2proc"] = measure_comm(args.batch, args.seq)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fish_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "fish_bench.png")
    print(json.dumps(results["bytes"], indent=2))
    print(json.dumps(results.get("bytes_measured_minilm_2proc"), indent=2))


if __name__ == "__main__":
    main()
