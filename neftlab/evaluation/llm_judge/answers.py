"""What is judged: a run's final answers, paired with the baseline's (the dataset's references, or another run's
answers to the same prompts)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ...core import rundir
from ...core.measures import RESPONSE_LENGTH
from ...core.files import read_jsonl
from .prompts import JudgeError

log = logging.getLogger(__name__)


@dataclass
class Pair:
    prompt_id: int
    instruction: str  # the prompt's messages as one text
    run: str
    baseline: str


@dataclass
class Answers:
    """One generation of a run's answers: its step, its stage (train, final, reeval-<id>) and rows by prompt id."""
    step: int
    stage: str
    rows: dict[int, dict]


def final_answers(run_dir: Path) -> Answers:
    """The run's last finished generation: the newest whose stage wrote its marker that it finished
    (`rundir.marked_generations`), so that the answers of an evaluation stopped or killed after writing them (a
    re-evaluation killed during its latency or harness stage) are passed over, and said; with none finished, the
    judge refuses, naming the unfinished one. Answers written before markers existed are read as neftlab read them
    then: finished when their measures were logged after them, else the last ones."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.SAMPLES
    if not path.is_file():
        raise JudgeError(f"{path}: no such file (a causal run writes its answers there when it generates)")
    found = rundir.generations(path, root=run_dir)
    if not found:
        raise JudgeError(f"{path} holds no answers (a causal run writes its answers there when it generates)")
    marked = rundir.marked_generations(run_dir)
    logged = {(e["step"], e.get("stage", rundir.TRAIN)) for e in read_jsonl(run_dir / rundir.METRICS, root=run_dir)
              if RESPONSE_LENGTH.key in e}
    finished = [key for key in found if marked.get(key, key in logged)]
    last = list(found)[-1]
    if not finished and last not in marked:  # answers without markers or measures: as neftlab read them before
        finished = [last]
    if not finished:
        raise JudgeError(f"{path}: the answers of step {last[0]} (stage {last[1]}) are incomplete: their stage never "
                         "finished (it was stopped or killed after writing them), and no earlier answers did; run "
                         "that evaluation again (python -m neftlab.evaluate RUN) to judge its answers")
    step, stage = finished[-1]
    if (step, stage) != last:
        log.warning("%s: the answers of step %d (stage %s) are incomplete: their stage never finished (it was stopped "
                    "or killed after writing them); judging the last finished ones, of step %d (stage %s)", path,
                    last[0], last[1], step, stage)
    rows = {i: r for i, r in found[step, stage].items()
            if isinstance(r.get("generation"), str) and isinstance(r.get("prompt"), list)}
    if not rows:
        raise JudgeError(f"{path} holds no answers (rows with prompt_id, step, prompt and generation)")
    return Answers(step, stage, rows)


def instruction_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages)


def pairs_for(run_dir: Path, baseline: str) -> tuple[list[Pair], dict]:
    """The run's answers paired with the baseline's, and what the judge file records about them."""
    answers = final_answers(run_dir)
    ours = answers.rows
    info = {"run": str(Path(run_dir).resolve()), "step": answers.step, "stage": answers.stage}
    if baseline == "reference":
        pairs = [Pair(i, instruction_text(r["prompt"]), r["generation"], str(r.get("reference") or ""))
                 for i, r in sorted(ours.items())]
        kept = [p for p in pairs if p.baseline.strip()]
        if len(kept) < len(pairs):
            log.warning("%d of %d prompts have no reference answer: skipped", len(pairs) - len(kept), len(pairs))
        info.update(baseline="reference", skipped=len(pairs) - len(kept))
        pairs = kept
    else:
        base = final_answers(Path(baseline))
        theirs = base.rows
        only = sorted(set(ours) ^ set(theirs))
        differ = [i for i in sorted(set(ours) & set(theirs)) if ours[i]["prompt"] != theirs[i]["prompt"]]
        if only or differ:
            raise JudgeError(
                f"{run_dir} and {baseline} did not answer the same prompts: {len(only)} prompt ids in one run "
                f"only, {len(differ)} with other messages (first: prompt_id {(only or differ)[0]})")
        pairs = [Pair(i, instruction_text(ours[i]["prompt"]), ours[i]["generation"], theirs[i]["generation"])
                 for i in sorted(ours)]
        info.update(baseline=str(Path(baseline).resolve()), baseline_step=base.step, baseline_stage=base.stage, skipped=0)
    if not pairs:
        raise JudgeError(f"{run_dir}: no answers to judge against {baseline}")
    return pairs, info
