"""The sampler neftlab's searches draw with: Optuna 5's TPE (multivariate, constant liar), read from the sampler the
sweeper builds, not from the config alone; another sampler named on the command line is built as named."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from optuna.samplers import GPSampler, RandomSampler, TPESampler

from tests.helpers import CONF


def _sampler(*overrides: str):
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", list(overrides), return_hydra_config=True)
    sweeper = instantiate(cfg.hydra.sweeper, _recursive_=False,  # as Hydra builds it: the sweeper builds its sampler
                          _execution_whitelist_=("neftlab.sweep.sweeper.*",))
    return sweeper.sweeper.sampler


@pytest.mark.parametrize("search", ["neftune", "sparse_neft", "perturbations"])
def test_every_search_draws_with_optuna_5s_tpe(search):
    """Hydra's Optuna sweeper config turns multivariate and constant liar off (Optuna 2's TPE); Optuna 5 builds its
    TPE with both on for one objective. neftlab's turns both on for every search, two objectives included."""
    sampler = _sampler(f"hparams_search={search}")
    assert type(sampler) is TPESampler
    assert (sampler._multivariate, sampler._constant_liar) == (True, True)
    assert TPESampler()._constant_liar is True  # Optuna's own default, which the config now follows


def test_a_sampler_named_on_the_command_line_is_built_as_named():
    sampler = _sampler("hparams_search=neftune", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=3")
    assert type(sampler) is RandomSampler


def test_tpe_can_still_be_run_as_optuna_2_ran_it():
    sampler = _sampler("hparams_search=neftune", "hydra.sweeper.sampler.multivariate=false",
                       "hydra.sweeper.sampler.constant_liar=false")
    assert (sampler._multivariate, sampler._constant_liar) == (False, False)


def test_the_gaussian_process_sampler_is_an_option():
    sampler = _sampler("hparams_search=neftune", "hydra/sweeper/sampler=gp", "hydra.sweeper.sampler.seed=3")
    assert type(sampler) is GPSampler and sampler._n_startup_trials == 10
