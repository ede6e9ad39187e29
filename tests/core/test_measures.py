"""Every measure declared once: the registry's rules, a user's declaration, and that no measure's key is spelled
in more than two modules of neftlab (its declaration and the code that computes it)."""

import re
from types import SimpleNamespace
from pathlib import Path

import pytest

from neftlab.core import measures
from neftlab.core.measures import Measure, declare, register

ROOT = Path(__file__).resolve().parents[2] / "neftlab"


def test_a_key_is_spelled_in_at_most_two_modules():
    """The measure's declaration and what computes it; everything else reads the declaration. neftlab's noise kinds
    declare theirs in their own modules (imported here)."""
    from neftlab.methods import noise
    assert {"noise/alpha", "noise/stability", "noise/noisytune_tensors"} <= {
        m.key for kind in noise.builtin() for m in kind.logs}
    sources = {p: p.read_text() for p in ROOT.rglob("*.py")}
    over = {}
    for m in measures.declared():
        spelled = sorted(str(p.relative_to(ROOT)) for p, text in sources.items()
                         if re.search(rf"[\"']{re.escape(m.key)}[\"']", text))
        if len(spelled) > 2:
            over[m.key] = spelled
    assert over == {}
    assert len(measures.declared()) >= 40  # the check above read the whole registry


def test_register_takes_a_declaration_once_and_refuses_another_under_its_key():
    mine = Measure("eval/mine", "mine", "maximize", "{:.2f}")
    register(mine)
    register(Measure("eval/mine", "mine", "maximize", "{:.2f}"))  # the same declaration again: fine
    assert measures.get("eval/mine") is mine and measures.declared()[-1] is mine
    with pytest.raises(ValueError, match="measure eval/mine is declared twice, differently"):
        register(Measure("eval/mine", "mine", "minimize", "{:.2f}"))
    assert measures.directions()["eval/mine"] == "maximize"


def test_a_declaration_checks_its_direction_stage_and_key():
    with pytest.raises(ValueError, match="measure eval/x: direction='up'; allowed: minimize, maximize, null"):
        Measure("eval/x", "x", "up")
    with pytest.raises(ValueError, match="measure eval/x: stage='later'; allowed: train, held-out"):
        Measure("eval/x", "x", stage="later")
    with pytest.raises(ValueError, match="measure 'x': a key is <namespace>/<name>, e.g. eval/x"):
        Measure("x", "x")


def test_a_measure_formats_its_values():
    assert measures.EVAL_LOSS.format(1.234567) == "1.2346"
    assert measures.HIT_MAX.format(0.25) == "25%"
    assert measures.RELIABLE.format(True) == "True" and measures.EVAL_LOSS.format(None) == ""


def test_declare_makes_a_users_function_a_measure_with_its_parameters_bound():
    @declare("eval/longest", "longest answer (chars)", "maximize", "{:.0f}")
    def longest(answers, cap=1000):
        return min(max(len(a["generation"]) for a in answers), cap)

    built = longest(cap=3)
    assert built == Measure("eval/longest", "longest answer (chars)", "maximize", "{:.0f}", "answers", paired=True)
    assert built.compute([{"generation": "abcdef"}]) == 3 and longest().compute([{"generation": "abcdef"}]) == 6
    with pytest.raises(ValueError, match="a user's measure is computed from: answers, held-out"):
        declare("eval/y", "y", stage="judge")


def test_a_declaration_survives_summary_json_without_its_function():
    @declare("eval/n", "answers", None, "{:.0f}", stage="answers")
    def n(answers):
        return len(answers)

    data = n().to_json()
    assert data == {"key": "eval/n", "label": "answers", "direction": None, "fmt": "{:.0f}", "stage": "answers",
                    "column": True, "paired": True, "curve": False, "headline": False, "absent": None}
    again = Measure.from_json(data)
    assert again == n() and again.compute is None


def test_judge_measures_have_a_key_against_another_runs_answers():
    assert measures.vs_baseline(measures.WIN_RATE.key) == "judge_vs_baseline/win_rate"


def test_the_closing_line_names_the_headline_measures_the_run_has():
    from neftlab.__main__ import closing
    summary = {"eval/loss": 1.23456, "eval/response_length": 96.04, "eval/hit_max_new_tokens": 0.25,
               "judge/win_rate": 0.6125, "judge/reliable": False, "eval/diversity": 0.9}
    text = closing(SimpleNamespace(run_dir="outputs/runs/x", summary=summary, status="completed", message=""))
    assert text.splitlines()[:2] == [
        "neftlab: completed: outputs/runs/x",
        "  eval loss 1.2346, answer length (tokens) 96.0, answers cut at eval.max_new_tokens 25%, judge win rate 0.613 "
        "(the judge failed its controls: no evidence)"]
