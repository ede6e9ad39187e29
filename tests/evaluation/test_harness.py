"""lm-evaluation-harness as an evaluation stage, without the hub: two tiny local tasks (tests/fixtures/harness/, a
multiple-choice and a generate-until one) on a tiny model, against lm-eval's own command line on the same saved
model; a task without its data stops the run before training, in one line."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY, compose_cfg, run, sweep

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'neftlab[harness]')")

from neftlab import evaluate, models  # noqa: E402
from neftlab.analysis.comparison import write_report  # noqa: E402
from neftlab.config import ConfigError, HarnessConfig  # noqa: E402
from neftlab.evaluation import harness  # noqa: E402

MC, GEN = "tests/fixtures/harness/tiny_mc.yaml", "tests/fixtures/harness/tiny_gen.yaml"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random LLaMA whose answers differ by prompt, in memory and saved as a Hugging Face directory."""
    cfg = compose_cfg("model=llama_tiny", "+model.arch_config.initializer_range=1.0").model
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_model(cfg, tokenizer, seed=3).eval()
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


@pytest.mark.slow
def test_the_stage_agrees_with_lm_evals_own_command_line(saved_model, tmp_path, monkeypatch):
    model, tokenizer, folder = saved_model
    monkeypatch.chdir(ROOT)  # the tasks' data files are relative to the repository
    ours, rows = harness.run(model, tokenizer, HarnessConfig(tasks=[MC, GEN], batch_size=1), seed=0)
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={folder},dtype=float32", "--tasks", f"{MC},{GEN}", "--batch_size", "1",
                           "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("out/**/results_*.json")
    theirs = json.loads(results.read_text())["results"]
    assert ours["harness/neftlab_tiny_mc/acc"] == pytest.approx(theirs["neftlab_tiny_mc"]["acc,none"])
    assert ours["harness/neftlab_tiny_mc/acc_stderr"] == pytest.approx(theirs["neftlab_tiny_mc"]["acc_stderr,none"])
    assert ours["harness/neftlab_tiny_gen/exact_match"] == pytest.approx(theirs["neftlab_tiny_gen"]["exact_match,none"])
    (items,) = tmp_path.glob("out/**/samples_neftlab_tiny_mc_*.jsonl")
    theirs_items = {r["doc_id"]: r["acc"] for r in map(json.loads, items.read_text().splitlines())}
    assert {r["doc_id"]: r["acc"] for r in rows if r["task"] == "neftlab_tiny_mc"} == theirs_items
    assert 0 < ours["harness/neftlab_tiny_mc/acc"] < 1  # a model that gets some right and some wrong


def test_a_run_measures_the_tasks_during_and_after_training_and_again_on_reevaluation(tmp_path):
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", f"eval.harness.tasks=[{MC},{GEN}]",
                           "eval.harness.limit=4", "eval.harness.every_eval=true", "trainer.eval_steps=1",
                           "eval.num_generations=0", out_dir=tmp_path)  # no answers: the harness is the subject
    assert outcome.status == "completed", outcome.message
    assert {"harness/neftlab_tiny_mc/acc", "harness/neftlab_tiny_mc/acc_stderr",
            "harness/neftlab_tiny_gen/exact_match"} <= summary.keys()
    rows = [json.loads(line) for line in (tmp_path / "harness_samples.jsonl").read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows if r["task"] == "neftlab_tiny_mc") == [0, 0, 1, 1, 2, 2, 3, 3]  # limit=4
    assert {(r["step"], r["stage"]) for r in rows} == {(1, "train"), (2, "final")}  # step 2 once: the final one
    assert all("acc" in r for r in rows if r["task"] == "neftlab_tiny_mc")

    assert evaluate.main([str(tmp_path), f"eval.harness.tasks=[{MC}]", "eval.harness.limit=2"]) == 0
    again = [json.loads(line) for line in (tmp_path / "harness_samples.jsonl").read_text().splitlines()][len(rows):]
    assert [r["doc_id"] for r in again] == [0, 1] and again[0]["stage"].startswith("reeval-")
    final = {r["doc_id"]: r["acc"] for r in rows if r["stage"] == "final" and r["task"] == "neftlab_tiny_mc"}
    assert {r["doc_id"]: r["acc"] for r in again} == {d: final[d] for d in (0, 1)}  # the same weights, the same scores


@pytest.mark.slow
def test_a_tiny_study_reports_the_harness_paired_with_intervals(tmp_path):
    # One step and no answers: the paired rows are what the report makes of any study (after 4 steps, too, this
    # tiny random model's accuracy has not moved).
    jobs = sweep("size=tiny", "logger=none", f"eval.harness.tasks=[{MC}]", "trainer.max_steps=1",
                 "eval.num_generations=0", grid={"noise": ["none", "uniform"], "pruning": ["off", "l1"], "seed": [1, 2]},
                 out_dir=tmp_path)
    assert all(summary["status"] == "completed" for _, summary in jobs)
    text = write_report(tmp_path).read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if "| harness " in line]
    over_seeds = [r for r in rows if r[1] == "harness neftlab_tiny_mc acc"]
    over_items = [r for r in rows if r[1] == "harness neftlab_tiny_mc acc, over items"]
    assert len(over_seeds) == len(over_items) == 3  # NEFTune, pruning and Sparse-NEFT, each against plain fine-tuning
    assert all(r[2] == "2" and r[6].startswith("[") and r[7] == "t" for r in over_seeds)  # 2 seed pairs, a t interval
    assert all(r[2] == "8" and r[6].startswith("[") and r[7] == "BCa bootstrap" for r in over_items)  # the 8 items


