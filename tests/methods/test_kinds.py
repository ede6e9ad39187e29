"""What a noise kind declares, and how neftlab finds it: by its YAML's `_target_`, neftlab's kinds and a user's alike."""

import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from neftlab.config import ConfigError
from neftlab.config.noise import CONF, canonical, is_kind_file, kind_class, option_node, own_keys, typed
from neftlab.config.spaces import noise_magnitude, searched_kinds
from tests.helpers import compose_cfg

KIND_FILES = sorted(p.stem for p in (CONF / "noise").glob("*.yaml") if is_kind_file(p.stem))


def test_the_kind_files_are_the_kinds():
    assert KIND_FILES == ["dynamic", "freelb", "gaussian", "laplace", "noisefit", "noisytune", "none", "symnoise",
                          "uniform"]


@pytest.mark.parametrize("option", KIND_FILES)
def test_a_kind_file_lists_exactly_its_kinds_keys_at_their_defaults(option):
    """The YAML is what a user reads and overrides (`noise.KEY=` needs the key there): it holds every key the
    class's config has, at the config's own default, and no other."""
    cls = kind_class(option_node(option))
    node = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "noise" / f"{option}.yaml")).items()
            if k not in ("defaults", "_target_")}
    assert cls.name == option
    assert sorted(node) == sorted(own_keys(cls))
    assert node == {k: v for k, v in canonical({"_target_": option_node(option)["_target_"]}).items() if k in node}


def test_a_flat_noise_saved_before_kinds_had_classes_reads_as_its_kind():
    flat = {"kind": "symnoise", "alpha": 3.0, "length_mode": "real", "std": None, "schedule": "constant",
            "warmup_ratio": 0.1, "tokens": "all", "antithetic": True, "intensity": 0.15, "adv_steps": 2, "adv_lr": 0.1,
            "adv_init_mag": 5.0, "adv_max_norm": 0.0, "alpha_min": 1.0, "alpha_max": 10.0, "alpha_step": 0.1,
            "adjust_interval": 100, "stability_threshold": 0.1}
    assert canonical(flat) == canonical({"_target_": "neftlab.methods.noise.symnoise.SymNoise", "alpha": 3.0,
                                         "antithetic": True})
    assert typed(flat).antithetic is True and typed(flat).kind == "symnoise"


@pytest.mark.parametrize("overrides, message", [
    (["noise=uniform", "noise.adv_lr=0.3"], "noise.adv_lr=0.3: noise.adv_lr is not a key of noise kind uniform "
     "(noise=uniform): its keys are noise.length_mode, noise.consistency, noise.consistency_weight, noise.alpha, "
     "noise.tokens, noise.antithetic, noise.schedule, noise.warmup_ratio"),
    (["noise=noisytune", "noise.alpha=3"], "noise.alpha=3: noise.alpha is not a key of noise kind noisytune "
     "(noise=noisytune): its keys are noise.intensity"),
    (["noise.alpha=3"], "noise.alpha=3: noise.alpha is not a key of noise kind none (noise=none): its keys are none"),
    (["noise=uniform,freelb", "noise.alpha=3"], "noise.alpha=3: noise.alpha is not a key of noise kind freelb "
     "(noise=freelb): its keys are noise.length_mode, noise.adv_steps, noise.adv_lr, noise.adv_init_mag, "
     "noise.adv_max_norm"),
    (["noise=uniform", "noise.kind=gaussian"], "noise.kind=gaussian: noise.kind is the kind's name, from its class: "
     "pick a kind with noise=OPTION"),
])
def test_a_key_of_another_kind_is_refused_on_the_command_line_in_one_line(overrides, message):
    from neftlab.config.compose import check_command_line
    assert check_command_line(overrides) == message


