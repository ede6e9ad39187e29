"""What a run measures besides the loss: accuracy, generations and their diversity, efficiency, stability."""

from __future__ import annotations

import math
import resource
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TrainerCallback

from .config import EvalConfig
from .data import read_prompts
from .sharding import all_gather, all_max, all_sum, local_rows, world

LATENCY_PROMPTS, LATENCY_TOKENS = 2, 64  # the fixed work that efficiency/latency_ms_per_token times


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


def measures(answers: list[list[int]], texts: list[str], stops: list[str]) -> dict:
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
    reps = {n: [rep_n(a, n) for a in long] for n in (2, 3, 4)}
    return {
        "eval/response_length": statistics.fmean(len(a) for a in answers),
        "eval/response_words": statistics.fmean(len(t.split()) for t in texts),
        **{f"eval/rep_{n}": statistics.fmean(r) if r else nan for n, r in reps.items()},
        "eval/diversity": statistics.fmean(math.prod(1 - r for r in rs) for rs in zip(*reps.values())) if long else nan,
        "eval/distinct_2": distinct_n(answers, 2),
        "eval/distinct_4": distinct_n(answers, 4),
        "eval/hit_max_new_tokens": statistics.fmean(s == "max_new_tokens" for s in stops),
    }


def select_prompts(cfg: EvalConfig, held_out: list[tuple[list[dict], str]]) -> list[tuple[list[dict], str]]:
    """The prompts to answer: those of `eval.prompts` or the held-out split's, the first `eval.num_generations`."""
    return (read_prompts(cfg.prompts) if cfg.prompts else held_out)[: cfg.num_generations]


