"""What pruning costs: a prune event on SmolLM2 against a training step, and a Llama-2-7B-size embedding.

    python benchmarks/pruning_cost.py [--step-seconds 6.8] [--device cuda|cpu] [--large-shape 32000 4096]
                                      [--model llama] [--json FILE]

On CUDA when there is a GPU, else on the CPU. The step time is taken from benchmarks/noise_overhead.py
(median SmolLM2 step, batch 4 x 256, on the same device: 6.8 s is the CPU's). At interval 100 a run pays
one prune plus 99 mask re-applications per 100 steps. Peak memory is the process's VmHWM on the CPU, so
each large case runs in a fresh subprocess, and torch.cuda.max_memory_allocated on CUDA. On CUDA every
timer read waits for the GPU's queued work first.
"""

import argparse
import json
import math
import subprocess
import sys
import time

from pathlib import Path

import torch

from neftlab.evaluation.measures import peak_rss
from neftlab.methods import pruning
from neftlab.methods.pruner import PruningCallback


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps=3):
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def large_case(rows, cols, method, dtype, device):
    """Run in a subprocess: time and extra peak memory of one prune of a rows x cols matrix."""
    w = torch.randn(rows, cols, dtype=getattr(torch, dtype), device=device)
    sync(device)
    before = peak_bytes(device)
    start = time.perf_counter()
    mask = pruning.prune_(w, 0.3, method)
    sync(device)
    seconds = time.perf_counter() - start
    extra = peak_bytes(device) - before
    pruned = int((~mask).sum())  # randn draws a few exact zeros of its own, so count the mask, not the zeros
    expected = math.floor(0.3 * w.numel()) if method == "l1" else math.floor(0.3 * rows) * cols
    print(json.dumps({"seconds": seconds, "extra_peak_bytes": extra, "matrix_bytes": w.numel() * w.element_size(),
                      "mask_bytes": mask.numel() if method == "l1" else rows, "exact": pruned == expected}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-seconds", type=float, default=6.8)
    parser.add_argument("--large", nargs=4, metavar=("ROWS", "COLS", "METHOD", "DTYPE"))
    parser.add_argument("--large-shape", nargs=2, type=int, default=[32000, 4096], metavar=("ROWS", "COLS"),
                        help="the large matrix (default: Llama-2-7B's embedding)")
    parser.add_argument("--model", default="llama", help="a model group: llama (SmolLM2) or llama_tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.large:
        return large_case(int(args.large[0]), int(args.large[1]), args.large[2], args.large[3], device)

    print(f"device: {device}")
    rows, cols = args.large_shape
    figures = {"device": str(device), "step_seconds": args.step_seconds, "large_shape": [rows, cols]}
    for method, dtype in (("l1", "float32"), ("l2", "float32"), ("l1", "bfloat16")):
        out = subprocess.run([sys.executable, __file__, "--large", str(rows), str(cols), method, dtype,
                              "--device", args.device], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        figures[f"large_{method}_{dtype}"] = r
        print(f"{rows}x{cols} {dtype} {method}: {r['seconds']:.2f} s, extra peak memory "
              f"{r['extra_peak_bytes'] / 2**20:.0f} MiB (matrix {r['matrix_bytes'] / 2**20:.0f} MiB, "
              f"mask {r['mask_bytes'] / 2**20:.0f} MiB), exact: {r['exact']}")

    # What the runner pays on SmolLM2 itself: a prune event (prune, sparsity, parameter counts, the log line)
    # and, on every other step, re-applying the masks. Measured after the large cases, whose subprocesses
    # would otherwise compete with this process's idle worker threads.

    from neftlab import models
    from neftlab.config import PruningConfig, compose
    cfg = compose(f"model={args.model}")
    model = models.load_model(cfg.model, models.load_tokenizer(cfg.model)).to(device)
    original = model.get_input_embeddings().weight.detach().clone()
    for method in ("l1", "l2"):
        callback = PruningCallback(model, PruningConfig(kind=method, ratio=0.3), lambda step, m: None)
        callback.weights = pruning.targets(model, "embedding")

        def prune_event():
            model.get_input_embeddings().weight.data.copy_(original)
            callback.prune(0)
        prune = timed(prune_event, device)
        reapply = timed(callback.apply_masks, device, reps=20)
        per_100 = prune + 99 * reapply
        figures[f"{method}_at_100_overhead_pct"] = 100 * per_100 / (100 * args.step_seconds)
        shape = "x".join(map(str, original.shape))
        print(f"{args.model} embedding {shape} {method}: prune event {prune * 1e3:.1f} ms, mask re-apply "
              f"{reapply * 1e3:.2f} ms; at interval 100: {figures[f'{method}_at_100_overhead_pct']:.3f}% of "
              f"training time (step {args.step_seconds} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
