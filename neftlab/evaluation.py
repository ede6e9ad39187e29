"""What a run measures besides the loss: accuracy, generations and their diversity, efficiency, stability."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import EvalConfig
from .sharding import all_sum, local_rows


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
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequence: list[int], n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response."""
    grams = [tuple(sequence[i:i + n]) for i in range(len(sequence) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def generate(model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig) -> tuple[list[dict], dict]:
    """Greedy answers to held-out prompts, their length and diversity, and the decoding latency per token."""
    model.eval()
    samples, outputs, seconds = [], [], 0.0
    for messages, reference in tqdm(prompts, desc="Generating"):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             repetition_penalty=cfg.repetition_penalty, pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - start
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        outputs.append(new)
        samples.append({"prompt": messages, "reference": reference,
                        "generation": tokenizer.decode(new, skip_special_tokens=True)})
    tokens = sum(len(o) for o in outputs)
    metrics = {
        "eval/response_length": statistics.fmean(len(o) for o in outputs),
        "eval/distinct_2": distinct_n(outputs, 2),
        "eval/distinct_4": distinct_n(outputs, 4),
        "eval/repetition_rate": statistics.fmean(repetition_rate(o) for o in outputs),
        "efficiency/latency_ms_per_token": 1000 * seconds / max(tokens, 1),
    }
    return samples, metrics


@torch.no_grad()
def classification_latency(model, dataloader) -> dict:
    """Milliseconds per classified sample over the held-out split, batched as in evaluation."""
    model.eval()
    device = next(model.parameters()).device
    n, seconds = 0, 0.0
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        start = time.perf_counter()
        model(**batch)
        seconds += time.perf_counter() - start
        n += batch["input_ids"].shape[0]
    return {"efficiency/latency_ms_per_sample": 1000 * seconds / max(n, 1)}


def parameter_counts(model: torch.nn.Module) -> dict:
    """Total and non-zero parameters, counting a tied (shared) tensor once; sharded ones summed over ranks."""
    seen, total, nonzero, sharded, group = set(), 0, 0, 0, None
    for p in model.parameters():
        local, p_group = local_rows(p)
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        total += p.numel()
        if p_group is None:
            nonzero += int(torch.count_nonzero(local))
        else:
            sharded += int(torch.count_nonzero(local))
            group = p_group
    nonzero += int(all_sum([sharded], group)[0])
    return {"efficiency/total_params": total, "efficiency/nonzero_params": nonzero,
            "efficiency/param_reduction": 1 - nonzero / total}


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"efficiency/peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"efficiency/peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def stability(train_losses: list[tuple[int, float]], window: int) -> dict:
    """Std of the last `window` logged train losses, and the first step where the loss has made half its total drop."""
    if len(train_losses) < 2:
        return {}
    losses = [loss for _, loss in train_losses]
    out = {"stability/loss_std": statistics.stdev(losses[-window:])}
    first, last = losses[0], losses[-1]
    if last < first:
        half = first - (first - last) / 2
        out["stability/half_drop_step"] = next(step for step, loss in train_losses if loss <= half)
    return out
