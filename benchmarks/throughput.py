"""Training throughput: a plain Hugging Face Trainer script against neftlab's runner, same model, data and arguments.

Each arm is a process of its own, so that peak memory is its own:
- `plain`: data and model from neftlab's loaders, `TrainingArguments` from `run.arguments.training_arguments`, a bare
  `Trainer` with the padding collator and no callbacks;
- the others: `python -m neftlab` with noise none / uniform / dynamic (adjust_interval 100) / l1 pruning (interval
  100) / FreeLB with K = 1, 2, 3 passes / NoisyTune / uniform with a consistency term (kl, symmetric), padded, and
  none / uniform packed (`data.packing=true`), and
  none packed into best-fit-decreasing rows, and none with Liger's fused kernels (`none liger`, CUDA and
  `pip install liger-kernel` only).

From the Trainer's own figures: `train_runtime` (the training loop only, not loading or evaluation), samples
per second, real (non-padding) tokens per second; and the process's peak memory (CPU: peak RSS; GPU: peak
allocated). Every arm trains on the same examples in the same order, so the real tokens are the padded arms'
attention-mask count for all of them (the Trainer's own count for a packed batch, which has no mask, skips
every token equal to the pad token, and SmolLM2 pads with its end token). With --repeats > 1 the arms alternate
and the best run of each is shown.

    python benchmarks/throughput.py [--steps 6] [--batch 4] [--max-length 256] [--model llama] [--repeats 1]
                                    [--arms plain,none,...] [--extra OVERRIDE ...] [--json FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "plain": [],
    "none": ["noise=none"],
    "uniform": ["noise=uniform"],
    "dynamic@100": ["noise=dynamic", "noise.adjust_interval=100"],
    "l1@100": ["pruning=l1", "pruning.interval=100"],
    "freelb K=1": ["noise=freelb", "noise.adv_steps=1"],
    "freelb K=2": ["noise=freelb", "noise.adv_steps=2"],
    "freelb K=3": ["noise=freelb", "noise.adv_steps=3"],
    "noisytune": ["noise=noisytune"],
    "noisefit": ["noise=noisefit"],
    "uniform kl": ["noise=uniform_kl"],  # + a consistency term: one more forward per step
    "uniform symmetric": ["noise=uniform", "noise.consistency=symmetric"],  # ... and a backward through it
    "none packed": ["noise=none", "data.packing=true"],
    "uniform packed": ["noise=uniform", "data.packing=true"],
    # Rows packed best-fit decreasing: other batches than the padded arms', so its own count of real tokens
    # (all of a packed row's tokens are real); its samples/s counts rows.
    "none packed bfd": ["noise=none", "data.packing=true", "data.packing_strategy=bfd",
                        "+trainer.args.include_num_input_tokens_seen=all"],
    "none liger": ["noise=none", "+trainer.args.use_liger_kernel=true"],
}


def common(args) -> list[str]:
    return [f"model={args.model}", f"data.max_length={args.max_length}", "data.eval_size=8",
            f"data.max_samples={args.steps * args.batch + 8}", f"trainer.max_steps={args.steps}",
            f"trainer.per_device_train_batch_size={args.batch}", "eval.num_generations=0", "logger=none",
            "trainer.resume=false", "+trainer.args.include_num_input_tokens_seen=non_padding", *args.extra]


def plain(overrides: list[str], run_dir: Path) -> dict:
    """The baseline: what a user would write with transformers alone, on neftlab's data and arguments. Returns
    the summary keys a neftlab run writes for the same figures."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from neftlab import data, models
    from neftlab.evaluation import measures
    from neftlab.config import compose
    from neftlab.run.arguments import training_arguments

    cfg = compose(*overrides)
    set_seed(cfg.seed)
    args = training_arguments(cfg, run_dir)
    tokenizer = models.load_tokenizer(cfg.model)
    prepared = data.prepare(cfg.data, tokenizer, True, cfg.seed)
    model = models.load_model(cfg.model, tokenizer, seed=cfg.seed)
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    metrics = trainer.train().metrics
    return {"train/train_runtime": metrics["train_runtime"],
            "train/train_samples_per_second": metrics["train_samples_per_second"],
            "train/num_input_tokens_seen": trainer.state.num_input_tokens_seen, **measures.peak_memory()}


def run_arm(name: str, args, out: Path) -> dict:
    overrides = common(args) + ARMS[name]
    run_dir = out / "".join(c if c.isalnum() else "_" for c in name)
    cmd = ([sys.executable, __file__, "--plain", str(run_dir), "--"] if name == "plain"
           else [sys.executable, "-m", "neftlab", f"hydra.run.dir={run_dir}"])
    proc = subprocess.run([*cmd, *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    if proc.returncode:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    m = json.loads((run_dir / "summary.json").read_text())
    return {"runtime": m["train/train_runtime"], "tokens": m["train/num_input_tokens_seen"],
            "samples": m["train/train_samples_per_second"], "memory": m["efficiency/peak_memory_mb"],
            "loss": m.get("train/train_loss")}


def main():
    if sys.argv[1:2] == ["--plain"]:  # one plain arm, in a process of its own
        run_dir, overrides = Path(sys.argv[2]), sys.argv[4:]
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(plain(overrides, run_dir)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every arm, e.g. size=gpu")
    parser.add_argument("--json", help="also write the figures to this file (benchmarks/gpu_check.py reads it)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            for name in arms:
                result = run_arm(name, args, Path(out) / str(repeat))
                print(f"  {name}: {result}", file=sys.stderr)
                if name not in best or result["runtime"] < best[name]["runtime"]:
                    best[name] = result
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{device}; model={args.model}, {args.steps} steps x batch {args.batch} x <= {args.max_length} tokens; "
          f"best of {args.repeats}")
    print("| arm | real tokens/s | samples/s | peak memory MiB | tokens/s vs plain | vs neftlab none |")
    print("|---|---|---|---|---|---|")
    padded = [r["tokens"] for name, r in best.items() if "packed" not in name]
    assert padded and len(set(padded)) == 1, f"the padded arms saw different tokens: {padded}"
    rate = {name: (r["tokens"] if "bfd" in name else padded[0]) / r["runtime"] for name, r in best.items()}
    for name, r in best.items():
        vs_plain = f"{rate[name] / rate['plain']:.3f}" if "plain" in rate else ""
        vs_none = f"{rate[name] / rate['none']:.3f}" if "none" in rate else ""
        print(f"| {name} | {rate[name]:.1f} | {r['samples']:.2f} | {r['memory']:.0f} | {vs_plain} | {vs_none} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "arms": {
            name: {**r, "tokens_per_second": rate[name]} for name, r in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
