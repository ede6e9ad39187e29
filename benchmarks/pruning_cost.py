"""What pruning costs: one prune of SmolLM2's embedding against a training step, and a Llama-2-7B-size embedding.

    python benchmarks/pruning_cost.py [--step-seconds 6.8]

The step time is taken from benchmarks/noise_overhead.py (median SmolLM2 step, batch 4 x 256).
At interval 100 a run pays one prune plus 99 mask re-applications per 100 steps. Peak memory
is read from the process's max RSS, so each large case runs in a fresh subprocess.
"""

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from neftlab import pruning


def timed(fn, reps=3):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def large_case(rows, cols, method, dtype):
    """Run in a subprocess: time and extra peak memory of one prune of a rows x cols matrix."""
    w = torch.randn(rows, cols, dtype=getattr(torch, dtype))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    mask = pruning.prune_(w, 0.3, method)
    seconds = time.perf_counter() - start
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    pruned = int((~mask).sum())  # randn draws a few exact zeros of its own, so count the mask, not the zeros
    expected = math.floor(0.3 * w.numel()) if method == "l1" else math.floor(0.3 * rows) * cols
    print(json.dumps({"seconds": seconds, "extra_peak_bytes": extra, "matrix_bytes": w.numel() * w.element_size(),
                      "mask_bytes": mask.numel() if method == "l1" else rows, "exact": pruned == expected}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-seconds", type=float, default=6.8)
    parser.add_argument("--large", nargs=4, metavar=("ROWS", "COLS", "METHOD", "DTYPE"))
    args = parser.parse_args()
    if args.large:
        return large_case(int(args.large[0]), int(args.large[1]), args.large[2], args.large[3])

    torch.manual_seed(0)
    w = torch.randn(49152, 576) * 0.05
    for method in ("l1", "l2"):
        prune = timed(lambda: pruning.prune_(w.clone(), 0.3, method))
        mask = pruning.prune_(w, 0.3, method)
        reapply = timed(lambda: w.mul_(mask), reps=20)
        per_100 = prune + 99 * reapply
        print(f"SmolLM2 embedding 49152x576 {method}: prune {prune * 1e3:.1f} ms, mask re-apply {reapply * 1e3:.2f} ms;"
              f" at interval 100: {100 * per_100 / (100 * args.step_seconds):.3f}% of training time"
              f" (step {args.step_seconds} s)")

    for method, dtype in (("l1", "float32"), ("l2", "float32"), ("l1", "bfloat16")):
        out = subprocess.run([sys.executable, __file__, "--large", "32000", "4096", method, dtype],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"32000x4096 {dtype} {method}: {r['seconds']:.2f} s, extra peak memory {r['extra_peak_bytes'] / 2**20:.0f} MiB"
              f" (matrix {r['matrix_bytes'] / 2**20:.0f} MiB, mask {r['mask_bytes'] / 2**20:.0f} MiB), exact: {r['exact']}")


if __name__ == "__main__":
    main()
