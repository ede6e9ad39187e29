"""What a run measures besides the loss: accuracy, the answers' length and diversity, efficiency, and how the
training loss converged."""

from __future__ import annotations

import math
import resource
import statistics
import time

import numpy as np
import torch

from ..core import measures as declared
from ..core.dist import synchronize
from ..core.errors import NeftlabError, first_line


def argmax_logits(logits, labels):
    """Keep only the predicted ids, so evaluation never holds a whole split's logits in memory."""
    return (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)


def next_token_accuracy(pred) -> dict:
    """Share of response tokens (labels != -100) whose next token is predicted right."""
    preds, labels = pred.predictions[:, :-1], pred.label_ids[:, 1:]
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else float("nan")}


def classification_metrics(pred) -> dict:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    preds, labels = np.asarray(logits).argmax(-1), np.asarray(pred.label_ids)
    f1s = []
    for c in np.union1d(preds, labels):
        tp = np.sum((preds == c) & (labels == c))
        denom = np.sum(preds == c) + np.sum(labels == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float((preds == labels).mean()), "macro_f1": float(np.mean(f1s))}


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams of all answers together: how varied the answers are as a set."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rep_n(answer: list[int], n: int) -> float:
    """Share of an answer's n-grams that repeat an earlier n-gram of the same answer (it must have one)."""
    grams = [tuple(answer[i:i + n]) for i in range(len(answer) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def answer_measures(answers: list[list[int]], texts: list[str], stops: list[str]) -> dict:
    """The NEFTune paper's measures of a set of answers (token ids, decoded texts, stop reasons).

    The paper gives one rep-n and one diversity = (1 - rep-2)(1 - rep-3)(1 - rep-4) per answer set. Here both
    are computed per answer and averaged over the answers, as the code of Kirchenbauer et al. (2023), whose
    measure the paper uses, scores each generation on its own; SimCTG, where the measure comes from, pools the n-gram
    counts of all answers instead, which weighs long answers more. Each answer counting once matters when the
    method under test changes answer lengths. Unlike that code, n-grams are of token ids, not whitespace words
    (word length is reported apart), and answers under 4 tokens, with no 4-gram, are left out of rep-n and
    diversity (NaN if none is long enough): there they are undefined.
    """
    nan, long = float("nan"), [a for a in answers if len(a) >= 4]
    reps = {n: [rep_n(a, n) for a in long] for n in declared.REP}
    return {
        declared.RESPONSE_LENGTH.key: statistics.fmean(len(a) for a in answers),
        declared.RESPONSE_WORDS.key: statistics.fmean(len(t.split()) for t in texts),
        **{declared.REP[n].key: statistics.fmean(r) if r else nan for n, r in reps.items()},
        declared.DIVERSITY.key: statistics.fmean(math.prod(1 - r for r in rs) for rs in zip(*reps.values()))
        if long else nan,
        declared.DISTINCT_2.key: distinct_n(answers, 2),
        declared.DISTINCT_4.key: distinct_n(answers, 4),
        declared.HIT_MAX.key: statistics.fmean(s == "max_new_tokens" for s in stops),
    }


def of_stage(measures: list[declared.Measure], stage: str, *inputs) -> dict:
    """The user's measures of `stage` (`eval.measures`) over its inputs: the answer rows of one generation
    (answers), or the model, its tokenizer and the held-out split (held-out). A function that fails, or returns
    no number, stops the evaluation in one line naming the measure (the trained model is checkpointed)."""
    out = {}
    for m in measures:
        if m.stage != stage:
            continue
        try:
            value = m.compute(*inputs)
        except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises, told in one line
            raise NeftlabError(f"eval.measures: {m.key} failed: {first_line(e)}") from e
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise NeftlabError(f"eval.measures: {m.key} returned {value!r}, not a number")
        out[m.key] = float(value)
    return out


@torch.no_grad()
def held_out_measures(measures: list[declared.Measure], model, tokenizer, held_out) -> dict:
    """The user's measures of the model on the held-out split, in eval mode (no noise is added there)."""
    if not any(m.stage == "held-out" for m in measures):
        return {}
    was_training = model.training
    model.eval()
    try:
        return of_stage(measures, "held-out", model, tokenizer, held_out)
    finally:
        model.train(was_training)


@torch.no_grad()
def classification_latency(model, dataloader) -> dict:
    """Milliseconds per classified sample over the held-out split, batched as in evaluation; on CUDA the timer is
    read only once the queued work is done (a forward returns before the GPU has run it)."""
    model.eval()
    device = next(model.parameters()).device
    n, seconds = 0, 0.0
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        synchronize(device)
        start = time.perf_counter()
        model(**batch)
        synchronize(device)
        seconds += time.perf_counter() - start
        n += batch["input_ids"].shape[0]
    return {declared.LATENCY_SAMPLE.key: 1000 * seconds / max(n, 1)}


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM, since ru_maxrss carries the parent's peak
    across fork and exec (a sweep job or a test's subprocess would report its launcher's)."""
    try:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
    return {declared.PEAK_MEMORY.key: peak / 2**20}


def convergence(train_losses: list[tuple[int, float]], window: int) -> dict:
    """How the training loss converged: the std of its last `window` logged values, and the first step where it had
    made half its total drop. (`noise/stability` is another thing: the dynamic noise's embedding statistic.)"""
    if len(train_losses) < 2:
        return {}
    losses = [loss for _, loss in train_losses]
    out = {declared.LOSS_STD.key: statistics.stdev(losses[-window:])}
    first, last = losses[0], losses[-1]
    if last < first:
        half = first - (first - last) / 2
        out[declared.HALF_DROP.key] = next(step for step, loss in train_losses if loss <= half)
    return out
