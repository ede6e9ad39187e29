"""Greedy answers to the evaluation prompts, in batches, with their measures; and the decoding latency.

The prompts are the held-out split's or `eval.prompts`'s, chat-formatted and cut from the left to the context the
answer leaves. Answers are greedy with the KV cache, in left-padded batches of prompts of similar length, with the
NEFTune authors' repetition penalty (sparing the padding and the end tokens); under torchrun each rank answers its
share and all get every answer back.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TrainerCallback

from ..config import EvalConfig
from ..core import measures as declared
from ..core.dist import all_gather, all_max, synchronize
from ..core.rank import world
from ..data import read_prompts
from .measures import answer_measures, of_stage

LATENCY_PROMPTS, LATENCY_TOKENS = 2, 64  # the fixed work that efficiency/latency_ms_per_token times


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
def generate(model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig, step: int,
             between_batches: Callable[[], None] = lambda: None, user: tuple = ()) -> tuple[list[dict], dict]:
    """Greedy answers to `prompts` in batches of `eval.batch_size`, as samples.jsonl rows, and their measures
    (neftlab's and the `user`'s of the answers stage, `eval.measures`).

    Under torchrun rank r answers prompts r, r + world, …, and every rank gets all answers back in prompt
    order, so every rank returns the same. A model sharded by FSDP2 needs all ranks in every forward pass:
    there every rank runs as many batches, and `generate` keeps every rank stepping until all are done
    (`synced_gpus`). Under torchrun every rank runs as many batches, and `between_batches` (a stop agreed over the
    ranks) is called before each of them; it is called once more when every batch is done.
    """
    was_training = model.training
    model.eval()
    ids, truncated = encode_prompts(tokenizer, prompts, _room(model, cfg.max_new_tokens))
    rank, ranks = world()
    synced = ranks > 1 and _sharded(model)
    batches = _batches(list(range(rank, len(ids), ranks)), [len(p) for p in ids], cfg.batch_size)
    if ranks > 1:  # as many batches on every rank, so that a stop is agreed at each (and synced decoding steps
        # together): an empty batch runs prompt 0 and keeps nothing when sharded, and nothing at all otherwise
        batches += [[]] * (int(all_max([len(batches)], distributed=True)[0]) - len(batches))
    eos, answers = _stop_ids(model, tokenizer), {}
    most = sum(max(len(b), 1) for b in batches) * cfg.max_new_tokens  # a batch decodes until its longest answer ends
    with tqdm(total=most, desc=f"Generating {len(prompts)} answers", unit="tok", disable=rank != 0) as bar:
        for batch in batches:
            if ranks > 1:  # every rank at the same batch: a collective is safe here
                between_batches()
            if not batch and not synced:
                continue
            new = _continue(model, tokenizer, [ids[i] for i in batch or [0]], cfg.max_new_tokens,
                            cfg.repetition_penalty, synced, streamer=_Progress(bar, max(len(batch), 1)))
            answers.update((i, _answer(tokens, eos)) for i, tokens in zip(batch, new))
        bar.total = bar.n  # batches that ended early: the bar ends full
        bar.refresh()
    between_batches()
    if ranks > 1:
        answers = {i: a for part in all_gather(answers, dist.group.WORLD) for i, a in part.items()}
    model.train(was_training)
    samples = []
    for i, (messages, reference) in enumerate(prompts):
        tokens, stop = answers[i]
        samples.append({"prompt_id": i, "step": step, "prompt": messages, "reference": reference,
                        "generation": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
                        "stop": stop})
    metrics = answer_measures([answers[i][0] for i in range(len(prompts))], [s["generation"] for s in samples],
                              [s["stop"] for s in samples])
    return samples, {**metrics, **of_stage(list(user), "answers", samples),
                     declared.PROMPTS_TRUNCATED.key: truncated}


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
    synchronize(device)
    start = time.perf_counter()
    for prompt in ids:
        decode(prompt, n)
    synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return {declared.LATENCY_TOKEN.key: 1000 * seconds / (n * len(ids))}


class GenerateOnEvaluate(TrainerCallback):
    """With `eval.generate_every_eval`: answers the prompts at every evaluation during training, appending to
    samples.jsonl and metrics.jsonl, and marking them finished once their measures are logged; the last step's
    answers are the final evaluation's (`pipeline.evaluate`)."""

    def __init__(self, model, tokenizer, prompts: list[tuple[list[dict], str]], cfg: EvalConfig, files,
                 user: tuple = ()):
        self.model, self.tokenizer, self.prompts, self.cfg, self.files = model, tokenizer, prompts, cfg, files
        self.user = user

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            samples, metrics = generate(self.model, self.tokenizer, self.prompts, self.cfg, state.global_step,
                                        user=self.user)
            self.files.append_samples(samples)
            self.files.log(state.global_step, metrics)
            self.files.finish_answers()
