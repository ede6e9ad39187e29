"""The Sparse-NEFT plan as experiment configs: each composes, and its tiny variant runs end to end."""

import itertools
import json
import re

import pytest
from hydra import compose, initialize_config_dir

from neftlab.config import ConfigError
from neftlab.analysis.comparison import write_report
from tests.helpers import CONF, ROOT, compose_cfg, run

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
JOBS_AT_ONE_SEED = {"baselines": 4, "pruning_ratio": 3, "pruning_kind": 2, "pruning_interval": 3,
                    "alpha_sweep": 4, "dynamic_vs_static": 2, "neftune_repro": 4, "perturbations": 10, "overfit": 5}


def test_the_plan_is_all_there():
    assert set(EXPERIMENTS) == set(JOBS_AT_ONE_SEED)


@pytest.mark.parametrize("old, new", [
    ("method=original", "trainer.max_steps=0"), ("method=finetune", "the default (noise=none pruning=off)"),
    ("method=neftune", "noise=uniform"), ("method=pruning", "pruning=l1"), ("method=sparse_neft", "noise=uniform pruning=l1"),
    ("noise=dynamic_large", "noise=dynamic"), ("noise=symnoise_antithetic", "noise=symnoise noise.antithetic=true")])
def test_an_option_that_composed_another_options_run_names_its_one_spelling(old, new):
    with pytest.raises(ConfigError, match=rf"^{old}: {old} is now {re.escape(new)} \("):
        compose_cfg(old)


@pytest.mark.parametrize("override, message", [
    ("pruning.method=l1", "pruning.method=l1: pruning.method is now pruning.kind, the name of the option: pick it with "
     "pruning=l1"),
    ("pruning.kind=l2", "pruning.kind=l2: pruning.kind is the name of the option: pick it with pruning=l2")])
def test_a_pruning_kind_is_picked_by_its_option_only(override, message):
    """`pruning=off pruning.kind=l1` would be a second spelling of `pruning=l1`, as `pruning.method=l1` was."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        compose_cfg(override)


def test_a_run_saved_with_pruning_method_reads_with_pruning_kind():
    from neftlab.config.compose import renamed, upgraded
    saved = {"seed": 1, "pruning": {"method": "l2", "ratio": 0.3}}
    assert renamed(saved)["pruning"] == upgraded(saved)["pruning"] == {"kind": "l2", "ratio": 0.3}
    assert saved["pruning"] == {"method": "l2", "ratio": 0.3}  # the saved one is left as it is


def test_tiny_size_keeps_the_untouched_model_untrained():
    assert compose_cfg("trainer.max_steps=0", "size=tiny").trainer.max_steps == 0
    assert compose_cfg("experiment=pruning_ratio", "size=tiny").model.arch_config["hidden_size"] == 64


@pytest.mark.parametrize("launcher, target", [("parallel", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launchers_compose(launcher, target):
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", [f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 720


def sweep_jobs(experiment: str, *overrides: str) -> list[list[str]]:
    """The jobs the basic sweeper makes of an experiment: its params' grid, each point a list of overrides."""
    with initialize_config_dir(config_dir=CONF):
        cfg = compose("config", [f"experiment={experiment}", *overrides], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items() if k not in dict(
        o.split("=", 1) for o in overrides)}
    return [[f"{k}={v}" for k, v in zip(params, point)] for point in itertools.product(*params.values())]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_tiny_variant_runs_end_to_end(tmp_path, experiment):
    """Each job of the experiment's sweep, in this process (the sweep machinery itself: tests/run/test_search.py,
    tests/run/test_interrupts.py)."""
    jobs = sweep_jobs(experiment, "size=tiny", "seed=1")
    assert len(jobs) == JOBS_AT_ONE_SEED[experiment]
    for n, job in enumerate(jobs):
        outcome, summary = run(f"experiment={experiment}", "size=tiny", "seed=1", "logger=none", *job,
                               out_dir=tmp_path / str(n), root=tmp_path)
        assert summary["status"] == "completed", outcome.message
    if experiment == "baselines":  # noise x pruning: plain fine-tuning, NEFTune, pruning, Sparse-NEFT
        assert sorted(jobs) == sorted([f"noise={n}", f"pruning={p}"] for n in ("none", "uniform") for p in ("off", "l1"))
        assert write_report(tmp_path).read_text().count("| completed |") == 4


