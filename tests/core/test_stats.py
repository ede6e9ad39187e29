"""The statistics module: intervals that cover what they claim, tests that equal their definitions, and AlpacaEval
2's length-controlled win rate as alpaca_eval itself computes it."""

import itertools
import warnings

import numpy as np
import pytest
from scipy import stats as st

from neftlab.core import stats

SKEWED = 2.0  # gamma(shape 2): skewness 1.4, mean 2


def draw(rng, kind, shape):
    return (rng.normal(1.0, 2.0, shape), 1.0) if kind == "normal" else (rng.gamma(SKEWED, 1.0, shape), SKEWED)


@pytest.mark.parametrize("kind", ["normal", "skewed"])
@pytest.mark.parametrize("n, studies", [(3, 2000), (5, 2000), (256, 300)])
def test_intervals_cover_the_mean_at_their_nominal_95_percent(kind, n, studies):
    """Many simulated studies with a known mean difference: seeds (n = 3, 5) and prompts (n = 256)."""
    rng = np.random.default_rng(n)
    diffs, mean = draw(rng, kind, (studies, n))
    estimates = [stats.mean_difference(d, seed=i) if n < stats.SMALL else stats.mean_over_items(d, seed=i,
                                                                                                resamples=2000)
                 for i, d in enumerate(diffs)]
    assert {e.method for e in estimates} == {"t" if n < stats.SMALL else "BCa bootstrap"}
    coverage = np.mean([e.low <= mean <= e.high for e in estimates])
    print(f"{kind} differences, n = {n}: the {estimates[0].method} interval covers the mean in {coverage:.3f}")
    assert 0.90 <= coverage <= 0.99, coverage


