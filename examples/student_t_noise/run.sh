#!/usr/bin/env bash
# A user's noise kind outside neftlab, at size=tiny: its test, a run with it, a search that takes it as a choice
# with its own space, and the search's report. Nothing in neftlab names it: its module is on PYTHONPATH and named in
# $NEFTLAB_PLUGINS (a config alone never makes neftlab import code), its YAML on hydra.searchpath.
#   bash run.sh OUT_DIR        (PYTHON=... to use another interpreter)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:?usage: run.sh OUT_DIR}" && cd "$1" && pwd)"
py="${PYTHON:-python}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export NEFTLAB_PLUGINS=student_t_noise
searchpath="hydra.searchpath=[file://$here/conf]"

(cd "$here" && "$py" -m pytest -q -p no:cacheprovider test_student_t_noise.py)
"$py" -m neftlab "$searchpath" noise=student_t noise.dof=5 size=tiny logger=none output_root="$out" \
  hydra.run.dir="$out/run"
"$py" -m neftlab -m "$searchpath" hparams_search=perturbations "+hydra.sweeper.params.noise='choice(uniform,student_t)'" \
  hydra.sweeper.n_trials=4 hydra.sweeper.sampler.seed=1 size=tiny logger=none output_root="$out"
"$py" -m neftlab.report "$out/experiments/perturbation_search_tiny"