def encode_prompts(tokenizer, prompts: list[tuple[list[dict], str]], room: int | None) -> tuple[list[list[int]], int]:
    """Chat-formatted prompt ids, each cut from the left to at most `room` tokens, and how many were cut: the
    end of a prompt (the last question and the assistant marker) is what the answer follows."""
    ids = [tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"] for messages, _ in prompts]
    if room is None:
        return ids, 0
    return [p[-room:] for p in ids], sum(len(p) > room for p in ids)


def _room(model, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit the model's context beside `max_new_tokens` (None: the model names no context)."""
    context = getattr(model.config, "max_position_embeddings", None)
    return None if context is None else context - max_new_tokens


def _sharded(model) -> bool:
    """FSDP2 spreads the weights over the ranks: every forward pass is then a collective of all ranks."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """The repetition penalty over each row's prompt and answer, less its left padding and the end tokens.

    Padding: the pad token is often the end token, and penalising it in padded rows only would make a prompt's
    answer depend on the batch it is in. End tokens: chat templates close every turn of the prompt with the end
    token (SmolLM2's <|im_end|>), and penalising it keeps the model from stopping: the packaged SmolLM2 ran all
    8 default prompts to 256 tokens with it, and stopped in 5 of 8 (154 tokens on average) without. In the
    NEFTune paper's Alpaca prompts the end token never occurs, so its penalty never touched it either.
    """

    def __init__(self, penalty: float, padding: torch.Tensor, stop_ids: set[int]):
        super().__init__(penalty, prompt_ignore_length=padding)
        self.stop_ids = sorted(stop_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        spared = scores[:, self.stop_ids].clone()
        scores = super().__call__(input_ids, scores)
        scores[:, self.stop_ids] = spared
        return scores


class _Progress:
    """A `generate` streamer that moves a progress bar by one token per row at every decoding step (the first
    call is the prompt), so that long generations show their progress and tokens/s, not "0/2" for minutes."""

    def __init__(self, bar, rows: int):
        self.bar, self.rows, self.prompt_seen = bar, rows, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(self.rows)
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _continue(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, repetition_penalty: float,
              synced: bool, **kwargs) -> list[list[int]]:
    """Greedy new tokens for a batch of prompt ids, left-padded so that every row's answer starts at the same
    position, with the KV cache on (the Trainer sets `config.use_cache` to False for training)."""
    device = next(model.parameters()).device
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt").to(device)
    penalty = RepetitionPenalty(repetition_penalty, (batch["attention_mask"] == 0).sum(1), _stop_ids(model, tokenizer))
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         repetition_penalty=1.0, logits_processor=LogitsProcessorList([penalty]),  # not twice
                         pad_token_id=tokenizer.pad_token_id, synced_gpus=synced, **kwargs)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def _batches(mine: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """Prompt indices by length, in batches of at most `size` that are at most half padding: a batch's prefill
    costs rows x its longest prompt, and one long prompt must not make many short ones pay for its length."""
    batches, batch = [], []
    for i in sorted(mine, key=lambda i: lengths[i]):
        if batch and (len(batch) == size or (len(batch) + 1) * lengths[i] > 2 * sum(lengths[j] for j in [*batch, i])):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def _stop_ids(model, tokenizer) -> set[int]:
    """The ids `generate` stops at: the generation config's end tokens, else the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = tokenizer.eos_token_id if ids is None else ids
    return set(ids) if isinstance(ids, list) else {ids}


def _answer(new: list[int], eos: set[int]) -> tuple[list[int], str]:
    """(the answer's tokens, without the end token and the padding after it; why it stopped)."""
    end = next((i for i, t in enumerate(new) if t in eos), None)
    return (new, "max_new_tokens") if end is None else (new[:end], "eos")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig,
             step: int) -> tuple[list[dict], dict]:
    """Greedy answers to `prompts` in batches of `eval.batch_size`, as samples.jsonl rows, and their measures.

    Under torchrun rank r answers prompts r, r + world, …, and every rank gets all answers back in prompt
    order, so every rank returns the same. A model sharded by FSDP2 needs all ranks in every forward pass:
    there every rank runs as many batches, and `generate` keeps every rank stepping until all are done
    (`synced_gpus`).
    """
    was_training = model.training
    model.eval()
    ids, truncated = encode_prompts(tokenizer, prompts, _room(model, cfg.max_new_tokens))
    rank, ranks = world()
    synced = ranks > 1 and _sharded(model)
    batches = _batches(list(range(rank, len(ids), ranks)), [len(p) for p in ids], cfg.batch_size)
    if synced:  # as many batches on every rank; an empty one runs prompt 0 and keeps nothing
        batches += [[]] * (int(all_max([len(batches)], distributed=True)[0]) - len(batches))
    eos, answers = _stop_ids(model, tokenizer), {}
    most = sum(max(len(b), 1) for b in batches) * cfg.max_new_tokens  # a batch decodes until its longest answer ends
    with tqdm(total=most, desc=f"Generating {len(prompts)} answers", unit="tok", disable=rank != 0) as bar:
        for batch in batches:
            new = _continue(model, tokenizer, [ids[i] for i in batch or [0]], cfg.max_new_tokens,
                            cfg.repetition_penalty, synced, streamer=_Progress(bar, max(len(batch), 1)))
            answers.update((i, _answer(tokens, eos)) for i, tokens in zip(batch, new))
        bar.total = bar.n  # batches that ended early: the bar ends full
        bar.refresh()
    if ranks > 1:
        answers = {i: a for part in all_gather(answers, dist.group.WORLD) for i, a in part.items()}
    model.train(was_training)
    samples = []
    for i, (messages, reference) in enumerate(prompts):
        tokens, stop = answers[i]
        samples.append({"prompt_id": i, "step": step, "prompt": messages, "reference": reference,
                        "generation": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
                        "stop": stop})
    metrics = measures([answers[i][0] for i in range(len(prompts))], [s["generation"] for s in samples],
                       [s["stop"] for s in samples])
    return samples, {**metrics, "eval/prompts_truncated": truncated}


@torch.no_grad()
def decoding_latency(model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig) -> dict:
    """Milliseconds per new token at batch size 1: what one user waits, timed apart from the batched answers.

    The first LATENCY_PROMPTS prompts, one at a time, each decoded for exactly min(eval.max_new_tokens,
    LATENCY_TOKENS) tokens (the end token suppressed), so that runs and arms time the same work, after an
    untimed warm-up; on CUDA the timer is read only once the queued work is done.
    """
    if not prompts:
        return {}
    was_training = model.training
    model.eval()
    n = min(cfg.max_new_tokens, LATENCY_TOKENS)
    ids, _ = encode_prompts(tokenizer, prompts[:LATENCY_PROMPTS], _room(model, n))
    synced = world()[1] > 1 and _sharded(model)
    device = next(model.parameters()).device

    def decode(prompt: list[int], tokens: int) -> None:
        _continue(model, tokenizer, [prompt], tokens, cfg.repetition_penalty, synced, min_new_tokens=tokens)
    decode(ids[0], 2)
    _sync(device)
    start = time.perf_counter()
    for prompt in ids:
        decode(prompt, n)
    _sync(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return {"efficiency/latency_ms_per_token": 1000 * seconds / (n * len(ids))}


class GenerateOnEvaluate(TrainerCallback):
    """With `eval.generate_every_eval`: answers the prompts at every evaluation during training, appending to
    samples.jsonl and metrics.jsonl; the last step's answers are the final evaluation's (`pipeline.evaluate`)."""

    def __init__(self, model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig, files):
        self.model, self.tokenizer, self.prompts, self.cfg, self.files = model, tokenizer, prompts, cfg, files

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            samples, metrics = generate(self.model, self.tokenizer, self.prompts, self.cfg, state.global_step)
            self.files.append_samples(samples)
            self.files.log(state.global_step, metrics)


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
        local, p_group = local_rows(p, copy_ok=True)  # an end-of-run count must not fail on any layout
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


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux's VmHWM, since ru_maxrss carries the parent's peak
    across fork and exec (a sweep job or a test's subprocess would report its launcher's)."""
    try:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"efficiency/peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"efficiency/peak_memory_mb": peak_rss() / 2**20}


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


class NoiseOffTrainLoss(TrainerCallback):
    """At every evaluation, the loss on a fixed seeded subset of the training set (as many examples as are held
    out), computed in eval mode, where the noise hooks add nothing. NEFTune's authors point out that its effect on
    the training loss shows only with the noise off; the gap to the held-out loss is the generalisation gap."""

    def __init__(self, train_dataset, size: int, seed: int, log_event):
        self.subset = train_dataset.shuffle(seed=seed).select(range(min(size, len(train_dataset))))
        self.log_event = log_event
        self.trainer = None  # the Trainer this callback is part of, set once it exists

    def _loop(self, loader):
        """The Trainer's evaluation loop over `loader`, with a progress bar of its own: the Trainer's progress
        callback closes the held-out split's bar only after this callback, and would count these batches into it."""
        from transformers.trainer_callback import ProgressCallback
        handler = self.trainer.callback_handler
        bars = [c for c in handler.callbacks if isinstance(c, ProgressCallback)]
        for bar in bars:
            if bar.prediction_bar is not None:
                bar.prediction_bar.close()
                bar.prediction_bar = None
        outer, handler.eval_dataloader = handler.eval_dataloader, loader
        try:
            return self.trainer.evaluation_loop(loader, "Noise-off train loss", prediction_loss_only=True,
                                                metric_key_prefix="noise_off")
        finally:
            handler.eval_dataloader = outer
            for bar in bars:
                if bar.prediction_bar is not None:
                    bar.prediction_bar.close()
                    bar.prediction_bar = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.trainer is None or "eval_loss" not in (metrics or {}):
            return
        out = self._loop(self.trainer.get_eval_dataloader(self.subset))
        loss = out.metrics["noise_off_loss"]
        self.log_event(state.global_step, {"eval/train_loss_noise_off": loss,
                                           "eval/generalization_gap": metrics["eval_loss"] - loss})
