"""Hyperparameter search: the job's objective, Optuna's directions from the same keys, failed trials, resuming
a study, and the report's trials and Pareto front."""

import json
import math
import re

import pytest
from hydra import compose, initialize_config_dir

from neftlab.analysis.comparison import write_report
from neftlab.analysis.search import pareto_front
from neftlab.config import ConfigError
from neftlab.config import objectives as search
from tests.helpers import CONF, ROOT, cli, compose_cfg


@pytest.mark.parametrize("search_name, option", [("neftune_search", "neftune"), ("sparse_neft_search", "sparse_neft"),
                                                 ("perturbation_search", "perturbations"),
                                                 ("overfit_search", "overfit")])
@pytest.mark.parametrize("size, name", [([], "cpu"), (["size=tiny"], "tiny"), (["size=gpu"], "gpu")])
def test_each_size_has_a_study_of_its_own(search_name, option, size, name):
    """A tiny dry run must not leave trials in the real study, nor continue one."""
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", [f"hparams_search={option}", *size], return_hydra_config=True)
    assert cfg.hydra.sweeper.study_name == f"{search_name}_{name}"
    assert cfg.hydra.sweeper.storage == f"sqlite:///outputs/experiments/{search_name}_{name}/study.db"


def test_the_overfit_search_is_the_perturbation_search_in_the_overfit_studys_regime_at_one_seed():
    """hparams_search=overfit takes experiment=overfit's set-up but not its grid of seeds and arms (set to "", which
    the sweeper leaves out), and optimizes the best held-out loss during training."""
    from neftlab.sweep.study import StudySweeperImpl
    with initialize_config_dir(config_dir=CONF):
        search_cfg = compose("config", ["hparams_search=overfit"], return_hydra_config=True)
        study_cfg = compose("config", ["experiment=overfit"], return_hydra_config=True)
    for key in ("data", "trainer", "pruning"):
        assert search_cfg[key] == study_cfg[key]
    assert list(search_cfg.search.objectives) == ["eval/best_loss"] and search_cfg.eval.num_generations == 0
    assert search_cfg.hydra.sweeper.custom_search_space == "neftlab.config.spaces.noise_magnitude"
    sweeper = StudySweeperImpl.__new__(StudySweeperImpl)
    sweeper.params = search_cfg.hydra.sweeper.params
    assert dict(sweeper.params) == {"seed": "", "noise": ""} and sweeper._parse_sweeper_params_config() == []
    sweeper.params = {"seed": "", "noise": "choice(uniform,laplace)"}
    assert sweeper._parse_sweeper_params_config() == ["noise=choice(uniform,laplace)"]


def test_objective_is_one_float_a_list_or_none():
    summary = {"status": "completed", "eval/loss": 2.5, "pruning/sparsity": 0.3}
    assert search.objective(summary, ["eval/loss"]) == 2.5
    assert search.objective(summary, ["eval/loss", "pruning/sparsity"]) == [2.5, 0.3]
    assert search.objective({**summary, "status": "failed"}, ["eval/loss"]) is None
    assert search.objective(summary, ["judge/win_rate"]) is None  # no judge ran: not a zero
    assert search.objective({**summary, "eval/loss": math.nan}, ["eval/loss"]) is None
    unpruned = {"status": "completed", "eval/loss": 2.5}  # pruning off: it logs no pruning figures
    assert search.objective(unpruned, ["eval/loss", "pruning/sparsity"]) == [2.5, 0.0]


def test_quality_is_the_win_rate_with_a_judge_else_the_loss():
    assert search.objective_keys(["quality", "pruning/sparsity"], judged=False) == ["eval/loss", "pruning/sparsity"]
    assert search.objective_keys(["quality"], judged=True) == ["judge/win_rate"]


@pytest.mark.parametrize("overrides, directions", [
    (["hparams_search=neftune"], ["minimize"]),
    (["hparams_search=neftune", "eval.judge.model=judge"], ["maximize"]),
    (["hparams_search=sparse_neft"], ["minimize", "maximize"]),
    (["hparams_search=sparse_neft", "eval.judge.model=judge"], ["maximize", "maximize"]),
])
def test_sweeper_directions_follow_the_objectives(overrides, directions):
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "neftlab.sweep.sweeper.StudySweeper"
    assert list(cfg.hydra.sweeper.direction) == directions


