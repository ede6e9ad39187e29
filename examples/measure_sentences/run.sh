#!/usr/bin/env bash
# A tiny run with this folder's measures, then its report, then a tiny search that optimizes one of them, and its
# report: ./run.sh OUTPUT_DIR
# Nothing of neftlab is edited: the measures' module is put on the Python path and named in $NEFTLAB_PLUGINS (a
# config alone never makes neftlab import code), and the run's config lists them in eval.measures.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: run.sh OUTPUT_DIR}"
python="${PYTHON:-python}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export NEFTLAB_PLUGINS=sentence_measures
"$python" -m neftlab size=tiny logger=none output_root="$out" hydra.run.dir="$out/run" \
  'eval.measures=[{_target_:sentence_measures.complete_sentences},{_target_:sentence_measures.entropy,examples:4}]'
"$python" -m neftlab.report "$out/run"
# A search that optimizes one of them: the share of answers that end a sentence, over NEFTune's kinds and alpha.
"$python" -m neftlab -m hparams_search=neftune size=tiny logger=none output_root="$out" hydra.sweeper.n_trials=2 \
  'eval.measures=[{_target_:sentence_measures.complete_sentences}]' 'search.objectives=[eval/complete_sentences]'
"$python" -m neftlab.report "$out/experiments/neftune_search_tiny"
grep -E 'complete_sentences|entropy' "$out/run/summary.json"
grep -F 'answers ending a sentence' "$out/run/report.md"
