"""Length control on simulated judgings with a known length-controlled win rate: neftlab's former estimate against
AlpacaEval 2's, which `stats.length_controlled` now computes.

Each data set is `--prompts` judged pairs. Baseline answers have 50-300 words, the run's answers on average 40 more (sd 80),
and a share `--tail` of them 800-1,500 words more: answers that run on to max_new_tokens. The judge's log-odds of
preferring the run's answer are `--intercept` plus a length effect that saturates, tanh(words more / 150); the
verdicts are 0/1 draws from it. The true length-controlled win rate is sigmoid(intercept), the win rate at equal
length. Characters are 5.5 per word.

- former: a logistic fit on the difference in whitespace words, sigmoid(intercept), with a percentile bootstrap
  (what `judge.summarize` did before; kept here only to measure it);
- AlpacaEval's: `stats.length_controlled` with its BCa bootstrap.

    python benchmarks/length_control.py [--datasets 200] [--prompts 256] [--tail 0.15] [--resamples 1000]
"""

import argparse

import numpy as np
from scipy.special import expit

from neftlab.core import stats


def former(prefs, words, resamples, rng):
    """sigmoid(intercept) of p ≈ sigmoid(a + b·words), and its percentile bootstrap 95% interval."""
    def fit(p, x):
        scale = np.std(x, axis=-1, keepdims=True)
        X = np.stack([np.ones_like(x), x / np.where(scale > 0, scale, 1)], -1)
        return expit(stats.logistic_fit(X, p, ridge=1e-3)[..., 0])
    idx = rng.integers(0, len(prefs), (resamples, len(prefs)))
    return float(fit(prefs, words)), np.percentile(fit(prefs[idx], words[idx]), [2.5, 97.5])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tail", type=float, default=0.15, help="share of run answers 800-1,500 words longer")
    parser.add_argument("--intercept", type=float, default=0.3)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    truth = float(expit(args.intercept))
    found = {"former": [], "AlpacaEval": []}
    for i in range(args.datasets):
        base = rng.integers(50, 300, args.prompts)
        more = rng.normal(40, 80, args.prompts).round()
        tail = rng.random(args.prompts) < args.tail
        more[tail] = rng.integers(800, 1500, tail.sum())
        prefs = (rng.random(args.prompts) < expit(args.intercept + np.tanh(more / 150))).astype(float)
        value, (low, high) = former(prefs, more.astype(float), args.resamples, rng)
        found["former"].append((value, low <= truth <= high))
        e = stats.length_controlled(prefs, (base + more) * 5.5, base * 5.5, seed=i, resamples=args.resamples)
        found["AlpacaEval"].append((e.value, e.low <= truth <= e.high))
    print(f"{args.datasets} data sets of {args.prompts} judged pairs, {args.tail:.0%} of the run's answers "
          f"800-1,500 words longer; true length-controlled win rate {truth:.3f}")
    for name, rows in found.items():
        values = np.array([v for v, _ in rows])
        print(f"  {name:10s}: mean {values.mean():.3f} (bias {values.mean() - truth:+.3f}), 95% interval covers the "
              f"truth in {np.mean([c for _, c in rows]):.2f} of the data sets")


if __name__ == "__main__":
    main()
