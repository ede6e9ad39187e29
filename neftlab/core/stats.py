"""Every interval, test and length-controlled win rate neftlab reports, on scipy.stats.

Two kinds of evidence, two methods, each named with its n wherever a number is printed or logged:

- **Over seeds** (an arm's run paired with the baseline arm's run of the same seed): a handful of differences.
  With fewer than `SMALL` pairs, a Student t interval of their mean and an exact sign-flip permutation p-value
  (every one of the 2^n sign patterns). A percentile bootstrap is wrong here: over 3 pairs each resample has a
  1/27 chance of being all the smallest difference, so its "95%" interval is [min, max] and covers the mean about
  70% of the time. From `SMALL` pairs on, a BCa bootstrap and a sign-flip test on random flips.
- **Over items** (a judge's prompts, a benchmark's questions): hundreds of values, a BCa bootstrap.

Several arms against one baseline: `holm` adjusts their p-values (scipy has Benjamini-Hochberg only).
`length_controlled` is AlpacaEval 2's length-controlled win rate (alpaca_eval.metrics.glm_winrate).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as st
from scipy.special import expit

from . import measures

CONFIDENCE = 0.95
SMALL = 20  # fewer pairs than this: t interval and exact sign-flip test
RESAMPLES = 9999  # bootstrap resamples, and random sign flips from SMALL pairs on


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval; `method` and `n` go wherever the numbers go."""

    value: float
    n: int
    low: Optional[float] = None
    high: Optional[float] = None
    method: str = ""  # e.g. "t", "BCa bootstrap"; "" when there is no interval (one value)
    p: Optional[float] = None  # two-sided p-value of "the mean is 0" (differences only)
    test: str = ""  # e.g. "exact sign-flip"

    @property
    def interval(self) -> str:
        """How the interval was made: "95% t interval, n = 3", or why there is none."""
        if self.low is None:
            return f"no interval (n = {self.n})"
        return f"{CONFIDENCE:.0%} {self.method} interval, n = {self.n}"

    def fields(self, prefix: str) -> dict:
        """As summary keys: <prefix>, <prefix>_ci_low, _ci_high, _ci_method, _n, and _p with its _test."""
        out = {prefix: self.value, f"{prefix}_n": self.n, f"{prefix}_ci_method": self.interval}
        if self.low is not None:
            out.update({f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high})
        if self.p is not None:
            out.update({f"{prefix}_p": self.p, f"{prefix}_test": self.test})
        return out


def _degenerate(values: np.ndarray) -> bool:
    return bool(np.ptp(values) == 0)


def mean_difference(diffs: Sequence[float], seed: int = 0) -> Estimate:
    """The mean of paired differences (arm − baseline, one per seed), its interval and the p-value of no
    difference. One pair: no interval and no test."""
    d = np.asarray(diffs, dtype=float)
    n, mean = len(d), float(np.mean(d)) if len(d) else math.nan
    if n < 2:
        return Estimate(mean, n)
    if n < SMALL:
        if _degenerate(d):
            low = high = mean
        else:
            ci = st.ttest_1samp(d, 0.0).confidence_interval(CONFIDENCE)
            low, high = float(ci.low), float(ci.high)
        p = st.permutation_test((d,), _mean, permutation_type="samples", n_resamples=np.inf, vectorized=True)
        return Estimate(mean, n, low, high, "t", float(p.pvalue), f"exact sign-flip ({2 ** n} flips)")
    low, high, method = _bca((d,), _mean, seed)
    p = st.permutation_test((d,), _mean, permutation_type="samples", n_resamples=RESAMPLES, vectorized=True,
                            rng=np.random.default_rng(seed))
    return Estimate(mean, n, low, high, method, float(p.pvalue), f"sign-flip ({RESAMPLES} random flips)")