def test_the_percentile_bootstrap_over_three_seeds_fails_the_same_check():
    """What the report printed before: at n = 3 the percentile interval is about [min, max] of the differences."""
    rng = np.random.default_rng(3)
    diffs, mean = draw(rng, "normal", (500, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cis = [st.bootstrap((d,), np.mean, method="percentile", n_resamples=2000, rng=rng).confidence_interval
               for d in diffs]
    coverage = np.mean([ci.low <= mean <= ci.high for ci in cis])
    print(f"normal differences, n = 3: the percentile bootstrap interval covers the mean in {coverage:.3f}")
    assert coverage < 0.85


def test_small_samples_get_a_t_interval_and_an_exact_sign_flip_p_value():
    d = [0.3, -0.1, 0.5, 0.2]
    e = stats.mean_difference(d)
    t = st.ttest_1samp(d, 0).confidence_interval(0.95)
    assert (e.low, e.high) == pytest.approx((t.low, t.high)) and e.method == "t" and e.n == 4
    flips = [np.mean(np.array(signs) * d) for signs in itertools.product((1, -1), repeat=4)]
    assert e.p == pytest.approx(np.mean(np.abs(flips) >= abs(np.mean(d)) - 1e-12))  # by enumeration: 4 of 16
    assert e.test == "exact sign-flip (16 flips)" and e.interval == "95% t interval, n = 4"
    assert stats.mean_difference([1.0, 2.0, 3.0]).p == pytest.approx(0.25)  # 3 seeds can never reach p < 0.25
    one = stats.mean_difference([0.4])
    assert one.low is None and one.p is None and one.interval == "no interval (n = 1)"
    same = stats.mean_difference([0.2, 0.2, 0.2])
    assert (same.low, same.high) == pytest.approx((0.2, 0.2))


def test_many_pairs_get_a_bca_interval_equal_to_scipys():
    rng = np.random.default_rng(0)
    d = rng.gamma(2, 1, 40)
    e = stats.mean_difference(d, seed=5)
    ref = st.bootstrap((d,), np.mean, method="BCa", n_resamples=stats.RESAMPLES, rng=np.random.default_rng(5))
    assert (e.low, e.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert e.method == "BCa bootstrap" and e.p < 1e-3 and "random flips" in e.test
    assert stats.mean_over_items(np.full(10, 0.5)).low == 0.5  # no variation: BCa is undefined, the interval a point


def test_holm_adjusts_a_family_of_p_values():
    # Holm (1979): sorted 0.01, 0.02, 0.04 times 3, 2, 1, made monotone; None stays out of the family.
    assert stats.holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def lc_data(rng, n, intercept=0.3, slope=1.0, difficulty=None, tail=0.0):
    """Soft preferences from a known GLM of the tanh of the standardised character-length difference."""
    base = rng.integers(200, 2000, n)
    run = base + rng.normal(300, 400, n).astype(int).clip(-150, None)
    heavy = rng.random(n) < tail
    run[heavy] += rng.integers(4000, 7500, heavy.sum())  # answers 800-1,500 words longer
    delta = run - base
    logit = intercept + slope * np.tanh(delta / delta.std(ddof=1))
    if difficulty is not None:
        logit = logit + difficulty
    return (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float), run, base


def test_length_controlled_win_rate_is_read_at_zero_length_difference():
    rng = np.random.default_rng(0)
    prefs, run, base = lc_data(rng, 4000)
    e = stats.length_controlled(prefs, run, base, resamples=500)
    assert prefs.mean() > 0.65 and e.value == pytest.approx(1 / (1 + np.exp(-0.3)), abs=0.02)
    assert e.low < e.value < e.high and e.method == "BCa bootstrap" and e.n == 4000
    assert stats.length_controlled(np.ones(50), run[:50], base[:50], resamples=200).value > 0.99  # finite


def test_instruction_difficulty_is_recovered_from_several_runs_on_the_same_prompts():
    rng = np.random.default_rng(1)
    prompts = 60
    truth = rng.normal(0, 1.5, prompts)
    judged = []
    for r in range(12):
        base = rng.integers(200, 2000, prompts)
        run = base + rng.normal(100 * r, 300, prompts).astype(int)
        logit = 0.1 * r + truth + np.tanh((run - base) / np.std(run - base, ddof=1))
        judged.append((list(range(prompts)), 1 / (1 + np.exp(-logit)), run - base))
    found = stats.instruction_difficulty(judged)
    estimate = np.array([found[i] for i in range(prompts)])
    assert st.pearsonr(estimate, truth - truth[0]).statistic > 0.95 and found[0] == 0.0


alpaca_eval = pytest.importorskip("alpaca_eval.metrics.glm_winrate", reason="alpaca-eval is not installed")


def alpaca_eval_lc(prefs, run, base, difficulty, formula, tmp_path, monkeypatch):
    """alpaca_eval's own get_length_controlled_winrate on these annotations. Its hub file is used only for the
    instruction difficulties, so it is served from `difficulty`."""
    import pandas as pd
    pd.DataFrame({"index": range(len(prefs)), "instruction_difficulty": difficulty, "model": "neftlab"}).to_csv(
        tmp_path / "df_gamed.csv", index=False)
    monkeypatch.setattr(alpaca_eval, "hf_hub_download", lambda **_: str(tmp_path / "df_gamed.csv"))
    df = pd.DataFrame({"instruction": [f"q{i}" for i in range(len(prefs))], "output_1": ["b" * int(n) for n in base],
                       "output_2": ["r" * int(n) for n in run], "generator_1": "baseline", "generator_2": "run",
                       "annotator": "neftlab", "preference": 1 + np.asarray(prefs)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = alpaca_eval.get_length_controlled_winrate(df, glm_info=alpaca_eval.GLM_INFO[formula],
                                                        save_weights_dir=None, is_warn_extreme_changes=False)
    return out["length_controlled_winrate"] / 100


@pytest.mark.parametrize("formula", ["length_controlled_minimal", "length_controlled_noreg"])
@pytest.mark.parametrize("tail", [0.0, 0.15])
def test_length_control_agrees_with_alpaca_evals_own_glm(formula, tail, tmp_path, monkeypatch):
    """The same preferences and lengths through alpaca_eval's GLM (without and with instruction terms) and through
    neftlab's; also on the heavy tail of answers cut at max_new_tokens."""
    rng = np.random.default_rng(7)
    difficulty = rng.normal(0, 1, 400)
    with_terms = formula.endswith("noreg")
    prefs, run, base = lc_data(rng, 400, difficulty=difficulty if with_terms else None, tail=tail)
    ours = stats.length_controlled(prefs, run, base, difficulty if with_terms else None, resamples=200).value
    theirs = alpaca_eval_lc(prefs, run, base, difficulty, formula, tmp_path, monkeypatch)
    assert ours == pytest.approx(theirs, abs=0.005)
