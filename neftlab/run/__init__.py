"""A run: its job (which directory, claimed; `job`), the pipeline (`pipeline`), its checkpoints and resumes
(`checkpoint`, `fingerprint`, `resume`), a finished run evaluated again (`reevaluate`), and the guards that keep it
safe (`signals`, `nonfinite`). The machinery of sweeps and searches around it is `neftlab.sweep`."""
