"""The local judge: both orders averaged, batching that changes nothing, its controls, AlpacaEval's prompt, the
statistics, baselines, clear errors."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from neftlab import judge as judge_cli
from neftlab.config import JudgeConfig
from neftlab.core import rundir, stats
from neftlab.core.files import read_jsonl
from neftlab.evaluation.llm_judge import answers, controls, judging, prompts
from neftlab.evaluation.llm_judge.prompts import fit_texts
from neftlab.evaluation.llm_judge.scoring import pairwise_preferences
from tests.helpers import ROOT, run

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048)


def prompt(i):
    return [{"role": "user", "content": f"Question {i}: name a fruit and say why you like it."}]


def write_samples(run_dir, answers, step=8, references=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": i, "step": step, "prompt": prompt(i), "reference": (references or {}).get(i, f"Pears {i}."),
             "generation": a, "tokens": len(a.split()), "stop": "eos"} for i, a in enumerate(answers)]
    with open(run_dir / "samples.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return run_dir


ANSWERS_A = ["Apples, for their crunch.", "A banana: sweet, soft and easy to carry along on a long walk.",
             "Figs.", "Cherries, because they are small and red and taste of summer evenings."]
ANSWERS_B = ["Oranges.", "Grapes are the best: you can eat them one by one.", "Kiwis, for the green inside.", "Plums."]


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory, llama_tokenizer):
    """A random 1-layer LLaMA causal LM and a one-output LLaMA scorer, saved with the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("judges")
    config = LlamaConfig(vocab_size=len(llama_tokenizer), pad_token_id=llama_tokenizer.pad_token_id, **TINY)
    torch.manual_seed(0)
    causal = _save(LlamaForCausalLM(config), llama_tokenizer, root / "causal")
    torch.manual_seed(1)
    reward = _save(LlamaForSequenceClassification(LlamaConfig(**config.to_dict(), num_labels=1)), llama_tokenizer,
                   root / "reward")
    return SimpleNamespace(causal=causal, reward=reward)


def shown(text, template="neftlab"):
    """The two answers a judge prompt shows, in order."""
    if template == "neftlab":
        return text.split("## Answer 1\n")[1].split("\n\n## Answer 2\n")[0], \
            text.split("## Answer 2\n")[1].split("\n\nWhich answer")[0]
    outputs = text.split('"output": """')[1:]
    return outputs[0].split('"""')[0], outputs[1].split('"""')[0]