def test_a_key_of_another_kind_is_refused_by_the_kinds_typed_config():
    """However it got there (a study's YAML, a `+` past the command line): the typed config refuses it."""
    with pytest.raises(ConfigError, match="^noise.adv_lr is not a key of noise kind uniform: its keys are "
                                          "noise.length_mode, noise.consistency, noise.consistency_weight, "
                                          "noise.alpha, noise.tokens, noise.antithetic"):
        typed({"_target_": "neftlab.methods.noise.uniform.Uniform", "adv_lr": 0.3})


def test_a_target_that_is_not_a_trusted_kind_is_refused(monkeypatch):
    """A config alone never makes neftlab import code: a module outside neftlab must be named in $NEFTLAB_PLUGINS."""
    monkeypatch.delenv("NEFTLAB_PLUGINS", raising=False)
    with pytest.raises(ConfigError, match=r"^noise._target_=collections.OrderedDict is not trusted: neftlab imports a "
                                          r"config's code only from the modules the environment names, so name it: "
                                          r"export NEFTLAB_PLUGINS=collections$"):
        typed({"_target_": "collections.OrderedDict"})
    monkeypatch.setenv("NEFTLAB_PLUGINS", "collections,no_such_module")
    with pytest.raises(ConfigError, match=r"noise._target_='collections.OrderedDict' is not a noise kind"):
        typed({"_target_": "collections.OrderedDict"})
    with pytest.raises(ConfigError, match=r"noise._target_='no_such_module.Kind' cannot be imported"):
        typed({"_target_": "no_such_module.Kind"})


USER_KIND = '''
from typing import Optional
import torch
from neftlab.methods.noise import DrawnNoise, Param


class Triangular(DrawnNoise):
    """A user's kind: triangular noise, the sum of two uniforms, at NEFTune's scale."""
    name = "triangular"
    space = (Param("alpha", 1.0, 4.0),)

    def sample(self, shape, generator: Optional[torch.Generator], device):
        draw = torch.empty((2, *shape), device=device).uniform_(-0.5, 0.5, generator=generator)
        return draw.sum(0)
'''


@pytest.fixture
def user_kind(tmp_path, monkeypatch):
    """A kind in a user's own module and their own noise/triangular.yaml, found through a search path."""
    (tmp_path / "triangular_noise.py").write_text(USER_KIND)
    (tmp_path / "conf" / "noise").mkdir(parents=True)
    (tmp_path / "conf" / "noise" / "triangular.yaml").write_text(textwrap.dedent("""\
        _target_: triangular_noise.Triangular
        alpha: 2.0
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NEFTLAB_PLUGINS", "triangular_noise")
    yield f"file://{tmp_path / 'conf'}"
    sys.modules.pop("triangular_noise", None)


def test_a_users_kind_composes_and_is_searched_with_its_own_space(user_kind):
    cfg = compose_cfg("noise=triangular", "noise.alpha=3", f"hydra.searchpath=[{user_kind}]")
    assert (cfg.noise.kind, cfg.noise.alpha, cfg.noise.schedule) == ("triangular", 3.0, "constant")
    # A YAML written before a base option (noise.consistency) existed still composes, and still takes it, with `+`
    # (Hydra says so): only neftlab's own kind files must list every key (the test above).
    assert cfg.noise.consistency == "none"
    cfg = compose_cfg("noise=triangular", "+noise.consistency=kl", f"hydra.searchpath=[{user_kind}]")
    assert cfg.noise.consistency == "kl"
    assert searched_kinds([user_kind]) == ["dynamic", "freelb", "gaussian", "laplace", "noisefit", "noisytune",
                                           "symnoise", "triangular", "uniform", "uniform_kl"]

    class Trial:
        params: dict = {}
        user_attrs: dict = {}

        def suggest_categorical(self, name, choices):
            self.params[name] = "triangular" if name == "noise" else choices[0]
            return self.params[name]

        def suggest_float(self, name, low, high, log=False):
            self.params[name] = (low, high, log)

    trial = Trial()
    noise_magnitude(OmegaConf.create({"hydra": {"searchpath": [user_kind]}}), trial)
    assert trial.params == {"noise": "triangular", "noise.alpha": (1.0, 4.0, False)}
