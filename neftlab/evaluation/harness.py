"""The paper's second claim, capabilities unchanged: EleutherAI's lm-evaluation-harness as an evaluation stage.

NEFTune's authors claim that noisy embeddings make answers better and leave everything else as it was: the
OpenLLM leaderboard's tasks (ARC, HellaSwag, MMLU, TruthfulQA) unchanged, their answer to the objection that a
judge only rewards longer answers (NEFTune issue #6); Sparse-NEFT adds what pruning the embedding costs on the
same tasks. With `eval.harness.tasks` set, lm-eval (`pip install 'neftlab[harness]'`) runs them on the live model
and tokenizer after training (and on a finished run: `neftlab.evaluate`): its `HFLM` wraps both, nothing is saved
and reloaded. The model is in eval mode, so no noise is added; a pruned model is measured pruned.

Offline: the tasks' data comes from the local datasets cache, or from `eval.harness.data_dir`. Where the hub
cannot be reached nothing is downloaded, and a task whose data is absent stops the run before training, in one
line naming the task, its dataset and the command that fetches it on a connected machine.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from ..config import HarnessConfig
from ..core.errors import NeftlabError
from ..models import hub_reachable

log = logging.getLogger(__name__)


class HarnessError(NeftlabError):
    """A harness task that cannot be run here; the message names it and what to do."""


def _is_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def task_manager(cfg: HarnessConfig):
    """lm-eval's task index: its own tasks (indexing them takes seconds) only when a task is named, the folders
    of task YAML files always."""
    from lm_eval.tasks import TaskManager
    folders = sorted({str(Path(t).resolve().parent) for t in cfg.tasks if _is_file(t)})
    return TaskManager(include_path=folders or None, include_defaults=any(not _is_file(t) for t in cfg.tasks))


@contextlib.contextmanager
def offline(cfg: HarnessConfig):
    """The tasks' data from `data_dir` (a copy of a connected machine's `datasets` cache) or the default cache and,
    where the hub cannot be reached, no download attempt at all (it would retry for minutes). Offline, `datasets`
    5 reads only its own cache of a dataset loaded once, not files fetched by `hf download`."""
    import datasets.config
    import huggingface_hub.constants as hub
    saved = (datasets.config.HF_DATASETS_OFFLINE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE,
             datasets.config.HF_DATASETS_CACHE)
    if not hub_reachable():
        datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    if cfg.data_dir is not None:
        datasets.config.HF_DATASETS_CACHE = Path(cfg.data_dir).expanduser()
    try:
        yield
    finally:
        (datasets.config.HF_DATASETS_OFFLINE, datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_CACHE) = saved


def _dataset_of(spec: str, manager, error: Exception) -> tuple[str, str | None]:
    """(dataset_path, dataset_name) of a task, from its config; for a group (mmlu), the dataset that `datasets`
    could not reach, as its error names it."""
    import re

    import yaml
    entry = manager._entry(spec)
    config = entry.cfg if entry is not None and entry.cfg else {}
    if not config and _is_file(spec) and Path(spec).is_file():
        config = yaml.safe_load(Path(spec).read_text()) or {}
    if config.get("dataset_path"):
        return str(config["dataset_path"]), config.get("dataset_name")
    named = re.search(r"reach '([^']+)'", str(error))
    return (named.group(1) if named else "DATASET"), None


def _explain(spec: str, manager, error: Exception) -> str:
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    key = f"eval.harness.tasks: {spec}"
    if isinstance(error, KeyError) and "not a registered" in str(error):
        return f"{key} is neither an lm-eval task nor a task YAML file (lm-eval {_version()})"
    if not isinstance(error, ConnectionError) and "Couldn't reach" not in str(error):
        return f"{key} cannot be loaded: {type(error).__name__}: {first}"
    path, name = _dataset_of(spec, manager, error)
    return (f"{key} cannot be loaded ({type(error).__name__}: {first}): its dataset {path}"
            f"{f' ({name})' if name else ''} is not in the local datasets cache, and the hub cannot be reached from "
            f"here. On a connected machine run the task once (`python -m lm_eval --model hf --model_args "
            f"pretrained=HuggingFaceTB/SmolLM2-135M --tasks {spec} --limit 1`), copy ~/.cache/huggingface/datasets "
            "here and set eval.harness.data_dir to the copy")


def _version() -> str:
    import lm_eval
    return getattr(lm_eval, "__version__", "?")


# Resources that tasks load outside the datasets cache: {task name part: nltk resource}. IFEval's scorer tries
# to download punkt_tab when its module is imported, and without it fails only when it scores, after training.
NLTK_RESOURCES = {"ifeval": "tokenizers/punkt_tab"}


def _check_nltk(spec: str) -> None:
    for part, resource in NLTK_RESOURCES.items():
        if part in spec:
            import nltk
            try:
                nltk.data.find(resource)
            except LookupError:
                name = resource.rsplit("/", 1)[-1]
                raise HarnessError(f"eval.harness.tasks: {spec} needs nltk's {name}, which is not installed here: on "
                                   f"a connected machine run `python -m nltk.downloader {name}` and copy ~/nltk_data "
                                   "here (or set NLTK_DATA to where it is)") from None


def prepare(cfg: HarnessConfig) -> None:
    """Every task built with its data before training, so that one that cannot be had here stops the run at once
    (the data stays in the datasets cache for the stage)."""
    manager = task_manager(cfg)
    with offline(cfg):
        for spec in cfg.tasks:
            _check_nltk(spec)
            try:
                manager.load([spec])
            except Exception as e:  # noqa: BLE001 - whatever a task's loader raises, told in one line
                raise HarnessError(_explain(spec, manager, e)) from None


def run(model, tokenizer, cfg: HarnessConfig, seed: int) -> tuple[dict[str, Any], list[dict]]:
    """The tasks on the model as it is now: `harness/<task>/<metric>` (with lm-eval's `…_stderr`) and each item's
    scores, as rows for harness_samples.jsonl."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device))
    manager = task_manager(cfg)
    try:
        with offline(cfg):
            out = simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  log_samples=True, apply_chat_template=cfg.chat_template, task_manager=manager,
                                  bootstrap_iters=cfg.bootstrap, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            if "," in key and isinstance(value, (int, float)):
                metric, kept = key.split(",", 1)
                metrics[f"harness/{task}/{metric if kept == 'none' else f'{metric}_{kept}'}"] = float(value)
    rows = [{"task": task, "doc_id": s["doc_id"], "target": str(s.get("target")),
             **{m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}}
            for task, samples in out.get("samples", {}).items() for s in samples]
    return metrics, rows