class FakeJudge(torch.nn.Module):
    """Says the first label when `rule(first answer, second answer)` holds, else the second; by default when the
    answer shown first contains `word` (or always, with word=None)."""

    def __init__(self, tokenizer, word=None, rule=None, template="neftlab"):
        super().__init__()
        self.tokenizer, self.template = tokenizer, template
        self.rule = rule or (lambda first, second: word is None or word in first)
        self.ids = [tokenizer.encode(label, add_special_tokens=False)[-1] for label in prompts.TEMPLATES[template][1]]
        self.lengths = []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, position_ids=None, logits_to_keep=0):
        logits = torch.zeros(len(input_ids), 1, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            self.lengths.append(int(mask.sum()))
            first, second = shown(self.tokenizer.decode(ids[mask.bool()]), self.template)
            logits[row, 0, self.ids[0 if self.rule(first, second) else 1]] = 5.0
        return SimpleNamespace(logits=logits)


def test_both_orders_are_asked_and_averaged(llama_tokenizer):
    pairs = [answers.Pair(i, f"q{i}", a, b) for i, (a, b) in enumerate(zip(ANSWERS_A, ANSWERS_B))]
    biased, _ = pairwise_preferences(FakeJudge(llama_tokenizer), llama_tokenizer, pairs, 2048, batch_size=3)
    assert biased[:, 0] == pytest.approx(1, abs=1e-2) and biased[:, 1] == pytest.approx(0, abs=1e-2)
    assert biased.mean(1) == pytest.approx(0.5)  # a judge that only ever says "1" prefers neither answer
    fruit = FakeJudge(llama_tokenizer, word="Apples")
    prefs, _ = pairwise_preferences(fruit, llama_tokenizer, pairs, 2048)
    assert prefs[0] == pytest.approx([1, 1], abs=1e-2)  # the run's "Apples" wins in both places
    assert prefs[1:] == pytest.approx(np.array([[0, 1]] * 3), abs=1e-2)  # else "2": the run wins when shown second


def test_answers_are_cut_from_the_right_to_fit(llama_tokenizer):
    long = " ".join(["word"] * 3000)
    pairs = [answers.Pair(0, "q", long, "Short answer."), answers.Pair(1, "q", "a", "b")]
    fake = FakeJudge(llama_tokenizer)
    _, truncated = pairwise_preferences(fake, llama_tokenizer, pairs, 256)
    assert truncated == 1 and max(fake.lengths) <= 256
    texts, cut = fit_texts(llama_tokenizer, [("start middle end", "left"), (long, "right"), ("b", "right")], 12)
    assert cut and texts[0] == "start middle end" and texts[2] == "b" and texts[1].startswith("word word")
    with pytest.raises(prompts.JudgeError, match="leaves no room for the answers"):
        pairwise_preferences(fake, llama_tokenizer, pairs, 64)


def test_pairwise_judge_against_another_run_is_symmetric_and_batch_invariant(tmp_path, tiny_judges):
    a, b = write_samples(tmp_path / "a", ANSWERS_A), write_samples(tmp_path / "b", ANSWERS_B)
    cfg = JudgeConfig(model=tiny_judges.causal, baseline=str(b), bootstrap=200)
    summary = judging.judge_run(a, cfg, seed=0, batch_size=3)
    saved = json.loads((a / "judge_b.json").read_text())
    assert saved["summary"] == summary and summary["judge/n_pairs"] == 4 and saved["length_unit"] == "characters"
    assert saved["baseline"] == str(b.resolve()) and saved["step"] == 8 and saved["kind"] == "pairwise"
    prefs = np.array([p["preference"] for p in saved["pairs"]])
    assert prefs == pytest.approx(np.mean([p["orders"] for p in saved["pairs"]], 1))
    assert [p["run_chars"] - p["baseline_chars"] for p in saved["pairs"]] == [
        len(x) - len(y) for x, y in zip(ANSWERS_A, ANSWERS_B)]
    swapped = judging.judge_run(b, JudgeConfig(model=tiny_judges.causal, baseline=str(a), bootstrap=200), 0, 1)
    back = np.array([p["preference"] for p in json.loads((b / "judge_a.json").read_text())["pairs"]])
    assert back == pytest.approx(1 - prefs, abs=1e-5)  # same prompts, one at a time: left padding changes nothing
    assert swapped["judge/win_rate"] == pytest.approx(1 - summary["judge/win_rate"], abs=1e-5)


def test_reward_judge_scores_each_answer(tmp_path, tiny_judges):
    run = write_samples(tmp_path / "run", ANSWERS_A)
    cfg = JudgeConfig(model=tiny_judges.reward, kind="reward", baseline="reference", bootstrap=200)
    summary = judging.judge_run(run, cfg, seed=0, batch_size=3)
    pairs = json.loads((run / "judge_reference.json").read_text())["pairs"]
    for p in pairs:
        assert p["preference"] == pytest.approx(1 / (1 + np.exp(p["scores"][1] - p["scores"][0])))
    judging.judge_run(run, cfg, seed=0, batch_size=1)
    again = json.loads((run / "judge_reference.json").read_text())["pairs"]
    assert np.array([p["scores"] for p in again]) == pytest.approx(np.array([p["scores"] for p in pairs]), abs=1e-5)
    assert summary["judge/n_pairs"] == 4


def test_reference_baseline_uses_the_last_step_and_skips_empty_references(tmp_path, caplog):
    run = write_samples(tmp_path / "run", ["old answer"] * 4, step=4)
    write_samples(run, ANSWERS_A, step=8, references={1: "  "})
    pairs, info = answers.pairs_for(run, "reference")
    assert [p.prompt_id for p in pairs] == [0, 2, 3] and info["skipped"] == 1 and info["step"] == 8
    assert pairs[0].run == ANSWERS_A[0] and pairs[0].baseline == "Pears 0."
    assert "1 of 4 prompts have no reference answer: skipped" in caplog.text


def evaluation(run_dir, stage, texts, step=8, finished=True, measured=True):
    """One evaluation of a run as neftlab writes it: its answers, their measures and, when its stage finished, the
    marker that it did."""
    files = rundir.RunFiles(run_dir, keep=lambda row: True, stage=stage)
    files.append_samples([{"prompt_id": i, "step": step, "prompt": prompt(i), "reference": f"Pears {i}.",
                           "generation": t, "tokens": len(t.split()), "stop": "eos"} for i, t in enumerate(texts)])
    if measured:
        files.log(step, {"eval/response_length": 4.0})
    if finished:
        files.finish_answers()
    files.close()
    return run_dir


def test_a_re_evaluation_killed_after_its_answers_and_measures_is_passed_over_and_named(tmp_path, caplog):
    """`neftlab.evaluate RUN eval.max_new_tokens=2` killed -9 after it logged its answers' measures (during its
    latency or harness stage): its stage never finished, so the judge reads the final answers and says why."""
    run_dir = evaluation(tmp_path / "run", "final", ANSWERS_A)
    evaluation(run_dir, "reeval-1", ["Ap", "A", "Fi", "Ch"], finished=False)
    found = answers.final_answers(run_dir)
    assert (found.step, found.stage) == (8, "final") and [r["generation"] for r in found.rows.values()] == ANSWERS_A
    assert ("the answers of step 8 (stage reeval-1) are incomplete: their stage never finished (it was stopped or "
            "killed after writing them); judging the last finished ones, of step 8 (stage final)") in caplog.text


def test_a_finished_re_evaluation_is_judged(tmp_path, caplog):
    run_dir = evaluation(tmp_path / "run", "final", ANSWERS_A)
    evaluation(run_dir, "reeval-1", ANSWERS_B)
    found = answers.final_answers(run_dir)
    assert (found.step, found.stage) == (8, "reeval-1") and found.rows[0]["generation"] == ANSWERS_B[0]
    assert caplog.text == ""


def test_answers_whose_stage_never_finished_are_refused_with_their_stage(tmp_path):
    run_dir = evaluation(tmp_path / "run", "final", ANSWERS_A, finished=False)
    with pytest.raises(prompts.JudgeError, match=re.escape(
            "samples.jsonl: the answers of step 8 (stage final) are incomplete: their stage never finished (it was "
            "stopped or killed after writing them), and no earlier answers did; run that evaluation again")):
        answers.final_answers(run_dir)


def without_markers(run_dir):
    """The run's metrics.jsonl as neftlab wrote it before answers had markers."""
    events = [e for e in read_jsonl(run_dir / rundir.METRICS) if rundir.FINISHED not in e]
    (run_dir / rundir.METRICS).write_text("".join(json.dumps(e) + "\n" for e in events))


def test_answers_written_before_markers_are_read_as_then(tmp_path, caplog):
    """A run of neftlab before the markers: its answers count as finished where their measures were logged after
    them; a later re-evaluation of it by today's neftlab that was killed is passed over all the same."""
    run_dir = evaluation(tmp_path / "run", "final", ANSWERS_A)
    without_markers(run_dir)
    evaluation(run_dir, "reeval-1", ["cut"], finished=False, measured=False)
    assert answers.final_answers(run_dir).stage == "final"
    assert "the answers of step 8 (stage reeval-1) are incomplete" in caplog.text
    evaluation(run_dir, "reeval-2", ANSWERS_B, finished=False)
    without_markers(run_dir)  # all of it as neftlab wrote it then
    assert answers.final_answers(run_dir).stage == "reeval-2"  # its measures were logged after it
    unmeasured = write_samples(tmp_path / "bare", ANSWERS_B)  # answers alone, no measures, no markers: the last
    assert answers.final_answers(unmeasured).rows[3]["generation"] == ANSWERS_B[3]


def test_win_rate_and_lc_intervals_are_bca_over_the_prompts_and_seeded():
    rng = np.random.default_rng(3)
    prefs, run, base = rng.uniform(0, 1, 50), rng.integers(100, 900, 50), rng.integers(100, 900, 50)
    s = stats.preference_summary(prefs, run, base, resamples=500, seed=1)
    assert s["judge/win_rate"] == pytest.approx(prefs.mean())
    assert s["judge/win_rate_ci_low"] < s["judge/win_rate"] < s["judge/win_rate_ci_high"]
    assert s["judge/lc_win_rate_ci_low"] < s["judge/lc_win_rate"] < s["judge/lc_win_rate_ci_high"]
    assert s["judge/win_rate_ci_method"] == s["judge/lc_win_rate_ci_method"] == "95% BCa bootstrap interval, n = 50"
    assert s["judge/lc_win_rate"] == pytest.approx(stats.length_controlled(prefs, run, base).value)
    assert stats.preference_summary(prefs, run, base, 500, seed=1) == s
    assert stats.preference_summary(prefs, run, base, 500, seed=2)["judge/win_rate_ci_low"] != s["judge/win_rate_ci_low"]
    assert stats.preference_summary(np.array([0.0, 0.5, 1.0, 1.0]), np.ones(4), np.ones(4), 100, 0)[
        "judge/decisive_win_rate"] == 0.625


def longer(first, second):
    return len(first) > len(second)


REFERENCES = {0: "Apples are crisp. They keep for months.", 1: "Bananas. Soft and sweet, and easy to carry.",
              2: "Figs are best fresh. Dried ones are good too.", 3: "Cherries! Small, red, and they taste of summer."}


def use_judge(monkeypatch, model, tokenizer):
    """`model` as the judge wherever the judge is loaded (the controls and the judging)."""
    monkeypatch.setattr(judging, "load_judge", lambda name, kind: (model, tokenizer))


def test_controls_measure_the_judge_on_degraded_references(llama_tokenizer, monkeypatch):
    """A judge that prefers the longer answer passes the empty and first-sentence controls, cannot tell the
    reference from another prompt's, and (deciding ties for the second answer) shows its position bias."""
    use_judge(monkeypatch, FakeJudge(llama_tokenizer, rule=longer), llama_tokenizer)
    judging.judge_controls.cache_clear()
    texts = tuple((i, f"q{i}", r) for i, r in REFERENCES.items())
    found = judging.judge_controls("fake", "pairwise", "neftlab", 2048, texts, 3)
    assert found["empty"] == {"value": pytest.approx(1, abs=0.01), "n": 4, "passed": True}
    assert found["first_sentence"]["value"] == pytest.approx(1, abs=0.01) and found["first_sentence"]["n"] == 4
    assert found["other_prompt"]["n"] == 4 and found["other_prompt"]["passed"] is False
    assert found["self"]["value"] == pytest.approx(0, abs=0.01) and found["self"]["passed"] is False
    reliable, why = controls.verdict(found)
    assert not reliable and any("the reference of another prompt" in w for w in why)
    pairs = controls.control_pairs([(0, "q", "One sentence only."), (1, "q", "  "), (2, "q", "Two. Sentences.")])
    assert [p.baseline for p in pairs["first_sentence"]] == ["Two."] and len(pairs["empty"]) == 2


def test_an_unreliable_judge_is_flagged_and_can_be_made_a_stop(tmp_path, llama_tokenizer, monkeypatch):
    use_judge(monkeypatch, FakeJudge(llama_tokenizer), llama_tokenizer)
    judging.judge_controls.cache_clear()  # a judge that always says "1": every control at 0.5, the self control 1
    run = write_samples(tmp_path / "run", ANSWERS_A, references=REFERENCES)
    summary = judging.judge_run(run, JudgeConfig(model="fake", bootstrap=200), seed=0)
    saved = json.loads((run / "judge_reference.json").read_text())
    assert summary["judge/reliable"] is False and saved["reliable"] is False
    assert summary["judge/control_empty"] == pytest.approx(0.5, abs=0.01)
    assert saved["controls"]["empty"]["needs"] == ">= 0.90" and saved["unreliable_because"]
    with pytest.raises(prompts.JudgeError, match=r"failed its controls \(.*eval.judge.require_reliable=true"):
        judging.judge_run(run, JudgeConfig(model="fake", bootstrap=200, require_reliable=True), seed=0)


def test_the_alpaca_eval_prompt_is_alpaca_evals_own(llama_tokenizer, monkeypatch, tmp_path):
    from importlib.resources import files as package_files
    utils = pytest.importorskip("alpaca_eval.utils", reason="alpaca-eval is not installed")
    import pandas as pd
    template = (package_files("alpaca_eval") / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo"
                / "alpaca_eval_clf.txt").read_text()
    row = dict(instruction="Name a {fruit}.", output_1="An apple {x}.", output_2="A pear.")
    made, _ = utils.make_prompts(pd.DataFrame([row]), template)
    assert prompts.chat_messages("alpaca_eval", **row) == utils.prompt_to_chatml(made[0])
    fake = FakeJudge(llama_tokenizer, rule=longer, template="alpaca_eval")
    pairs = [answers.Pair(i, f"q{i}", a, b) for i, (a, b) in enumerate(zip(ANSWERS_A, ANSWERS_B))]
    orders, _ = pairwise_preferences(fake, llama_tokenizer, pairs, 2048, 2, template="alpaca_eval")
    wins = [float(len(a) > len(b)) for a, b in zip(ANSWERS_A, ANSWERS_B)]
    assert orders == pytest.approx(np.array([wins, wins]).T, abs=0.01)  # labels m / M read in both orders


def cli_error(capsys, *args):
    assert judge_cli.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # warnings about the file may come first
    assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in err
    return lines[-1]


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_judges):
    a = write_samples(tmp_path / "a", ANSWERS_A)
    assert "samples.jsonl: no such file" in cli_error(capsys, tmp_path / "none", "--baseline", "reference",
                                                      "--judge", tiny_judges.causal)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "samples.jsonl").write_bytes(b"\xff\xfe not json\n{\"cut\": ")
    assert "holds no answers" in cli_error(capsys, tmp_path / "torn", "--baseline", "reference",
                                           "--judge", tiny_judges.causal)
    assert "cannot be loaded as a pairwise judge" in cli_error(capsys, a, "--baseline", "reference",
                                                               "--judge", tmp_path / "no_model")
    assert "has 2 outputs; a reward model has one" in cli_error(capsys, a, "--baseline", "reference", "--kind",
                                                                 "reward", "--judge", tiny_judges.causal)
    assert "bootstrap=10 is not allowed" in cli_error(capsys, a, "--baseline", "reference", "--bootstrap", 10,
                                                      "--judge", tiny_judges.causal)
    other = write_samples(tmp_path / "other", ANSWERS_B[:3])
    assert "did not answer the same prompts: 1 prompt ids in one run only" in cli_error(
        capsys, a, "--baseline", other, "--judge", tiny_judges.causal)
    b = write_samples(tmp_path / "b", ANSWERS_B)
    (b / "samples.jsonl").write_text((b / "samples.jsonl").read_text().replace("Question 2", "Question two"))
    assert cli_error(capsys, a, "--baseline", b, "--judge", tiny_judges.causal).endswith(
        "0 prompt ids in one run only, 1 with other messages (first: prompt_id 2)")


