"""What the harness stage costs on the packaged SmolLM2-135M: seconds per item of multiple-choice tasks shaped
like the OpenLLM leaderboard's, through `neftlab.harness.run` (lm-eval's HFLM on the live model).

The real tasks' data is on the Hugging Face hub, which this machine cannot reach; so the items are made of
ShareGPT words cut to each task's rough shape (words per question, choices per item, words per choice, a prompt
that lists lettered options for MMLU). A multiple-choice item costs one forward pass per choice over context and
choice, so its time depends on these lengths and not on the words. Multiply by a task's item count for a whole
task; the estimate is only as good as the shapes.

    python benchmarks/harness_cost.py [--items 40] [--batch-size 8] [--device cuda|cpu]
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from neftlab import data, models
from neftlab.evaluation import harness
from neftlab.config import HarnessConfig, compose

# name: (words in the question, choices, words per choice, lettered options in the prompt, items in the real task)
SHAPES = {
    "arc_challenge-like": (22, 4, 4, False, 1172),
    "hellaswag-like": (40, 4, 20, False, 10042),
    "mmlu-like": (50, 4, 0, True, 14042),
    "truthfulqa_mc2-like": (10, 8, 10, False, 817),
}


def task_files(folder: Path, words: list[str], items: int) -> list[str]:
    rng = random.Random(0)
    paths = []
    for name, (q_words, n_choices, c_words, lettered, _) in SHAPES.items():
        def text(n):
            start = rng.randrange(len(words) - n)
            return " ".join(words[start:start + n])
        rows = []
        for _ in range(items):
            options = [text(max(c_words, 6)) for _ in range(n_choices)]
            question = text(q_words)
            if lettered:
                question += "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
                options = list("ABCD")
            rows.append({"question": question, "choices": options, "answer": 0})
        stem = name.replace("-", "_")
        (folder / f"{stem}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        (folder / f"{stem}.yaml").write_text(
            f"task: {stem}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / stem}.jsonl\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
        paths.append(str(folder / f"{stem}.yaml"))
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cfg = compose("model=llama", "data.max_samples=200")
    tok = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, tok).to(args.device).eval()
    words = " ".join(reference for _, reference in data.prepare(cfg.data, tok, True, seed=0).prompts).split()
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads, {args.items} items per task, "
          f"batch {args.batch_size}")
    print("| task shape | choices | s / item | items in the real task | estimated s for the whole task |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        tasks = task_files(Path(folder), words, args.items)
        harness.run(model, tok, HarnessConfig(tasks=tasks[:1], limit=2, batch_size=args.batch_size), seed=0)  # warm-up
        for (name, shape), task in zip(SHAPES.items(), tasks):
            start = time.perf_counter()
            harness.run(model, tok, HarnessConfig(tasks=[task], batch_size=args.batch_size), seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            per_item = (time.perf_counter() - start) / args.items
            print(f"| {name} | {shape[1]} | {per_item:.3f} | {shape[4]:,} | {per_item * shape[4]:,.0f} |")


if __name__ == "__main__":
    main()