@pytest.mark.parametrize("objectives, message", [
    ("[eval/los]", "search.objectives[0]='eval/los' is not allowed: one of quality, eval/loss"),
    ("[]", "search.objectives=[] is not allowed: at least one of quality"),
    ("[quality,quality]", "is not allowed: each objective once"),
])
def test_bad_objectives_name_the_key(objectives, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_cfg(f"search.objectives={objectives}")


def test_pareto_front():
    points = [[1.0, 0.1], [2.0, 0.5], [1.5, 0.05], [3.0, 0.5]]  # loss (min), sparsity (max)
    assert pareto_front(points, ["minimize", "maximize"]) == [True, True, False, False]
    assert pareto_front([[2.0], [1.0], [1.0]], ["minimize"]) == [False, True, True]


# A trial as short as these tests need: one step and no answers (each objective is read from the held-out loss and
# the pruning figures, and what a search records and reports does not depend on how long its runs trained).
SHORT = ["trainer.max_steps=1", "eval.num_generations=0"]


def _study(storage: str):
    import optuna
    return optuna.load_study(study_name="neftune_search_tiny", storage=storage)


@pytest.mark.slow
def test_the_report_names_each_kinds_best_trial_with_its_settings(tmp_path):
    from neftlab.analysis.runs import Run
    from neftlab.analysis.search import best_of_each_option

    def trial(kind, value, *keys):
        return Run(tmp_path, [f"noise={kind}", *keys, "size=tiny"], {}, {"noise": {"kind": kind}}), [value]
    done = [trial("gaussian", 1.80, "noise.alpha=3"), trial("gaussian", 1.78, "noise.alpha=12"),
            trial("noisytune", 1.79, "noise.intensity=0.2"), trial("gaussian", 1.70, "noise.alpha=2")]
    done[-1][0].overrides[0] = "noise=gaussian_kl"  # a preset of kind gaussian: a choice of its own
    table = "\n".join(best_of_each_option(done, ("eval/best_loss",), -1.0))
    assert ("| gaussian_kl | 1.7000 | `noise=gaussian_kl noise.alpha=2` |\n"
            "| gaussian | 1.7800 | `noise=gaussian noise.alpha=12` |\n| noisytune | 1.7900 |") in table
    assert best_of_each_option(done[:2], ("eval/best_loss",), -1.0) == []  # one kind: the best trial says it all


def test_search_records_failed_trials_goes_on_and_resumes(tmp_path):
    """Three trials, one of which fails its config check (the seeded random sampler draws alpha 5, 1, -1), then
    the same study taken to four in all (a sampler seeded to draw 5): n_trials is the study's total."""
    storage = f"sqlite:///{tmp_path}/study.db"
    common = ["-m", "hparams_search=neftune", "size=tiny", *SHORT, "logger=none", f"hydra.sweeper.storage={storage}",
              "noise=uniform", "noise.alpha=choice(1,5,-1)"]
    proc, _ = cli(*common, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=1", "hydra.sweeper.n_trials=3",
                  f"hydra.sweep.dir={tmp_path}/first", out_dir=tmp_path / "unused")
    assert proc.returncode == 1 and "1 job(s) failed" in proc.stderr, proc.stderr[-3000:]
    assert "noise.alpha=-1" in proc.stderr
    trials = _study(storage).trials
    assert sorted((t.params["noise.alpha"], t.state.name) for t in trials) == [
        (-1, "FAIL"), (1, "COMPLETE"), (5, "COMPLETE")]
    loss = {t.params["noise.alpha"]: t.value for t in trials if t.value is not None}
    for run in (tmp_path / "first").glob("*/summary.json"):
        summary = json.loads(run.read_text())
        if summary["status"] == "completed":
            assert summary["eval/loss"] in loss.values()  # the objective is the run's own held-out loss

    proc, _ = cli(*common, "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=4",
                  f"hydra.sweep.dir={tmp_path}/second", out_dir=tmp_path / "unused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(storage).trials
    assert len(trials) == 4  # continued, not started over

    text = write_report(tmp_path).read_text()
    assert "## Search: eval/loss" in text and "4 trials, 3 with values" in text
    values = [t.value for t in trials if t.value is not None]
    assert text.count("| ✓ |") == values.count(min(values))  # the best trial, and any other with its value


@pytest.mark.slow
def test_multi_objective_search_gives_a_pareto_front(tmp_path):
    proc, _ = cli("-m", "hparams_search=sparse_neft", "size=tiny", *SHORT, "logger=none", "hydra.sweeper.n_trials=3",
                  f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", f"hydra.sweep.dir={tmp_path}/sweep",
                  out_dir=tmp_path / "unused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml
    solutions = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["solutions"]
    assert solutions and all(len(s["values"]) == 2 for s in solutions)
    text = write_report(tmp_path / "sweep").read_text()
    assert "## Search: eval/loss, pruning/sparsity" in text and "3 trials, 3 with values" in text
    assert text.count("| ✓ |") == len(solutions)  # the report's front is Optuna's
    assert (tmp_path / "sweep" / "search_front.png").is_file()


@pytest.mark.slow
def test_a_damaged_study_database_stops_in_one_line(tmp_path):
    (tmp_path / "study.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)  # a header, then nothing
    proc, _ = cli("-m", "hparams_search=neftune", "size=tiny", "logger=none", "hydra.sweeper.n_trials=1",
                  f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", f"hydra.sweep.dir={tmp_path}/sweep",
                  out_dir=tmp_path / "unused")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: the study database {tmp_path}/study.db is damaged")
    assert not list((tmp_path / "sweep").glob("*/summary.json"))


@pytest.mark.slow
def test_the_perturbation_search_chooses_among_every_kind_with_its_own_magnitude(tmp_path):
    """Its space holds every kind file with a space (none has none) and every preset that opens keys of its own
    (uniform_kl: the consistency term's weight); each trial's parameters are its option and that option's own space
    only (a conditional space), and each trial trains as the option drawn, with the values drawn."""
    import yaml
    from neftlab.config.noise import kind_class, option_node
    from neftlab.config.spaces import searched_kinds
    assert searched_kinds([]) == ["dynamic", "freelb", "gaussian", "laplace", "noisefit", "noisytune", "symnoise",
                                  "uniform", "uniform_kl"]
    proc, _ = cli("-m", "hparams_search=perturbations", "size=tiny", *SHORT, "logger=none", "hydra.sweeper.n_trials=2",
                  "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=7",
                  f"hydra.sweeper.storage=sqlite:///{tmp_path}/study.db", f"hydra.sweep.dir={tmp_path}/sweep",
                  out_dir=tmp_path / "unused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import optuna
    trials = optuna.load_study(study_name="perturbation_search_tiny", storage=f"sqlite:///{tmp_path}/study.db").trials
    assert len(trials) == 2
    for t in trials:
        node = option_node(t.params["noise"])
        own = [f"noise.{p.key}" for p in kind_class(node).search_space(node)]
        assert sorted(t.params) == sorted(["noise", *own])  # no other kind's magnitude drawn
        (job,) = [d for d in (tmp_path / "sweep").iterdir() if (d / ".hydra" / "overrides.yaml").exists()
                  and f"noise={t.params['noise']}" in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())]
        noise = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["noise"]
        for name in own:
            assert noise[name.split(".", 1)[1]] == pytest.approx(t.params[name])
        assert json.loads((job / "summary.json").read_text())["eval/loss"] == pytest.approx(t.value)


@pytest.mark.parametrize("pruning, drawn", [("off", ["noise", "noise.alpha", "pruning"]),
                                            ("l1", ["noise", "noise.alpha", "pruning", "pruning.ratio"])])
def test_the_sparse_neft_space_draws_the_ratio_only_when_it_prunes(pruning, drawn):
    import optuna
    from neftlab.config import spaces
    trial = optuna.create_study().ask()
    trial.suggest_categorical("noise", ["uniform"])
    trial.suggest_categorical("pruning", [pruning])
    spaces.noise_and_pruning(None, trial)
    assert sorted(trial.params) == drawn and (pruning == "off" or 0.05 <= trial.params["pruning.ratio"] <= 0.7)

def test_a_search_without_multirun_is_refused_in_one_line(tmp_path):
    proc, _ = cli("hparams_search=neftune", "size=tiny", "logger=none", out_dir=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "Error: hparams_search=neftune is a sweep: run it with -m (python -m neftlab -m hparams_search=neftune ...)"]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_a_study_written_by_optuna_2_10_is_copied_aside_upgraded_and_continued(tmp_path):
    """tests/fixtures/optuna210_study.db: three trials of neftune_search_tiny, written by Optuna 2.10.1 (as
    neftlab's searches ran before they moved to Optuna 5)."""
    import shutil
    import sqlite3
    study = tmp_path / "study.db"
    shutil.copy(ROOT / "tests" / "fixtures" / "optuna210_study.db", study)
    proc, _ = cli("-m", "hparams_search=neftune", "size=tiny", *SHORT, "logger=none", "hydra.sweeper.n_trials=4",
                  f"hydra.sweeper.storage=sqlite:///{study}", f"hydra.sweep.dir={tmp_path}/sweep",
                  out_dir=tmp_path / "unused")
    assert proc.returncode == 0, proc.stderr[-3000:]
    backup = tmp_path / "study.db.optuna-2.10.1.bak"
    assert f"Upgraded the study database {study}, set up by Optuna 2.10.1" in proc.stderr and backup.is_file()
    with sqlite3.connect(backup) as db:  # the copy is the study as Optuna 2.10 left it
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "v2.6.0.a"
    import optuna
    trials = optuna.load_study(study_name="neftune_search_tiny", storage=f"sqlite:///{study}").trials
    assert [t.number for t in trials] == [0, 1, 2, 3] and trials[0].params["noise"] == "gaussian"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_the_same_seed_and_finished_trials_draw_the_same_next_trial():
    """As the sweeper asks: a TPE sampler of `hydra.sweeper.sampler.seed`, over a study holding the same finished
    trials (past TPE's 10 start-up trials), proposes the same next trial in two separate processes' studies."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    space = {"noise": CategoricalDistribution(["uniform", "gaussian", "dynamic"]),
             "noise.alpha": FloatDistribution(1, 20, log=True)}
    finished = [optuna.trial.create_trial(params={"noise": ["uniform", "gaussian", "dynamic"][i % 3],
                                                  "noise.alpha": 1.0 + i * 1.5},
                                          distributions=space, value=10.0 - 0.1 * i) for i in range(12)]
    drawn = []
    for _ in range(2):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=5))
        study.add_trials(finished)
        trial = study.ask()
        drawn.append({name: trial._suggest(name, d) for name, d in space.items()})
    assert drawn[0] == drawn[1]


def _docs_search_commands(section: str) -> list[list[str]]:
    """The `python -m neftlab -m ...` commands of a docs/sweeps.md section, as overrides (continuations joined)."""
    text = (ROOT / "docs" / "sweeps.md").read_text().split(section)[1].split("\n- **")[0]
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    commands = [line.split("python -m neftlab -m", 1)[1].split(">")[0].split() for line in lines
                if "python -m neftlab -m" in line]
    return commands


def test_the_slurm_recipes_compose_to_a_shared_study():
    """The SLURM recipes compose to neftlab's sweeper on one journal study (tests/run/test_slurm.py runs them, sized
    tiny, on a one-node cluster)."""
    commands = _docs_search_commands("**A search on a SLURM cluster**")
    assert len(commands) == 2
    for overrides in commands:
        with initialize_config_dir(config_dir=CONF):
            cfg = compose("config", overrides, return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_ == "neftlab.sweep.sweeper.StudySweeper" and sweeper.n_trials == 30
        assert sweeper.storage == "journal:/shared/neftlab/neftune_search.journal" and sweeper.sampler.constant_liar
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")  # the sbatch sweepers run their trials in-process
    with initialize_config_dir(config_dir=CONF):
        first = compose("config", commands[0], return_hydra_config=True)
    assert first.hydra.launcher._target_.endswith("SlurmLauncher") and first.hydra.launcher.gpus_per_node == 1