def mean_over_items(values: Sequence[float], seed: int = 0, resamples: int = RESAMPLES) -> Estimate:
    """The mean of per-item values (one per prompt or question) with a BCa bootstrap interval over the items."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return Estimate(float(np.mean(v)) if len(v) else math.nan, len(v))
    low, high, method = _bca((v,), _mean, seed, resamples)
    return Estimate(float(v.mean()), len(v), low, high, method)


def bootstrap(statistic: Callable, data: tuple, seed: int = 0, resamples: int = RESAMPLES
              ) -> tuple[float, float, str]:
    """BCa interval of `statistic(*data, axis=-1)` (vectorised) over items, the arrays resampled together."""
    return _bca(data, statistic, seed, resamples)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _bca(data: tuple, statistic: Callable, seed: int, resamples: int = RESAMPLES) -> tuple[float, float, str]:
    """(low, high, method). Where BCa is undefined (every jackknife value equal: no variation in the data) the
    interval is the bootstrap distribution's percentiles, and `method` says so."""
    if all(_degenerate(np.asarray(x)) for x in data):
        value = float(statistic(*data, axis=-1))
        return value, value, "BCa bootstrap"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.bootstrap(data, statistic, paired=len(data) > 1, vectorized=True, n_resamples=resamples,
                           confidence_level=CONFIDENCE, method="BCa", rng=np.random.default_rng(seed), batch=500)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(low) and math.isfinite(high):
        return low, high, "BCa bootstrap"
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(res.bootstrap_distribution, [tail, 100 - tail])
    return float(low), float(high), "percentile bootstrap (BCa undefined)"


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None entries are left out and stay None)."""
    kept = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    out: list[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(kept)):
        running = max(running, min(1.0, (len(kept) - rank) * p))
        out[i] = running
    return out


# --- AlpacaEval 2's length-controlled win rate -------------------------------------------------------------------

def logistic_fit(X: np.ndarray, p: np.ndarray, ridge: float = 1e-6, iterations: int = 100) -> np.ndarray:
    """Weights w of p ≈ sigmoid(X·w), fitted to soft labels p in [0, 1] by Newton's method on the cross-entropy,
    batched over leading axes (bootstrap resamples refit at once: scipy.optimize fits one at a time). The tiny
    ridge keeps the weights finite when every preference is 0 or 1, or a feature is constant."""
    X, p = np.asarray(X, dtype=float), np.asarray(p, dtype=float)
    k = X.shape[-1]
    w = np.zeros(X.shape[:-2] + (k,))
    for _ in range(iterations):
        q = expit(np.einsum("...ni,...i->...n", X, w))
        grad = np.einsum("...ni,...n->...i", X, q - p) + ridge * w
        hess = np.einsum("...ni,...nj->...ij", X * (q * (1 - q))[..., None], X) + ridge * np.eye(k)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return w


def _features(delta: np.ndarray, difficulty: Optional[np.ndarray]) -> np.ndarray:
    """alpaca_eval's design matrix: the intercept (its `not_gamed_baseline`), tanh of the length difference divided
    by its standard deviation (not centred: zero difference stays zero), and the instruction difficulty."""
    delta = np.asarray(delta, dtype=float)
    sd = np.std(delta, axis=-1, ddof=1, keepdims=True)
    z = np.divide(delta, sd, out=np.zeros_like(delta), where=sd > 0)
    columns = [np.ones_like(z), np.tanh(z)] + ([np.broadcast_to(difficulty, z.shape)] if difficulty is not None else [])
    return np.stack(columns, -1)


def lc_statistic(prefs, delta, difficulty=None, axis=-1):
    """The length-controlled win rate of soft preferences for the run's answers: alpaca_eval's GLM
    `tanh(std_delta_len) [+ instruction_difficulty] + intercept`, fitted, then read at zero length difference
    and averaged over the instructions. Vectorised over leading axes, for the bootstrap."""
    prefs, delta = np.moveaxis(np.asarray(prefs, float), axis, -1), np.moveaxis(np.asarray(delta, float), axis, -1)
    if difficulty is not None:
        difficulty = np.moveaxis(np.asarray(difficulty, float), axis, -1)
    X = _features(delta, difficulty)
    w = logistic_fit(X, prefs)
    at_zero = w[..., :1]
    if difficulty is not None:
        at_zero = at_zero + w[..., 2:3] * difficulty
    return np.mean(expit(np.broadcast_to(at_zero, prefs.shape)), axis=-1)


def length_controlled(prefs: Sequence[float], run_chars: Sequence[int], baseline_chars: Sequence[int],
                      difficulty: Optional[Sequence[float]] = None, seed: int = 0, resamples: int = RESAMPLES
                      ) -> Estimate:
    """AlpacaEval 2's length-controlled win rate with a BCa bootstrap interval over the prompts. Lengths are in
    characters, as alpaca_eval counts them; `difficulty` is each prompt's instruction difficulty, when several runs
    judged on the same prompts give one (`instruction_difficulty`)."""
    data = [np.asarray(prefs, float), np.asarray(run_chars, float) - np.asarray(baseline_chars, float)]
    if difficulty is not None:
        data.append(np.asarray(difficulty, float))
    value = float(lc_statistic(*data))
    if len(data[0]) < 3:
        return Estimate(value, len(data[0]))
    low, high, method = _bca(tuple(data), lc_statistic, seed, resamples)
    return Estimate(value, len(data[0]), low, high, method)


def instruction_difficulty(judged: Sequence[tuple[Sequence, Sequence[float], Sequence[float]]]) -> dict:
    """Each prompt's instruction difficulty from several runs judged on the same prompts, as alpaca_eval derived
    its own (notebooks/instruction_difficulty.ipynb): one joint GLM with a length term and an intercept per run
    and a term per prompt; the prompt terms are the difficulties (the first prompt's is 0). `judged` holds, per
    run, (prompt ids, preferences, run chars − baseline chars)."""
    prompts = sorted({pid for ids, _, _ in judged for pid in ids})
    index = {pid: j for j, pid in enumerate(prompts)}
    runs, rows, labels = len(judged), [], []
    for r, (ids, prefs, delta) in enumerate(judged):
        tanh = _features(np.asarray(delta, float), None)[:, 1]
        for pid, pref, t in zip(ids, prefs, tanh):
            x = np.zeros(2 * runs + len(prompts) - 1)
            x[r], x[runs + r] = 1.0, t
            if index[pid]:
                x[2 * runs + index[pid] - 1] = 1.0
            rows.append(x)
            labels.append(pref)
    w = logistic_fit(np.array(rows), np.array(labels), ridge=1e-3)
    return {pid: (float(w[2 * runs + index[pid] - 1]) if index[pid] else 0.0) for pid in prompts}


def preference_summary(prefs: Sequence[float], run_chars: Sequence[int], baseline_chars: Sequence[int],
                       resamples: int = RESAMPLES, seed: int = 0, difficulty: Optional[Sequence[float]] = None) -> dict:
    """A judge's verdicts as `judge/…` summary keys: the win rate (the mean preference for the run's answers, a tie
    counting half) and AlpacaEval 2's length-controlled win rate, each with its BCa interval over the prompts."""
    prefs = np.asarray(prefs, float)
    delta = np.asarray(run_chars, float) - np.asarray(baseline_chars, float)
    return {
        **mean_over_items(prefs, seed, resamples).fields(measures.WIN_RATE.key),
        **length_controlled(prefs, run_chars, baseline_chars, difficulty, seed, resamples).fields(
            measures.LC_WIN_RATE.key),
        measures.LC_TERMS.key: difficulty is not None,
        measures.LENGTH_DIFF.key: float(delta.mean()) if len(delta) else math.nan,
        measures.DECISIVE_WIN_RATE.key: float(np.mean((prefs > 0.5) + 0.5 * (prefs == 0.5))),
        measures.N_PAIRS.key: len(prefs),
    }
