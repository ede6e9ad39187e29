"""The judge's controls: pairs whose better answer is known, built from the same prompts, which a judge must get
right before its win rates count."""

from __future__ import annotations

import functools
import re

import numpy as np

from ...config import JudgeConfig
from .answers import Pair
from .scoring import load_judge, preferences


CONTROLS = {
    "empty": ("the reference", "an empty answer", lambda v: v >= 0.9, ">= 0.90"),
    "first_sentence": ("the reference", "its own first sentence", lambda v: v >= 0.75, ">= 0.75"),
    "other_prompt": ("the reference", "the reference of another prompt", lambda v: v >= 0.9, ">= 0.90"),
    "self": ("an answer shown first", "the same answer shown second", lambda v: abs(v - 0.5) <= 0.1,
             "within 0.5 ± 0.10"),
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


def control_pairs(texts: list[tuple[int, str, str]]) -> dict[str, list[Pair]]:
    """The controls' pairs from (prompt id, instruction, reference) triples: the reference is the first text of
    each pair, the degraded answer the second."""
    texts = [t for t in texts if t[2].strip()]
    first = [(i, q, r, SENTENCE_END.split(r.strip(), 1)[0]) for i, q, r in texts]
    others = texts[1:] + texts[:1]
    return {
        "empty": [Pair(i, q, r, "") for i, q, r in texts],
        "first_sentence": [Pair(i, q, r, cut) for i, q, r, cut in first if cut.strip() and cut.strip() != r.strip()],
        "other_prompt": [Pair(i, q, r, o[2]) for (i, q, r), o in zip(texts, others) if o[2].strip() != r.strip()],
        "self": [Pair(i, q, r, r) for i, q, r in texts],
    }


@functools.lru_cache(maxsize=16)  # a sweep judged against its baseline arm shares each seed's references
def judge_controls(model_name: str, kind: str, template: str, max_length: int, texts: tuple, batch_size: int
                   ) -> dict:
    """Each control's value (the mean preference for its first text), n and verdict, for these references."""
    cfg = JudgeConfig(model=model_name, kind=kind, template=template, max_length=max_length)
    model, tokenizer = load_judge(model_name, kind)
    out = {}
    for name, pairs in control_pairs(list(texts)).items():
        if not pairs:
            out[name] = {"value": None, "n": 0, "passed": None}
            continue
        prefs, detail, _ = preferences(model, tokenizer, pairs, cfg, batch_size)
        # self: the preference for the copy shown first (the averaged one is 0.5 by construction)
        value = float(np.mean(np.asarray(detail["orders"])[:, 0]) if name == "self" and kind == "pairwise"
                      else np.mean(prefs))
        out[name] = {"value": value, "n": len(pairs), "passed": bool(CONTROLS[name][2](value))}
    return out


def verdict(controls: dict) -> tuple[bool, list[str]]:
    """(reliable, why not): a judge is reliable when it passes every control that could be built, and one could."""
    failed = [f"{CONTROLS[name][0]} against {CONTROLS[name][1]}: {c['value']:.3f}, needs {CONTROLS[name][3]}"
              for name, c in controls.items() if c["passed"] is False]
    if not any(c["passed"] is not None for c in controls.values()):
        failed.append("no control could be built (no non-empty reference)")
    return not failed, failed
