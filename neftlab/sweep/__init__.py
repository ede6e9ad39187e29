"""The machinery of sweeps and searches, around one run's job: the launching process (`launch`: the output
directory checked, a sweep's directory fixed or continued, stop signals passed on, the exit code), neftlab's SLURM
launcher (`slurm`), a search's study shared by every process that runs it (`study`) and its Hydra sweeper plugin
(`sweeper`, hydra/sweeper=neftlab_optuna)."""
