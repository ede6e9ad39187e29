"""A user's measure in config: `eval.measures` builds it from the user's module (named in $NEFTLAB_PLUGINS), refuses
what is not trusted or not a measure in one line, and makes it an objective a search can optimize."""

import re
import sys

import pytest
from hydra import compose, initialize_config_dir

from neftlab.config import ConfigError
from neftlab.core import measures
from tests.helpers import CONF, compose_cfg

PLUGIN = '''
from neftlab.core.measures import declare

@declare("eval/questions", "answers asking back", "minimize", "{:.2f}")
def questions(answers, mark="?"):
    return sum(mark in a["generation"] for a in answers) / len(answers)

@declare("eval/loss", "a second eval loss", "minimize")
def own_loss(answers):
    return 0.0

def plain():
    return 1.0
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The user's module `my_measures`, importable and named in $NEFTLAB_PLUGINS."""
    (tmp_path / "my_measures.py").write_text(PLUGIN)
    monkeypatch.delitem(sys.modules, "my_measures", raising=False)  # this test's own, not an earlier test's
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NEFTLAB_PLUGINS", "my_measures")
    return "my_measures"


def test_a_users_measure_is_built_with_its_parameters_and_registered(plugin):
    cfg = compose_cfg("eval.measures=[{_target_:my_measures.questions,mark:'!'}]")
    m = measures.get("eval/questions")
    assert (m.label, m.direction, m.fmt, m.stage, m.paired) == ("answers asking back", "minimize", "{:.2f}",
                                                                "answers", True)
    assert m.compute([{"generation": "Yes!"}, {"generation": "No?"}]) == 0.5
    assert cfg.eval.measures == [{"_target_": "my_measures.questions", "mark": "!"}]


def test_a_users_measure_is_an_objective_with_its_direction(plugin):
    """The sweeper's directions come from the same declaration, registered by the resolver itself."""
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", ["hparams_search=neftune", "search.objectives=[quality,eval/questions]",
                                 "eval.measures=[{_target_:my_measures.questions}]"], return_hydra_config=True)
        assert measures.get("eval/questions") is None  # composed, not yet resolved
        assert list(cfg.hydra.sweeper.direction) == ["minimize", "minimize"]
    assert compose_cfg("search.objectives=[eval/questions]",
                       "eval.measures=[{_target_:my_measures.questions}]").search.objectives == ["eval/questions"]


@pytest.mark.parametrize("entry, message", [
    ("{_target_:my_measures.plain}", "eval.measures[0]._target_=my_measures.plain is not a user's measure: decorate "
                                     "its function with neftlab.core.measures.declare(key, label, ...)"),
    ("{_target_:my_measures.own_loss}", "eval.measures[0]: eval/loss is a measure of neftlab's own (eval loss): give "
                                        "yours another key"),
    ("{_target_:my_measures.absent}", "eval.measures[0]._target_=my_measures.absent cannot be built: "),
    ("{_target_:my_measures.questions,colour:red}", "eval.measures[0]._target_=my_measures.questions cannot be built: "
                                                    "TypeError: got an unexpected keyword argument 'colour'"),
    ("plain", "eval.measures[0]='plain' is not allowed: a mapping with _target_: <module>.<name>"),
])
def test_what_is_not_a_users_measure_is_refused_in_one_line(plugin, entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        compose_cfg(f"eval.measures=[{entry}]")
    assert "\n" not in str(refused.value)


def test_a_module_the_environment_does_not_name_is_not_imported(plugin, monkeypatch):
    """A config alone (a run directory handed over) never makes neftlab import code."""
    monkeypatch.delenv("NEFTLAB_PLUGINS")
    with pytest.raises(ConfigError, match=re.escape(
            "eval.measures[0]._target_=my_measures.questions is not trusted: neftlab imports a config's code only "
            "from the modules the environment names, so name it: export NEFTLAB_PLUGINS=my_measures")):
        compose_cfg("eval.measures=[{_target_:my_measures.questions}]")
    assert "my_measures" not in sys.modules
