"""The judge's controls: pairs whose better answer is known, built from the same prompts, which a judge must get
right before its win rates count."""

from __future__ import annotations

import re

from .answers import Pair


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


def verdict(controls: dict) -> tuple[bool, list[str]]:
    """(reliable, why not): a judge is reliable when it passes every control that could be built, and one could."""
    failed = [f"{CONTROLS[name][0]} against {CONTROLS[name][1]}: {c['value']:.3f}, needs {CONTROLS[name][3]}"
              for name, c in controls.items() if c["passed"] is False]
    if not any(c["passed"] is not None for c in controls.values()):
        failed.append("no control could be built (no non-empty reference)")
    return not failed, failed
