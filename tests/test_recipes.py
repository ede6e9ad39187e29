"""The README's recipes, run as written at size=tiny, so that a recipe that stops working fails here.

Each command of the README's "Recipes" section is run with `size=tiny logger=none output_root=<tmp>` added (or
its small sizes, where `size=tiny` would swap the model the recipe is about), `<time>_<pid>`-style placeholders
replaced by the directories the earlier commands made. Three exceptions, each for its cost or its hardware: the
GPU recipes are composed, not run (no GPU here); the judge recipe runs with a tiny random judge in place of the
packaged one; the search runs 2 trials, not 20. `wandb sync` is not run (it uploads): the path it is given is
checked to be the one the run prints. `test_every_recipe_command_is_here` fails for a README command that this
file does not run.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, compose_cfg

pytestmark = pytest.mark.slow  # the README's commands as a user types them: each a command line of its own

README = (ROOT / "README.md").read_text()
RECIPES = README.split("## Recipes")[1].split("## Documentation")[0]
COMMANDS = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", RECIPES, re.S)
            for line in block.splitlines() if line.strip()]
RECORDS = [json.loads(line) for line in re.search(r"```json\n(.*?)```", RECIPES, re.S).group(1).splitlines()]


def recipe(command: str) -> list[str]:
    """The README's command as argv."""
    assert command in COMMANDS, f"not a README recipe: {command}"
    return shlex.split(command)