@pytest.mark.slow
def test_cli_judges_a_run(tmp_path, tiny_judges):
    a, b = write_samples(tmp_path / "a", ANSWERS_A), write_samples(tmp_path / "b", ANSWERS_B)
    proc = subprocess.run([sys.executable, "-m", "neftlab.judge", str(a), "--baseline", str(b), "--judge",
                           tiny_judges.causal, "--bootstrap", "100"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(95% BCa bootstrap interval, n = 4)" in proc.stdout and (a / "judge_b.json").exists()
    assert "judge UNRELIABLE: failed its controls" in proc.stdout  # a random judge
    assert "Judging" in proc.stderr  # a progress bar


def test_a_run_judges_its_answers_at_the_end(tmp_path, tiny_judges):
    outcome, summary = run("size=tiny", "logger=none", f"eval.judge.model={tiny_judges.causal}", out_dir=tmp_path)
    assert outcome.status == "completed", outcome.message
    saved = json.loads((tmp_path / "judge_reference.json").read_text())
    assert summary["judge/win_rate"] == pytest.approx(saved["summary"]["judge/win_rate"])
    assert summary["judge/n_pairs"] == len(saved["pairs"]) >= 1


def sweep_run(root, name, noise, seed, answers, wandb_id=None):
    """A completed run of a sweep, as the report reads it; logged to (offline) W&B when given an id."""
    import yaml
    run = write_samples(root / name, answers)
    (run / ".hydra").mkdir()
    logger = {"kind": "wandb", "mode": "offline", "project": "test"} if wandb_id else {"kind": "none"}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "noise": {"kind": noise}, "pruning": {"kind": "off"}, "trainer": {"max_steps": 4},
         "logger": logger}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"noise={noise}", f"seed={seed}"]))
    (run / "summary.json").write_text(json.dumps({"status": "completed"}))
    if wandb_id:
        (run / "wandb-run-id").write_text(wandb_id)
    return run


