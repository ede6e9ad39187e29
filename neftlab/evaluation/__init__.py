"""What a run measures after (and during) training: answers and their measures (`generation`, `measures`), the
noise-off training loss (`noise_off`), lm-evaluation-harness tasks (`harness`) and a local judge (`judge`)."""