def run(argv: list[str], *extra: str, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    if argv[:2] == ["python", "-m"]:
        argv = [sys.executable, *argv[1:]]
    proc = subprocess.run([*argv, *extra], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def tiny(root):
    return ["logger=none", f"output_root={root}"]


@pytest.fixture(scope="module")
def headline_run(root):
    proc = run(recipe("python -m neftlab noise=dynamic pruning=l1 size=tiny"), *tiny(root))
    (run_dir,) = (root / "runs").iterdir()
    assert f"neftlab: completed: {run_dir}" in proc.stderr
    return run_dir


def test_the_headline_command(headline_run):
    compose_cfg(*recipe("python -m neftlab noise=dynamic pruning=l1")[3:])  # the full CPU size: composed
    summary = json.loads((headline_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["pruning/sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_a_sweep_its_report_and_wandb(root, tmp_path):
    sweep_root = tmp_path / "sweep"
    run(recipe("python -m neftlab -m noise=uniform noise.alpha=1,5,10 pruning=l1 pruning.ratio=0.1,0.3"),
        "size=tiny", "logger=wandb", "logger.mode=offline", f"output_root={sweep_root}")
    (sweep,) = (sweep_root / "multiruns").iterdir()
    report = recipe("python -m neftlab.report outputs/multiruns/<time>_<pid>")
    run([*report[:3], str(sweep)])
    assert "(heatmap.png)" in (sweep / "report.md").read_text()
    proc = run([*report[:3], str(sweep), "--wandb"])
    assert "W&B: nothing pushed: no arm is paired with a baseline arm" in proc.stdout  # every arm has noise here


def test_a_studys_wandb_workspace(tmp_path):
    """The study offline at two arms and two seeds, its report with the workspace's spec, and the command that
    saves it, which without W&B credentials says so in one line."""
    run(recipe("python -m neftlab -m experiment=neftune_repro logger.mode=offline"), "size=tiny",
        "noise=none,uniform", "seed=1,2", f"output_root={tmp_path}")
    (study,) = (tmp_path / "experiments").iterdir()
    sync = recipe("wandb sync outputs/experiments/neftune_repro_<id>/*/wandb/offline-run-*")
    assert len(list(study.glob(sync[2].split("/", 3)[3]))) == 4  # the glob finds every job's offline run
    report = recipe("python -m neftlab.report outputs/experiments/neftune_repro_<id> --wandb")
    proc = run([*report[:3], str(study), "--wandb"])
    spec = study / "wandb_workspace.json"
    assert f"python -m neftlab.workspace {spec}" in proc.stdout and spec.is_file()
    save = recipe("python -m neftlab.workspace outputs/experiments/neftune_repro_<id>/wandb_workspace.json")
    proc = subprocess.run([sys.executable, *save[1:3], str(spec)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_API_KEY": "", "HOME": str(tmp_path),
                               "NETRC": str(tmp_path / "none")})
    assert proc.returncode == 1 and proc.stderr.startswith("error: W&B did not save the workspace") \
        and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_an_offline_wandb_run_names_its_sync_command(tmp_path):
    proc = run(recipe("python -m neftlab logger.mode=offline"), "size=tiny", f"output_root={tmp_path}")
    (path,) = re.findall(r"upload later with `wandb sync (\S+)`", proc.stderr)
    assert (tmp_path / "runs") in Path(path).parents and os.path.isdir(path)
    recipe("wandb sync outputs/runs/<time>_<pid>/wandb/offline-run-<id>")  # its path is the one printed above


def test_judging_reevaluating_and_exporting_a_run(headline_run, tmp_path):
    from tests.evaluation.test_judge import TINY as JUDGE_SIZE
    from transformers import LlamaConfig, LlamaForCausalLM
    from neftlab import models
    tokenizer = models.load_tokenizer(compose_cfg("model=llama_tiny").model)
    judge_dir = tmp_path / "judge"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 **JUDGE_SIZE)).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    judge = recipe("python -m neftlab.judge outputs/runs/<run> --baseline reference")
    proc = run([*judge[:3], str(headline_run), *judge[4:]], "--judge", str(judge_dir))
    assert "judge UNRELIABLE: failed its controls" in proc.stdout and (headline_run / "judge_reference.json").exists()
    evaluate = recipe("python -m neftlab.evaluate outputs/runs/<run> eval.max_new_tokens=512")
    proc = run([*evaluate[:3], str(headline_run), *evaluate[4:]])
    assert "eval/loss:" in proc.stdout
    export = recipe("python -m neftlab.export outputs/runs/<run> --format alpaca_eval")
    run([*export[:3], str(headline_run), *export[4:]])
    assert list((headline_run / "alpaca_eval").glob("*/model_outputs.json"))


def test_capabilities(headline_run, tmp_path):
    """The leaderboard's tasks need their data from the hub: composed. A task of one's own runs on the run."""
    openllm = compose_cfg(*recipe("python -m neftlab harness=openllm eval.harness.limit=100")[3:]).eval.harness
    assert openllm.tasks == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"] and openllm.limit == 100
    task = tmp_path / "my_task.yaml"
    task.write_text((ROOT / "tests/fixtures/harness/tiny_mc.yaml").read_text().replace(
        "tests/fixtures/harness/tiny_mc.jsonl", str(ROOT / "tests/fixtures/harness/tiny_mc.jsonl")))
    evaluate = recipe("python -m neftlab.evaluate outputs/runs/<run> 'eval.harness.tasks=[my_task.yaml]'")
    proc = run([*evaluate[:3], str(headline_run), evaluate[4].replace("my_task.yaml", str(task))])
    assert "harness/neftlab_tiny_mc/acc:" in proc.stdout


def test_a_search(tmp_path):
    run(recipe("python -m neftlab -m hparams_search=neftune hydra.sweeper.n_trials=20"),
        "size=tiny", "hydra.sweeper.n_trials=2", *tiny(tmp_path))
    report = recipe("python -m neftlab.report outputs/experiments/neftune_search_cpu")
    run([*report[:3], str(tmp_path / "experiments" / "neftune_search_tiny")])  # size=tiny keeps its own study
    assert "## Search: eval/loss" in (tmp_path / "experiments" / "neftune_search_tiny" / "report.md").read_text()
    run(recipe("python -m neftlab -m hparams_search=overfit"), "size=tiny", "hydra.sweeper.n_trials=2",
        *tiny(tmp_path))
    report = recipe("python -m neftlab.report outputs/experiments/overfit_search_cpu")
    run([*report[:3], str(tmp_path / "experiments" / "overfit_search_tiny")])
    text = (tmp_path / "experiments" / "overfit_search_tiny" / "report.md").read_text()
    assert "## Search: eval/best_loss" in text and "| best eval loss during training |" in text  # its column


def test_the_gpu_recipes_compose():
    """No GPU here: the commands' configs are composed and checked, not run."""
    paper = compose_cfg(*recipe("python -m neftlab size=paper noise=uniform noise.alpha=5")[3:])
    assert paper.trainer.args["bf16"] and paper.eval.num_generations is None
    study = compose_cfg(*recipe("python -m neftlab -m experiment=neftune_repro size=gpu")[4:])
    assert study.trainer.args["bf16"] and study.eval.max_new_tokens == 512
    torchrun = recipe("torchrun --nproc_per_node=4 -m neftlab size=paper trainer=fsdp noise=dynamic pruning=l1")
    sharded = compose_cfg(*torchrun[4:])  # composed as it is, except trainer.fsdp, which needs CUDA to check
    assert sharded.noise.kind == "dynamic" and sharded.trainer.fsdp and sharded.trainer.args["bf16"]
    # Its dry run is tests/test_gpu_check.py's; here, that the recipe reaches it with the default Python.
    make = subprocess.run([*recipe("make gpu-check"), "-n", "--no-print-directory"], cwd=ROOT, capture_output=True,
                          text=True, check=True)  # (under `make test`, a make inside make names its directory)
    assert make.stdout.split() == [".venv/bin/python", "benchmarks/gpu_check.py"]


@pytest.mark.parametrize("command, record, name", [
    ("python -m neftlab data=alpaca data.path=my_alpaca.jsonl", 0, "my_alpaca.jsonl"),
    ("python -m neftlab data=sharegpt data.path=my_chats.jsonl", 1, "my_chats.jsonl"),
    ("python -m neftlab model=bert data=classification data.path=my_labels.jsonl", 2, "my_labels.jsonl"),
])
def test_your_own_data(tmp_path, command, record, name):
    """The README's example record of each format, written 40 times with numbered texts, as the recipe's file."""
    def numbered(value, i):
        if isinstance(value, str):
            return f"{value} ({i})"
        if isinstance(value, list):
            return [numbered(v, i) for v in value]
        return {k: v if k in ("from", "label") else numbered(v, i) for k, v in value.items()}
    rows = [numbered(RECORDS[record], i) for i in range(40)]
    if record == 2:
        rows = [{**r, "label": "pos" if i % 2 else "neg"} for i, r in enumerate(rows)]
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(recipe(command), "size=tiny", *tiny(tmp_path), cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("command", [
    "python -m neftlab model.name_or_path=path/to/model_dir model.arch=llama",
    "python -m neftlab model.name_or_path=path/to/model_dir model.arch=llama model.lora.enabled=true",
])
def test_your_own_model(tmp_path, command):
    """A local Hugging Face directory: a tiny LLaMA saved with the packaged tokenizer (size=tiny would swap in its
    own random model, so the recipe runs with its small data and steps instead)."""
    from neftlab import models
    cfg = compose_cfg("model=llama_tiny")
    tokenizer = models.load_tokenizer(cfg.model)
    target = tmp_path / "path" / "to" / "model_dir"
    models.load_model(cfg.model, tokenizer, seed=0).save_pretrained(target)
    tokenizer.save_pretrained(target)
    run(recipe(command), *TINY, *tiny(tmp_path), cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_every_recipe_command_is_here():
    """Every command of the README's recipes is run (or composed) by a test of this file."""
    source = (ROOT / "tests" / "test_recipes.py").read_text()
    assert [c for c in COMMANDS if c not in ("make run", "make test") and f'"{c}"' not in source] == []