def test_the_tiny_size_shows_each_feature_act(tmp_path):
    """The headline command at size=tiny: dynamic alpha moves at every step, pruning re-prunes at every step, a
    gradual schedule ramps; at full size's intervals (100) none of it would happen within 4 steps."""
    outcome, summary = run("noise=dynamic", "pruning=l1", "pruning.schedule=gradual", "size=tiny", "logger=none",
                           out_dir=tmp_path)
    assert outcome.status == "completed", outcome.message
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    alphas = [e["noise/alpha"] for e in events if "noise/alpha" in e]
    assert [e["step"] for e in events if "noise/stability" in e] == [1, 2, 3, 4] and len(set(alphas)) >= 3
    sparsity = [(e["step"], e["pruning/sparsity"]) for e in events if "pruning/sparsity" in e]
    assert [step for step, _ in sparsity] == [0, 1, 2, 3, 4]
    assert [s for _, s in sparsity] == sorted(s for _, s in sparsity) and sparsity[-1][1] == pytest.approx(0.3, abs=1e-3)


def test_wandb_sweep_file_parses_and_every_command_composes():
    """The W&B agent runs `command` with ${args_no_hyphens} replaced by `key=value` for each grid point."""
    import itertools

    import yaml
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_grid.yaml").read_text())
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "eval/loss", "goal": "minimize"}
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "-m", "neftlab"] and command[-1] == "${args_no_hyphens}"
    names = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][n]["values"] for n in names)))
    assert len(grid) == 12
    for point in grid:
        args = [f"{n}={v}" for n, v in zip(names, point)]
        cfg = compose_cfg(*command[4:-1], *args)
        assert (cfg.noise.alpha, cfg.pruning.ratio) == point
        assert cfg.noise.kind == "uniform" and cfg.pruning.kind == "l1" and cfg.logger.kind == "wandb"


def test_the_overfit_study_evaluates_at_every_epoch_with_the_noise_off_training_loss(tmp_path):
    """experiment=overfit size=tiny: every epoch ends in an evaluation with the held-out loss, the noise-off
    training loss on a fixed subset and their gap; the antithetic arm trains too."""
    cfg = compose_cfg("experiment=overfit", "size=tiny")
    assert cfg.trainer.eval_steps == "epoch" and cfg.trainer.max_steps is None and cfg.data.max_length == 64
    assert compose_cfg("experiment=overfit").model.arch == "llama" and \
        compose_cfg("experiment=overfit", "size=gpu").data.max_samples == 640
    for n, arm in enumerate([["noise=none"], ["noise=symnoise", "noise.antithetic=true"]]):
        outcome, summary = run("experiment=overfit", "size=tiny", "logger=none", *arm,
                               out_dir=tmp_path / str(n), root=tmp_path)
        assert summary["status"] == "completed", outcome.message
    report = write_report(tmp_path).read_text()
    assert "| noise=symnoise,noise.antithetic=true | best eval loss during training | 1 |" in report
    assert "| noise=symnoise,noise.antithetic=true | epoch of the best eval loss | 1 |" in report
    assert "| noise=symnoise,noise.antithetic=true | generalization gap | 1 |" in report
    assert "![evaluations during training per arm" in report and (tmp_path / "epoch_curves.png").stat().st_size
    merged = {}
    for line in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") == "train":
            merged.setdefault(event["step"], {}).update(event)
    evaluations = [e for e in merged.values() if "eval/loss" in e]
    assert [e["train/epoch"] for e in evaluations] == [1.0, 2.0]
    for e in evaluations:
        assert e["eval/generalization_gap"] == pytest.approx(e["eval/loss"] - e["eval/train_loss_noise_off"])
