"""`make gpu-check`: the GPU lane and the performance targets on one CUDA GPU, in 8 minutes, as one report.

Each step runs in a process of its own under a time box (the boxes add up to --budget); a step that overruns
its box is stopped and reported as such, and the next one still runs. In order: `pytest -m gpu`; the noise and
pruning overhead benchmarks; the throughput benchmark at the study preset's shape (against the plain Trainer,
and with Liger's kernels when liger-kernel is installed) and packed at 2,048 tokens; generation of 256 prompts x
up to 512 new tokens; the judge on 256 pairs; then the whole suite with the time that is left. Writes
DIR/gpu-check.md and DIR/gpu-check.json (each figure against its target, pass or fail, with the GPU, torch and
CUDA versions and each step's command) and each step's output under DIR/logs/. Exit 0 when every step ran and
every target was met (with --dry-run: when every step ran); the suite, run with whatever time is left, need not
finish, but when it does, its failures count.

--dry-run runs the same steps on the CPU at tiny sizes (a 2-layer random LLaMA, a few steps and prompts) in under
3 minutes, so that the script is tested where no GPU is at hand; its figures say nothing about the targets, and
its last step only collects the suite.

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--budget 480]       (make gpu-check [PY=…] [ARGS=…])
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


@dataclass
class Target:
    """One figure against its target, as the issue writes it: `text` is shown, `ok` decides."""
    figure: str
    text: str
    ok: Callable[[float], bool]
    unit: str = ""


@dataclass
class Step:
    name: str
    box: int  # seconds, of the default 480 s budget (another --budget scales them); 0: whatever is left
    command: Callable[[argparse.Namespace, Path], list[str]]  # given the file its figures go to
    figures: Callable[[Path], dict[str, float]]  # read from that file (a JSON, or pytest's JUnit XML)
    targets: list[Target] = field(default_factory=list)
    skip: Callable[[argparse.Namespace], str | None] = lambda args: None  # a reason not to run it
    suffix: str = ".json"
    optional: bool = False  # run only with the time left; not having finished does not fail the check


def bench(script: str, *options: str) -> list[str]:
    return [sys.executable, str(BENCH / script), *options]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def picked(path: Path, names: dict[str, str]) -> dict[str, float]:
    """The benchmark's JSON figures under the report's names ({report name: JSON key})."""
    figures = read_json(path)
    return {name: figures[key] for name, key in names.items()}


def pytest_counts(path: Path) -> dict[str, float]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"]}


def tiny(args, gpu: list[str], dry: list[str]) -> list[str]:
    return dry if args.dry_run else gpu


def has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def throughput_figures(path: Path) -> dict[str, float]:
    arms = read_json(path)["arms"]
    figures = {"neftlab none / plain Trainer, real tokens/s": arms["none"]["tokens_per_second"]
               / arms["plain"]["tokens_per_second"]}
    if "none liger" in arms:
        figures["use_liger_kernel peak memory"] = arms["none liger"]["memory"] / 1024
        figures["use_liger_kernel train loss - none's"] = abs(arms["none liger"]["loss"] - arms["none"]["loss"])
    return figures


STEPS = [
    Step("pytest -m gpu", 100,
         lambda a, out: [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                         f"--junitxml={out}", str(ROOT / "tests")],
         pytest_counts, [Target("failed", "0 failed", lambda v: v == 0)], suffix=".xml"),
    Step("noise overhead", 45,
         lambda a, out: bench("noise_overhead.py", "--json", str(out), *tiny(
             a, ["--device", "cuda", "--batch", "32", "--max-length", "512", "--steps", "20"],
             ["--device", "cpu", "--model", "llama_tiny", "--batch", "2", "--max-length", "64", "--steps", "3"])),
         lambda path: picked(path, {"noise=uniform over noise=none": "uniform_overhead_pct",
                                    "noise=dynamic, adjust_interval=100, over noise=none":
                                        "dynamic_at_100_overhead_pct"}),
         [Target("noise=uniform over noise=none", "≤ 1%", lambda v: v <= 1, "%"),
          Target("noise=dynamic, adjust_interval=100, over noise=none", "≤ 1%", lambda v: v <= 1, "%")]),
    Step("pruning overhead", 35,
         lambda a, out: bench("pruning_cost.py", "--json", str(out), "--step-seconds",
                              str(a.step_seconds), *tiny(a, ["--device", "cuda"], [
                                  "--device", "cpu", "--model", "llama_tiny", "--large-shape", "2000", "256"])),
         lambda path: picked(path, {"pruning=l1, interval=100, over noise=none": "l1_at_100_overhead_pct"}),
         [Target("pruning=l1, interval=100, over noise=none", "≤ 2%", lambda v: v <= 2, "%")],
         lambda a: None if a.step_seconds else "needs the noise step's step time, which it did not measure"),
    Step("throughput, study shape", 110,
         lambda a, out: bench("throughput.py", "--json", str(out), "--arms",
                              "plain,none" + (",none liger" if has_liger() and not a.dry_run else ""), *tiny(
                                  a, ["--batch", "32", "--max-length", "512", "--steps", "20", "--extra",
                                      "size=gpu", "trainer.save_steps=1000"],
                                  ["--model", "llama_tiny", "--batch", "2", "--max-length", "64", "--steps", "2"])),
         throughput_figures,
         [Target("neftlab none / plain Trainer, real tokens/s", "≥ 0.98", lambda v: v >= 0.98, "x"),
          Target("use_liger_kernel peak memory", "≤ 10 GB", lambda v: v <= 10, "GB"),
          Target("use_liger_kernel train loss - none's", "within 1e-3", lambda v: v <= 1e-3)]),
    Step("throughput, packed at 2048 tokens", 70,
         lambda a, out: bench("throughput.py", "--json", str(out), "--arms", "none,none packed", *tiny(
             a, ["--batch", "16", "--max-length", "2048", "--steps", "10", "--extra", "size=gpu",
                 "trainer.save_steps=1000"],
             ["--model", "llama_tiny", "--batch", "2", "--max-length", "128", "--steps", "2"])),
         lambda path: {"packed / unpacked, real tokens/s": read_json(path)["arms"]["none packed"][
             "tokens_per_second"] / read_json(path)["arms"]["none"]["tokens_per_second"]},
         [Target("packed / unpacked, real tokens/s", "≥ 1.35", lambda v: v >= 1.35, "x")]),
    Step("generation", 80,
         lambda a, out: bench("generation.py", "--json", str(out), "--batched-only", "--repeats", "1", *tiny(
             a, ["--device", "cuda", "--prompts", "256", "--max-new-tokens", "512", "--batch-size", "64"],
             ["--device", "cpu", "--model", "llama_tiny", "--prompts", "4", "--max-new-tokens", "8",
              "--batch-size", "4"])),
         lambda path: picked(path, {"wall time": "batched_seconds", "prompts": "prompts",
                                    "max new tokens": "max_new_tokens", "answer tokens": "answer_tokens"}),
         [Target("wall time", "≤ 60 s", lambda v: v <= 60, "s")]),
    Step("judge", 40,
         lambda a, out: bench("judge_cost.py", "--json", str(out), *tiny(
             a, ["--pairs", "256", "--batch-size", "32"],
             ["--pairs", "2", "--batch-size", "4", "--max-length", "128"])),
         lambda path: picked(path, {"wall time": "seconds", "pairs": "pairs", "loading the judge, s": "load_seconds"}),
         [Target("wall time", "≤ 30 s", lambda v: v <= 30, "s")]),
    Step("whole suite", 0,  # whatever time is left
         lambda a, out: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out}",
                         *(["--collect-only"] if a.dry_run else
                           ["-n", "4", "--dist", "loadgroup"] if importlib.util.find_spec("xdist") else []),
                         str(ROOT / "tests")],
         pytest_counts, [Target("failed", "0 failed", lambda v: v == 0)], suffix=".xml", optional=True),
]


DRY_RUN_GUARD = 900  # seconds: a dry-run step that takes longer hangs


def run_step(step: Step, args, box: float, out_dir: Path) -> dict:
    """Run one step in a process group of its own, stopped at `box` seconds; its figures against its targets."""
    slug = re.sub(r"\W+", "_", step.name).strip("_")
    result_file, log = out_dir / "logs" / (slug + step.suffix), out_dir / "logs" / (slug + ".log")
    command = step.command(args, result_file)
    record = {"step": step.name, "command": shlex.join(command), "box_seconds": round(box), "log": str(log),
              "result": str(result_file), "figures": []}
    reason = step.skip(args) or (None if box >= 1 else "no time left in the budget")
    if reason:
        return {**record, "status": f"not run: {reason}", "seconds": 0}
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
        try:
            rc = proc.wait(timeout=box)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"ran out of its {box:.0f} s time box"
    record.update(status=status, seconds=round(time.monotonic() - start, 1))
    values = {}
    if result_file.exists():
        try:
            values = step.figures(result_file)
        except (KeyError, ValueError, TypeError, ET.ParseError) as e:
            record["status"] += f"; its figures cannot be read ({type(e).__name__}: {e})"
    for target in step.targets:
        value = values.get(target.figure)
        record["figures"].append({"figure": target.figure, "value": value, "unit": target.unit,
                                  "target": target.text, "passed": None if value is None else bool(target.ok(value))})
    for name, value in values.items():  # figures without a target (the pytest counts)
        if name not in {t.figure for t in step.targets}:
            record["figures"].append({"figure": name, "value": value, "unit": "", "target": "", "passed": None})
    return record


def machine() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def shown(f: dict) -> str:
    if f["value"] is None:
        return "not measured"
    value = f["value"]
    text = f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}" if abs(value) < 0.01 else f"{value:.3f}"
    return f"{text} {f['unit']}".strip() if f["unit"] not in ("x",) else f"{text}x"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# neftlab gpu-check, {m['date']}", "",
             f"GPU: {m['gpu'] or 'none (CPU)'}; torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}, "
             f"{m['cpus']} CPUs. Budget {report['budget_seconds']} s, used {report['seconds']:.0f} s.", ""]
    if report["dry_run"]:
        lines += ["**Dry run**: the same steps on the CPU at tiny sizes; the figures test the script, not the "
                  "targets, and the last step only collects the suite.", ""]
    lines += ["| step | figure | measured | target | result |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        for f in s["figures"]:
            result = "" if not f["target"] else "pass" if f["passed"] else "fail" if f["passed"] is False else "—"
            lines.append(f"| {s['step']} | {f['figure']} | {shown(f)} | {f['target']} | {result} |")
    lines += ["", "| step | status | seconds | time box | command |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['box_seconds']} s | `{s['command']}` |")
    if report["dry_run"]:  # a tiny CPU run's figures say nothing of the targets
        verdict = "every step ran (a dry run judges no target)" if report["passed"] else "not every step ran"
    else:
        verdict = "every step ran and every target was met" if report["passed"] else "not every step ran or target met"
    return "\n".join(lines + ["", f"Result: {verdict}."]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-check", help="where the report goes")
    parser.add_argument("--budget", type=int, default=480, help="seconds for all the steps together")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; --dry-run runs the same steps on the CPU", file=sys.stderr)
            return 2
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    scale = args.budget / max(1, sum(s.box for s in STEPS))
    start, steps, args.step_seconds = time.monotonic(), [], None
    for step in STEPS:
        left = args.budget - (time.monotonic() - start)
        # A dry run only checks that every step still runs: its pass must not depend on the machine's load, so its
        # steps have no time box, only a guard against a hang.
        box = DRY_RUN_GUARD if args.dry_run else left if step.box == 0 else min(left, step.box * scale)
        record = run_step(step, args, box, args.out)
        print(f"gpu-check: {step.name}: {record['status']} ({record['seconds']} s)", file=sys.stderr)
        if step.name == "noise overhead" and record["status"] == "ok":
            args.step_seconds = read_json(Path(record["result"]))["step_seconds_none"]
        steps.append(record)
    ran = all(s["status"] == "ok" for s, step in zip(steps, STEPS) if not step.optional)
    met = all(f["passed"] is not False for s in steps for f in s["figures"])
    report = {"machine": machine(), "dry_run": args.dry_run, "budget_seconds": args.budget,
              "seconds": round(time.monotonic() - start, 1), "passed": ran and (args.dry_run or met), "steps": steps}
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu-check.md").write_text(markdown(report))
    print(f"gpu-check: {args.out / 'gpu-check.md'}", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
