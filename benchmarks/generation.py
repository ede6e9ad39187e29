"""Batched greedy generation against one prompt at a time, on the packaged SmolLM2-135M.

The first held-out ShareGPT prompts (of at most --max-prompt-tokens tokens) are answered by
`generation.generate` in batches of --batch-size and in batches of 1 (how neftlab generated before); both give
the same greedy answers, so their tokens/s compare like with like. Repeats alternate the two, so that machine drift hits both alike; min and median over the
repeats. On CUDA every timer read waits for the GPU's queued work first.

    python benchmarks/generation.py [--prompts 16] [--max-new-tokens 128] [--batch-size 16] [--repeats 2]
                                    [--max-prompt-tokens N] [--device cuda|cpu] [--model llama]
                                    [--batched-only] [--json FILE]

--batched-only times only the batched mode (what a run does), for prompt counts where one at a time would take
too long; --json also writes the figures to a file (benchmarks/gpu_check.py reads it).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neftlab import data, models
from neftlab.evaluation import generation
from neftlab.config import EvalConfig, compose


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="only held-out prompts of at most this many tokens (ShareGPT's run to thousands)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="llama", help="a model group: llama (SmolLM2) or llama_tiny")
    parser.add_argument("--batched-only", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    pool = max(128, 2 * args.prompts)  # held-out prompts to choose from
    cfg = compose(f"model={args.model}", f"data.max_samples={4 * pool}", f"data.eval_size={pool}")
    tok = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, tok).to(device).eval()
    held_out = data.prepare(cfg.data, tok, True, seed=0).prompts
    lengths = [len(ids) for ids in generation.encode_prompts(tok, held_out, room=None)[0]]
    chosen = [(p, n) for p, n in zip(held_out, lengths) if n <= (args.max_prompt_tokens or n)][: args.prompts]
    prompts = [p for p, _ in chosen]
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {len(prompts)} prompts of "
          f"{sorted(n for _, n in chosen)} tokens, up to {args.max_new_tokens} new tokens each")

    def run(batch_size: int) -> tuple[float, list[dict]]:
        eval_cfg = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        samples, _ = generation.generate(model, tok, prompts, eval_cfg, step=0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, samples

    generation.generate(model, tok, prompts[:1], EvalConfig(max_new_tokens=2), step=0)  # warm-up
    modes = {f"batched ({args.batch_size})": args.batch_size}
    if not args.batched_only:
        modes = {"one at a time": 1, **modes}
    seconds = {name: [] for name in modes}
    answers = {}
    for _ in range(args.repeats):
        for name, batch_size in modes.items():
            s, answers[name] = run(batch_size)
            seconds[name].append(s)
    batched = list(answers.values())[-1]
    tokens = sum(s["tokens"] for s in batched)
    capped = sum(s["stop"] == "max_new_tokens" for s in batched)
    if args.batched_only:
        print(f"{tokens} answer tokens; {capped} of {len(prompts)} hit the cap")
    else:
        same = sum(a["generation"] == b["generation"] for a, b in zip(*answers.values()))
        print(f"{tokens} answer tokens; {same} of {len(prompts)} answers identical in both modes; {capped} hit the cap")
    for name, ts in seconds.items():
        print(f"{name:14s} min {min(ts):7.2f} s  median {statistics.median(ts):7.2f} s  "
              f"= {tokens / min(ts):7.1f} / {tokens / statistics.median(ts):7.1f} tokens/s (best / median)")
    if not args.batched_only:
        one, many = seconds.values()
        print(f"batched is {statistics.median(one) / statistics.median(many):.2f}x faster (median), "
              f"{min(one) / min(many):.2f}x (best)")
    if args.json:
        many = list(seconds.values())[-1]
        Path(args.json).write_text(json.dumps({
            "device": str(device), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "answer_tokens": tokens, "capped": capped,
            "batched_seconds": min(many), "batched_tokens_per_second": tokens / min(many)}, indent=1))

if __name__ == "__main__":
    main()
