"""How a local judge scores a pair: a causal LM's next-token probabilities of the two labels (both orders), or a
reward model's scores; and the judge model, loaded once."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ...config import JudgeConfig
from ...models import PLAIN_CHAT_TEMPLATE, ModelLoadError, resolve
from .answers import Pair
from .prompts import TEMPLATES, JudgeError, token_budget, fit_texts, chat_messages


def _batches(tokenizer, ids: list[list[int]], batch_size: int, padding_side: str, desc: str):
    """(indices, padded batch) in batches of similar length, longest first (an out-of-memory shows at once)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    tokenizer.padding_side = padding_side
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        chunk = order[start:start + batch_size]
        yield chunk, tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def first_label_probs(model, tokenizer, texts: list[str], batch_size: int, labels: tuple[str, str]) -> np.ndarray:
    """p(first label) / (p(first label) + p(second label)) for the token after each prompt text, in batches with
    left padding."""
    label_ids = [tokenizer.encode(label, add_special_tokens=False)[-1] for label in labels]
    if label_ids[0] == label_ids[1]:
        raise JudgeError(f"the judge's tokenizer cannot tell the labels {labels} apart")
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]  # the chat template brings its own BOS
    accepts = inspect.signature(model.forward).parameters
    out = np.empty(len(texts))
    for chunk, batch in _batches(tokenizer, ids, batch_size, "left", "Judging"):
        mask = batch["attention_mask"].to(_device(model))
        kwargs = {"input_ids": batch["input_ids"].to(mask.device), "attention_mask": mask}
        if "position_ids" in accepts:  # positions from the first real token, as generate() counts them
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "logits_to_keep" in accepts:  # the last position only: a full vocabulary per token would not fit
            kwargs["logits_to_keep"] = 1
        logits = model(**kwargs).logits[:, -1, label_ids].float()
        out[chunk] = torch.softmax(logits, -1)[:, 0].cpu().numpy()
    return out


def pairwise_preferences(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 8,
                         template: str = "neftlab") -> tuple[np.ndarray, int]:
    """p(the run's answer is better) for each pair, with the run's answer first and second (columns), and how
    many pairs were cut to fit."""
    def render(instruction, first, second):
        return tokenizer.apply_chat_template(chat_messages(template, instruction, first, second), tokenize=False,
                                             add_generation_prompt=True)
    budget = token_budget(len(tokenizer.encode(render("", "", ""), add_special_tokens=False)), max_length)
    texts, truncated = [], 0
    for p in pairs:
        (instruction, run, base), cut = fit_texts(tokenizer, [(p.instruction, "left"), (p.run, "right"),
                                                         (p.baseline, "right")], budget)
        truncated += cut
        texts += [render(instruction, run, base), render(instruction, base, run)]
    first = first_label_probs(model, tokenizer, texts, batch_size, TEMPLATES[template][1]).reshape(-1, 2)
    return np.stack([first[:, 0], 1 - first[:, 1]], 1), truncated


@torch.no_grad()
def reward_scores(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 8
                  ) -> tuple[np.ndarray, int]:
    """The reward model's score of the run's and of the baseline's answer (columns), and how many pairs were cut
    to fit. A tokenizer with a chat template gets the conversation; one without (cross-encoder reward
    models such as DeBERTa's) gets the instruction and the answer as a text pair."""
    chat = bool(tokenizer.chat_template)

    def encode(instruction, answer):
        if not chat:
            return tokenizer(instruction, answer)["input_ids"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    budget = token_budget(len(encode("", "")), max_length)
    ids, truncated = [], 0
    for p in pairs:
        fitted = [fit_texts(tokenizer, [(p.instruction, "left"), (answer, "right")], budget)
                  for answer in (p.run, p.baseline)]
        truncated += any(cut for _, cut in fitted)
        ids += [encode(*texts) for texts, _ in fitted]
    out = np.empty(len(ids))
    for chunk, batch in _batches(tokenizer, ids, batch_size, "right", "Scoring"):
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        out[chunk] = model(**batch).logits[:, 0].float().cpu().numpy()
    return out.reshape(-1, 2), truncated


def preferences(model, tokenizer, pairs: list[Pair], cfg: JudgeConfig, batch_size: int
                ) -> tuple[np.ndarray, dict, int]:
    """p(the run's answer is better) per pair, what the judge file keeps of how it was read (both orders, or both
    scores), and how many pairs were cut to fit."""
    if cfg.kind == "pairwise":
        orders, truncated = pairwise_preferences(model, tokenizer, pairs, cfg.max_length, batch_size, cfg.template)
        return orders.mean(1), {"orders": orders.tolist()}, truncated
    scores, truncated = reward_scores(model, tokenizer, pairs, cfg.max_length, batch_size)
    return _sigmoid(scores[:, 0] - scores[:, 1]), {"scores": scores.tolist()}, truncated


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


# name: (what is judged, against what, the pass rule). Each control's value is the preference for the first text.


@functools.lru_cache(maxsize=1)  # a sweep's runs are judged by one model, loaded once
def load_judge(name: str, kind: str):
    """The judge's model and tokenizer, on CUDA (bfloat16) when there is one; ModelLoadError when it cannot be had."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = resolve(name, "llama", key="the judge")
        tokenizer = AutoTokenizer.from_pretrained(path)
        auto = AutoModelForCausalLM if kind == "pairwise" else AutoModelForSequenceClassification
        model = auto.from_pretrained(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except Exception as e:  # whatever the loaders raise (no config, wrong architecture, corrupt weights)
        raise ModelLoadError(f"judge {name} cannot be loaded as a {kind} judge: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if kind == "reward" and model.config.num_labels != 1:
        raise ModelLoadError(f"judge {name} has {model.config.num_labels} outputs; a reward model has one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "pairwise" and not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return model.to(device).eval(), tokenizer
