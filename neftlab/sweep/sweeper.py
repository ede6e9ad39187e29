"""`hydra/sweeper=neftlab_optuna` (conf/hydra/sweeper/neftlab_optuna.yaml): Hydra's Optuna sweeper, with its
options and samplers, whose `n_trials` is the study's total, shared by every process that runs it (`study`).

Hydra builds a sweeper only from a registered plugin class, and loads every one (this one through the
`hydra.plugins` entry point in pyproject.toml) at the start of any Hydra command, `--help` included, whether or not
the `sweeps` extra is installed: so this class imports nothing more than Hydra, and the search loop, with Optuna
and the run's modules, is imported when a search is built."""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig


class StudySweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None,
                 params: DictConfig | None) -> None:
        from .study import StudySweeperImpl  # for start-up time alone (see above)

        sampler = instantiate(sampler, _execution_whitelist_=("hydra_plugins.hydra_optuna_sweeper.*",
                                                              "optuna.samplers.*"))
        self.sweeper = StudySweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                                        custom_search_space, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
