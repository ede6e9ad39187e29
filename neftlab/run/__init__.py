"""A run: its job (which directory, claimed; `job`), the launching process (`launch`), the pipeline (`pipeline`),
its checkpoints and resumes (`checkpoint`, `fingerprint`, `resume`), and the guards that keep it safe (`signals`,
`nonfinite`)."""
