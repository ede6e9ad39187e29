"""The judge's prompts: neftlab's own, and AlpacaEval 2's, verbatim; and the answers fitted into the judge's context."""

from __future__ import annotations

from ...core.errors import NeftlabError


NEFTLAB_PROMPT = (
    "Below are an instruction and two answers to it. Judge which answer follows the instruction better: more "
    "helpful, correct and complete.\n\n## Instruction\n{instruction}\n\n## Answer 1\n{output_1}\n\n## Answer 2\n"
    "{output_2}\n\nWhich answer is better? Answer 1 or 2."
)
# AlpacaEval 2's judge prompt, verbatim: alpaca_eval (Apache-2.0) evaluators_configs/alpaca_eval_clf_gpt4_turbo/
# alpaca_eval_clf.txt, used by weighted_alpaca_eval_gpt4_turbo, which scores p("m") / (p("m") + p("M")) from the
# judge's first token; "m" names output_1.
ALPACA_EVAL_PROMPT = """<|im_start|>system
You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on the quality of their responses to a given instruction. This process will be used to create a leaderboard reflecting the most accurate and human-preferred answers.
<|im_end|>
<|im_start|>user
I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{
    "instruction": \"\"\"{instruction}\"\"\",
}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{
    {
        "model_identifier": "m",
        "output": \"\"\"{output_1}\"\"\"
    },
    {
        "model_identifier": "M",
        "output": \"\"\"{output_2}\"\"\"
    }
}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier
<|im_end|>"""
# template name: (prompt with {instruction} {output_1} {output_2}, the labels naming output_1 and output_2)
TEMPLATES = {"neftlab": ("<|im_start|>user\n" + NEFTLAB_PROMPT + "\n<|im_end|>", ("1", "2")),
             "alpaca_eval": (ALPACA_EVAL_PROMPT, ("m", "M"))}
MARGIN = 8  # tokens kept free: cut texts can tokenize a little longer inside the prompt than alone


class JudgeError(NeftlabError, ValueError):
    """Answers that cannot be judged as asked; the message names the file or the prompts."""


def fit_texts(tokenizer, texts: list[tuple[str, str]], budget: int) -> tuple[list[str], bool]:
    """The texts cut to `budget` tokens together, each from its side ("left" keeps the end, "right" the start).
    The longest are cut first, to equal shares, so a short answer never loses tokens to make room for a long one."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text, _ in texts]
    if sum(map(len, ids)) <= budget:
        return [text for text, _ in texts], False
    caps, left = {}, budget
    for k, i in enumerate(sorted(range(len(ids)), key=lambda i: len(ids[i]))):
        caps[i] = min(len(ids[i]), left // (len(ids) - k))
        left -= caps[i]
    cut = [ids[i][:caps[i]] if side == "right" else ids[i][len(ids[i]) - caps[i]:]
           for i, (_, side) in enumerate(texts)]
    return [tokenizer.decode(c) for c in cut], True


def token_budget(frame: int, max_length: int) -> int:
    """Tokens left for the texts once the judge's own prompt (`frame` tokens) is in."""
    if max_length - frame - MARGIN < 16:
        raise JudgeError(f"max_length={max_length} leaves no room for the answers: the judge's prompt alone "
                         f"takes {frame} tokens")
    return max_length - frame - MARGIN


def chat_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict]:
    """The judge's conversation: the template's placeholders filled in order (as alpaca_eval's `make_prompts`
    does, so braces in an answer stay), then its ChatML turns as messages (as `prompt_to_chatml` does)."""
    text = TEMPLATES[template][0]
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        text = text.replace("{" + key + "}", value, 1)
    turns = text.strip().split("<|im_start|>")[1:]
    return [{"role": turn.split("\n", 1)[0].strip(), "content": turn.split("\n", 1)[1].split("<|im_end|>", 1)[0].strip()}
            for turn in turns]
