"""Two measures of a user's, plugged into neftlab from outside it (see README.md).

`complete_sentences` is computed from a run's answers: the share of answers that end a sentence (., !, ? or a
closing quote after one), not cut mid-sentence at eval.max_new_tokens or trailing off. `entropy` is computed from
the model and the held-out split: the model's mean next-token entropy over the response tokens of the first
`examples` held-out examples, a calibration figure that noisy embeddings could move.
"""

from __future__ import annotations

import torch

from neftlab.core.measures import declare

ENDINGS = (".", "!", "?", '."', '!"', '?"')


@declare("eval/complete_sentences", "answers ending a sentence", "maximize", "{:.2f}", stage="answers")
def complete_sentences(answers: list[dict]) -> float:
    """The share of answers whose text ends a sentence. `answers` are one generation's rows of samples.jsonl."""
    return sum(a["generation"].rstrip().endswith(ENDINGS) for a in answers) / max(len(answers), 1)


@declare("eval/entropy", "next-token entropy (nats)", None, "{:.3f}", stage="held-out")
def entropy(model, tokenizer, held_out, examples: int = 8) -> float:
    """The mean entropy of the model's next-token distribution where the next token is a response token (its label
    is not -100), over the first `examples` rows of the tokenized held-out split."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in held_out.select(range(min(examples, len(held_out)))):
        ids = torch.tensor([row["input_ids"]], device=device)
        log_p = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        predicts_response = torch.tensor(row["labels"][1:], device=device) != -100
        total += float(-(log_p.exp() * log_p).sum(-1)[predicts_response].sum())
        count += int(predicts_response.sum())
    return total / max(count, 1)