@pytest.mark.slow
def test_a_sweep_is_judged_against_its_baseline_arm_seed_by_seed(tmp_path, tiny_judges, monkeypatch):
    from tests.wandb_records import offline_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    plain = [sweep_run(tmp_path, f"plain_{s}", "none", s, ANSWERS_B, wandb_id=f"base{s}") for s in (1, 2)]
    noisy = [sweep_run(tmp_path, f"noisy_{s}", "uniform", s, ANSWERS_A, wandb_id=f"run{s}") for s in (1, 2)]
    assert judge_cli.main([str(tmp_path), "--baseline", "arm", "--judge", tiny_judges.causal, "--bootstrap", "100",
                           "--wandb"]) == 0
    for seed, judged in enumerate(noisy, 1):
        saved = json.loads((judged / f"judge_plain_{seed}.json").read_text())
        assert saved["baseline"] == str(plain[seed - 1].resolve())  # its own seed's baseline run
        # two runs judged on the same prompts: AlpacaEval's instruction terms in their LC, estimated from both
        assert saved["summary"]["judge/lc_instruction_terms"] is True and saved["instruction_difficulty_from"] == 2
        assert saved["pairs"][0]["instruction_difficulty"] == 0.0
        logged = offline_run(judged)
        assert logged["run"].run_id == f"run{seed}"
        assert float(logged["summary"]["judge_vs_baseline/win_rate"]) == pytest.approx(
            saved["summary"]["judge/win_rate"])
    assert not list(tmp_path.glob("plain_*/judge_*.json"))
    assert "a sweep" in cli_error_text(tmp_path / "noisy_1", "--baseline", "arm", "--judge", tiny_judges.causal)


def cli_error_text(*args):
    proc = subprocess.run([sys.executable, "-m", "neftlab.judge", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]
