"""One judging of a run's answers: the controls, the win rates with their intervals and length control, written
to the run's judge_<baseline>.json; and AlpacaEval 2's instruction terms, refitted over several judged runs."""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from ...config import JudgeConfig
from ...core import rundir, stats
from ...core.measures import LC_TERMS, LC_WIN_RATE, RELIABLE, WIN_RATE
from ...core.files import read_json, write_json
from .answers import pairs_for
from .controls import CONTROLS, control_pairs, verdict
from .prompts import JudgeError
from .scoring import load_judge, preferences

log = logging.getLogger(__name__)


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
               RELIABLE.key: reliable, "judge/truncated": truncated, "judge/skipped": info["skipped"],
               "judge/seconds": time.perf_counter() - start}
    path = rundir.judge_file(run_dir, cfg.baseline)
    write_json(path, {
        **info, "judge": cfg.model, "kind": cfg.kind, "template": cfg.template, "max_length": cfg.max_length,
        "bootstrap": cfg.bootstrap, "seed": seed, "length_unit": "characters", "summary": summary,
        "controls": {name: {**c, "what": f"{CONTROLS[name][0]} against {CONTROLS[name][1]}",
                            "needs": CONTROLS[name][3]} for name, c in controls.items()},
        "reliable": reliable, "unreliable_because": failed,
        "pairs": [{"prompt_id": p.prompt_id, "preference": float(pref), "run_chars": int(c[0]),
                   "baseline_chars": int(c[1]), **{k: v[i] for k, v in detail.items()}}
                  for i, (p, pref, c) in enumerate(zip(pairs, prefs, chars))]}, root=run_dir)
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
        data = read_json(path, root=path.parent)
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
            data["summary"] = {**{k: v for k, v in data["summary"].items() if not k.startswith(LC_WIN_RATE.key)},
                               **lc.fields(LC_WIN_RATE.key), LC_TERMS.key: True}
            data["instruction_difficulty_from"] = len(members)
            for p in pairs:
                p["instruction_difficulty"] = difficulty[p["prompt_id"]]
            write_json(path, data, root=path.parent)
            changed.append(path)
    return changed


def describe(s: dict) -> str:
    """One line: the win rates with their intervals' method and n, and whether the judge passed its controls."""
    def rate(key):
        ci = f" [{s[key + '_ci_low']:.3f}, {s[key + '_ci_high']:.3f}]" if key + "_ci_low" in s else ""
        return f"{s[key]:.3f}{ci}"
    controls = ", ".join(f"{name} {s[f'judge/control_{name}']:.2f}" for name in CONTROLS
                         if isinstance(s.get(f"judge/control_{name}"), float))
    trust = "passed its controls" if s.get(RELIABLE.key) else "UNRELIABLE: failed its controls, no conclusion"
    return (f"win rate {rate(WIN_RATE.key)}, length-controlled {rate(LC_WIN_RATE.key)} "
            f"({s[WIN_RATE.key + '_ci_method']}); judge {trust} ({controls})")
