"""Step-time overhead of neftlab's noise against no noise and against the Trainer's built-in NEFTune.

SmolLM2-135M, batch 4 x 256 ShareGPT tokens, forward + backward + AdamW step, on CUDA when there is a GPU,
else on the CPU. The three variants are interleaved step by step so that machine drift hits them alike;
the hooks' own cost is also timed in isolation, since it is far below step-time jitter. On CUDA every
timer read waits for the GPU's queued work first. `noise=dynamic` is the uniform hook plus the stability
statistic once every `adjust_interval` steps, so its overhead is the uniform one plus the statistic's share.

    python benchmarks/noise_overhead.py [--steps 6] [--batch 4] [--max-length 256] [--model llama]
                                        [--device cuda|cpu] [--json FILE]
"""

import argparse
import json
import statistics
import time

import torch
from transformers import DataCollatorForSeq2Seq
from transformers.integrations.neftune import neftune_post_forward_hook

from pathlib import Path
from neftlab import data, models
from neftlab.methods import noise
from neftlab.methods.noise.dynamic import stability
from neftlab.config import compose


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="llama", help="a model group: llama (SmolLM2) or llama_tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    cfg = compose(f"model={args.model}", f"data.max_length={args.max_length}",
                  f"data.max_samples={max(64, 2 * args.batch + 8)}")
    tok = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, tok).to(device)
    prepared = data.prepare(cfg.data, tok, True, seed=0)
    collate = DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    batch = collate([prepared.train[i] for i in range(args.batch)]).to(device)
    print(f"device {device}, batch {tuple(batch['input_ids'].shape)}, "
          f"real tokens per sample {batch['attention_mask'].sum(1).tolist()}")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    emb = model.get_input_embeddings()

    def step():
        sync()
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        sync()
        return time.perf_counter() - start

    def with_trainer_neftune():
        emb.neftune_noise_alpha = 5.0
        handle = emb.register_forward_hook(neftune_post_forward_hook)
        try:
            return step()
        finally:
            handle.remove()
            del emb.neftune_noise_alpha

    def with_neftlab():
        with noise.attach(model, "uniform", alpha=5.0):
            return step()

    variants = {"none": step, "neftlab uniform": with_neftlab, "trainer neftune": with_trainer_neftune}
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, fn in variants.items():
            times[name].append(fn())
    base = statistics.median(times["none"])
    ratios = {name: statistics.median(ts) / base for name, ts in times.items()}
    for name, ts in times.items():
        print(f"{name:16s} median step {statistics.median(ts):7.3f} s  ratio to none {statistics.median(ts) / base:.4f}"
              f"  (steps: {', '.join(f'{t:.2f}' for t in ts)})")

    # The hooks alone, on this batch's embedding output: what they add to every step.
    out = emb(batch["input_ids"]).detach()
    with noise.attach(model, "uniform", alpha=5.0) as hook:
        hook._mask = batch["attention_mask"]
        reps = 200
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            hook._add_noise(emb, None, out)
        sync()
        ours = (time.perf_counter() - start) / reps
    emb.neftune_noise_alpha = 5.0
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        neftune_post_forward_hook(emb, None, out)
    sync()
    theirs = (time.perf_counter() - start) / reps
    print(f"hook alone: neftlab {ours * 1e3:.3f} ms = {100 * ours / base:.4f}% of a step; "
          f"trainer's {theirs * 1e3:.3f} ms = {100 * theirs / base:.4f}% of a step")

    sync()
    start = time.perf_counter()
    value = stability(emb.weight)  # ends in a host read, so it waits for the GPU itself
    stat = time.perf_counter() - start
    print(f"dynamic statistic on {tuple(emb.weight.shape)}: {stat * 1e3:.1f} ms (= {value:.5f}); "
          f"at adjust_interval 100 that is {100 * stat / (100 * base):.4f}% of training time")
    figures = {"device": str(device), "batch": list(batch["input_ids"].shape), "steps": args.steps,
               "step_seconds_none": base, "uniform_overhead_pct": 100 * (ratios["neftlab uniform"] - 1),
               "trainer_neftune_overhead_pct": 100 * (ratios["trainer neftune"] - 1),
               "hook_ms": ours * 1e3, "statistic_ms": stat * 1e3,
               "dynamic_at_100_overhead_pct": 100 * (ratios["neftlab uniform"] - 1) + 100 * stat / (100 * base)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