def test_a_task_without_its_data_stops_before_training_in_one_line(tmp_path):
    task = tmp_path / "absent.yaml"
    task.write_text("task: neftlab_absent\ndataset_path: neftlab-tests/not-in-any-cache\ndataset_name: main\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
                    "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", f"eval.harness.tasks=[{task}]",
                           out_dir=tmp_path / "run")
    assert outcome.exit_code == 1 and "\n" not in outcome.message
    line = outcome.message
    assert f"eval.harness.tasks: {task} cannot be loaded" in line
    assert "its dataset neftlab-tests/not-in-any-cache (main) is not in the local datasets cache" in line
    assert f"--tasks {task} --limit 1`), copy ~/.cache/huggingface/datasets here and set eval.harness.data_dir" in line
    assert "train/loss" not in summary  # stopped before training


def cached_hub_dataset(cache, repo: str, config: str, rows: list[dict]) -> None:
    """`rows` laid out as `datasets` caches hub dataset `repo` (config `config`) loaded once on a connected machine:
    what an offline machine can be given."""
    import datasets
    cache.mkdir(parents=True)
    source = cache / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.load_dataset_builder("json", data_files={"test": str(source)}, cache_dir=str(cache / "tmp")
                                  ).download_and_prepare()
    (built,) = (p for p in (cache / "tmp" / "json").glob("*/*/*") if p.is_dir())
    owner, name = repo.split("/")
    target = cache / f"{owner}___{name}" / config / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    built.rename(target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(target / arrow.name.replace("json-", f"{name}-", 1))
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": config, "dataset_name": name}))


def test_a_hub_task_runs_offline_from_a_copied_datasets_cache(saved_model, tmp_path, monkeypatch):
    model, tokenizer, _ = saved_model
    monkeypatch.chdir(ROOT)
    rows = [json.loads(line) for line in (ROOT / MC).with_suffix(".jsonl").read_text().splitlines()]
    cached_hub_dataset(tmp_path / "copied", "neftlab-tests/toymc", "main", rows)
    task = tmp_path / "hub_task.yaml"
    task.write_text((ROOT / MC).read_text().replace("task: neftlab_tiny_mc", "task: neftlab_hub_mc").replace(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tests/fixtures/harness/tiny_mc.jsonl\n",
        "dataset_path: neftlab-tests/toymc\ndataset_name: main\n"))
    with pytest.raises(harness.HarnessError, match="not in the local datasets cache"):
        harness.prepare(HarnessConfig(tasks=[str(task)]))  # the default cache does not have it
    cfg = HarnessConfig(tasks=[str(task)], data_dir=str(tmp_path / "copied"))
    harness.prepare(cfg)
    ours, _ = harness.run(model, tokenizer, cfg, seed=0)
    local, _ = harness.run(model, tokenizer, HarnessConfig(tasks=[str(ROOT / MC)]), seed=0)
    assert ours["harness/neftlab_hub_mc/acc"] == local["harness/neftlab_tiny_mc/acc"]  # the same items


def test_a_local_task_whose_file_is_missing_names_the_loaders_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # tiny_mc.yaml's data file is relative to the repository: not found from here
    with pytest.raises(harness.HarnessError) as e:
        harness.prepare(HarnessConfig(tasks=[str(ROOT / MC)]))
    assert str(e.value).startswith(f"eval.harness.tasks: {ROOT / MC} cannot be loaded: ")
    assert "datasets cache" not in str(e.value)  # not the hub's data: no advice about fetching it


@pytest.fixture(scope="module")
def lm_eval_index():
    """lm-eval's index of its own tasks (seconds to build), built once for the tests that name them."""
    return harness.task_manager(HarnessConfig(tasks=["arc_challenge"]))


@pytest.fixture
def indexed(lm_eval_index, monkeypatch):
    """harness.task_manager for tasks named by lm-eval's names: the index it would build, already built."""
    monkeypatch.setattr(harness, "task_manager", lambda cfg: lm_eval_index)


@pytest.mark.slow
def test_an_unknown_task_name_is_named(tmp_path, monkeypatch, indexed):
    monkeypatch.chdir(ROOT)
    with pytest.raises(harness.HarnessError, match="no_such_task_here is neither an lm-eval task nor a task YAML"):
        harness.prepare(HarnessConfig(tasks=["no_such_task_here"]))


def test_without_lm_eval_a_harness_key_says_how_to_install_it(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs lm-evaluation-harness, which is not installed: pip install "
                                          r"'neftlab\[harness\]'"):
        compose_cfg(f"eval.harness.tasks=[{MC}]")


@pytest.mark.slow
def test_the_gpu_studies_measure_the_openllm_tasks_that_lm_eval_knows(lm_eval_index):
    openllm = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]
    for study in ("baselines", "pruning_ratio", "neftune_repro"):
        assert compose_cfg(f"experiment={study}", "size=gpu").eval.harness.tasks == openllm
        assert compose_cfg(f"experiment={study}").eval.harness.tasks == []  # the CPU size: no harness
    assert set(openllm) <= set(lm_eval_index.all_tasks)


@pytest.mark.slow
def test_a_task_that_needs_nltk_data_names_it_before_its_scorer_tries_to_download_it(monkeypatch, indexed):
    import nltk

    def absent(resource, *args):
        raise LookupError(resource)
    monkeypatch.setattr(nltk.data, "find", absent)
    with pytest.raises(harness.HarnessError, match=r"eval.harness.tasks: ifeval needs nltk's punkt_tab, which is not "
                                                   r"installed here: on a connected machine run `python -m "
                                                   r"nltk.downloader punkt_tab`"):
        harness.prepare(HarnessConfig(tasks=["ifeval"]))
