"""The metrics that are computed here rather than by the Trainer, and batched greedy generation."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from conftest import TINY, compose_cfg
from neftlab import evaluation, guards, models, pipeline
from neftlab.config import EvalConfig
from neftlab.data import DataError
from neftlab.rundir import RunFiles


def chat(text):
    return [{"role": "user", "content": text}]


# Prompts of very different lengths, so that batches are left-padded a lot.
PROMPTS = [(chat("word " * k + "?"), f"reference {k}") for k in (1, 30, 5, 12, 2, 7)]


@pytest.fixture(scope="module")
def lively():
    """A tiny random llama whose answers depend on the prompt (the default init answers everything alike)."""
    cfg = compose_cfg("model=llama_tiny", "+model.arch_config.initializer_range=1.0").model
    tokenizer = models.load_tokenizer(cfg)
    return models.load_model(cfg, tokenizer).eval(), tokenizer


def test_measures_on_hand_made_answers():
    answers = [[5, 6, 7, 8, 5, 6, 7, 8], [1, 2, 3, 4, 5], [9, 9]]
    m = evaluation.measures(answers, ["a b c", "d e", ""], ["max_new_tokens", "eos", "eos"])
    # The first answer repeats 3 of its 7 bigrams, 2 of its 6 trigrams, 1 of its 5 4-grams; [9, 9] has no 4-gram.
    assert m["eval/rep_2"] == pytest.approx((3 / 7 + 0) / 2)
    assert m["eval/rep_3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["eval/rep_4"] == pytest.approx((1 / 5 + 0) / 2)
    assert m["eval/diversity"] == pytest.approx(((1 - 3 / 7) * (1 - 1 / 3) * (1 - 1 / 5) + 1) / 2)
    assert m["eval/distinct_2"] == pytest.approx(9 / 12) and m["eval/distinct_4"] == pytest.approx(6 / 7)
    assert m["eval/response_length"] == 5 and m["eval/response_words"] == pytest.approx(5 / 3)
    assert m["eval/hit_max_new_tokens"] == pytest.approx(1 / 3)
    assert math.isnan(evaluation.measures([[1, 2]], ["x"], ["eos"])["eval/diversity"])
    assert evaluation.distinct_n([[1]], 2) == 0.0


def test_batches_group_prompts_by_length_at_most_half_padding():
    lengths = [10, 11, 100, 12, 200]
    assert evaluation._batches([0, 1, 2, 3, 4], lengths, size=2) == [[0, 1], [3, 2], [4]]
    assert evaluation._batches([0, 1, 2, 3, 4], lengths, size=16) == [[0, 1, 3], [2, 4]]  # 4 x 100 > 2 x 133


def test_batched_generation_equals_one_prompt_at_a_time(lively):
    """The reference: model.generate on each prompt alone, unpadded. The end token is also the pad token, as in
    SmolLM2, and is one the model does produce, so rows stop at different steps inside a batch."""
    model, tokenizer = lively
    cfg = EvalConfig(max_new_tokens=10, batch_size=4)

    def alone(messages):
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, use_cache=True,
                             repetition_penalty=cfg.repetition_penalty, pad_token_id=tokenizer.pad_token_id)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    stop = alone(PROMPTS[0][0])[3]
    prompt_ids = evaluation.encode_prompts(tokenizer, PROMPTS, room=None)[0]
    assert not any(stop in ids for ids in prompt_ids)  # else plain generate would penalise it, and ours not
    generation_config, pad = model.generation_config.eos_token_id, tokenizer.pad_token
    model.generation_config.eos_token_id, tokenizer.pad_token = stop, tokenizer.convert_ids_to_tokens(stop)
    try:
        reference = [alone(messages) for messages, _ in PROMPTS]
        samples, metrics = evaluation.generate(model, tokenizer, PROMPTS, cfg, step=7)
    finally:
        model.generation_config.eos_token_id, tokenizer.pad_token = generation_config, pad
    assert tokenizer.padding_side == "right"  # left padding was for generation only
    for sample, ref in zip(samples, reference):
        tokens = ref[: ref.index(stop)] if stop in ref else ref
        assert sample["generation"] == tokenizer.decode(tokens, skip_special_tokens=True)
        assert sample["tokens"] == len(tokens) and sample["stop"] == ("eos" if stop in ref else "max_new_tokens")
    assert {s["stop"] for s in samples} == {"eos", "max_new_tokens"}
    assert [s["prompt_id"] for s in samples] == list(range(len(PROMPTS))) and {s["step"] for s in samples} == {7}
    assert [s["reference"] for s in samples] == [r for _, r in PROMPTS]
    assert metrics["eval/response_length"] == pytest.approx(np.mean([s["tokens"] for s in samples]))


def test_repetition_penalty_spares_padding_and_the_end_token():
    penalty = evaluation.RepetitionPenalty(2.0, padding=torch.tensor([1, 0]), stop_ids={2})
    scores = penalty(torch.tensor([[3, 0, 2], [0, 1, 2]]), torch.tensor([[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, -4.0]]))
    # Row 0: token 3 is padding, 0 was said, 2 ends; row 1: 0 and 1 were said.
    assert scores.tolist() == [[2.0, 4.0, 4.0, 4.0], [2.0, 2.0, 4.0, -4.0]]


def test_prompts_are_cut_from_the_left_to_fit_the_context(llama_tokenizer):
    cfg = compose_cfg("model=llama_tiny", "model.arch_config.max_position_embeddings=64").model
    model = models.load_model(cfg, llama_tokenizer).eval()
    prompts = [(chat("word " * 200), ""), (chat("hi"), "")]
    full, cut = evaluation.encode_prompts(llama_tokenizer, prompts, room=None)
    ids, truncated = evaluation.encode_prompts(llama_tokenizer, prompts, room=56)
    assert cut == 0 and truncated == 1
    assert ids == [full[0][-56:], full[1]]  # the end, with the assistant marker, is kept
    samples, metrics = evaluation.generate(model, llama_tokenizer, prompts, EvalConfig(max_new_tokens=8), step=0)
    assert metrics["eval/prompts_truncated"] == 1 and len(samples) == 2


def test_samples_are_appended_across_evaluations(tmp_path, lively):
    model, tokenizer = lively
    files, cfg = RunFiles(tmp_path), EvalConfig(max_new_tokens=4, batch_size=2)
    for step in (3, 6):
        files.append_samples(evaluation.generate(model, tokenizer, PROMPTS[:3], cfg, step)[0])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt_id"]) for r in rows] == [(3, 0), (3, 1), (3, 2), (6, 0), (6, 1), (6, 2)]
    assert set(rows[0]) == {"prompt_id", "step", "stage", "prompt", "reference", "generation", "tokens", "stop"}
    assert rows[0]["prompt"] == PROMPTS[0][0] and rows[0]["tokens"] == 4 and rows[0]["stop"] == "max_new_tokens"


@pytest.mark.parametrize("sharded", [False, True])
def test_ranks_answer_every_world_th_prompt_and_gather_in_order(monkeypatch, lively, sharded):
    """A fake world of 2: each rank's part is caught at the gather, then handed to rank 0 as the gather would."""
    model, tokenizer = lively
    cfg = EvalConfig(max_new_tokens=5, batch_size=2)
    prompts = PROMPTS[:5]
    alone, _ = evaluation.generate(model, tokenizer, prompts, cfg, step=1)

    class Gathered(Exception):
        pass

    def catch(value, group):
        raise Gathered(value)
    batches, decode = [], evaluation._continue

    def unsynced(model, tokenizer, ids, max_new_tokens, penalty, synced, **kwargs):
        batches[-1].append((len(ids), synced))  # synced_gpus would need a real process group
        return decode(model, tokenizer, ids, max_new_tokens, penalty, False, **kwargs)
    monkeypatch.setattr(evaluation, "_continue", unsynced)
    monkeypatch.setattr(evaluation, "_sharded", lambda m: sharded)
    monkeypatch.setattr(evaluation, "all_max", lambda values, distributed: [3])  # the most batches of any rank
    monkeypatch.setattr(evaluation, "all_gather", catch)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(evaluation, "world", lambda: (rank, 2))
        batches.append([])
        with pytest.raises(Gathered) as e:
            evaluation.generate(model, tokenizer, prompts, cfg, step=1)
        parts.append(e.value.args[0])
    assert sorted(parts[0]) == [0, 2, 4] and sorted(parts[1]) == [1, 3]
    # Sharded by FSDP2, every forward pass needs both ranks: each runs the most batches of any rank (3 here), the
    # missing ones on prompt 0 alone, keeping nothing.
    unsharded = [[(2, False), (1, False)], [(2, False)]]
    assert batches == ([[(2, True), (1, True), (1, True)]] * 2 if sharded else unsharded)
    monkeypatch.setattr(evaluation, "all_gather", lambda value, group: parts)
    gathered, _ = evaluation.generate(model, tokenizer, prompts, cfg, step=1)
    assert gathered == alone


def test_activation_checkpointing_keeps_the_kv_cache_for_generation(tmp_path):
    """Trained with trainer.args.activation_checkpointing=true (LoRA, config.use_cache=False, checkpointing on) and
    called in train mode, as in the middle of training: generation feeds one new token per step and answers
    as decoding without any cache does. In train mode the checkpointed layers would drop the cache while
    generate still fed one token, and answer nonsense."""
    cfg = compose_cfg(*TINY, "model=llama_tiny", "logger=none", "model.lora.enabled=true",
                      "trainer.args.activation_checkpointing=true")
    with guards.GracefulStop() as stopper:
        built = pipeline.build(cfg, RunFiles(tmp_path), stopper, resume=None)
        pipeline.train(built, stopper, resume=None)
    model, tokenizer, prompts = built.model, built.tokenizer, built.data.prompts[:2]
    assert model.base_model.model.is_activation_checkpointing and not model.config.use_cache
    model.train()
    lengths = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: lengths.append(args[0].shape))
    samples, _ = evaluation.generate(model, tokenizer, prompts, cfg.eval, step=2)
    assert model.training  # back in train mode
    assert lengths[0][1] > 1 and all(shape == (2, 1) for shape in lengths[1:])
    model.eval()
    for (messages, _), sample in zip(prompts, samples):
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False, use_cache=False,
                             repetition_penalty=cfg.eval.repetition_penalty)
        assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == sample["generation"]


def test_generate_every_eval_answers_at_each_evaluation_once(tmp_path):
    files = RunFiles(tmp_path)
    pipeline.run(compose_cfg(*TINY, "model=llama_tiny", "logger=none", "trainer.eval_steps=1",
                           "eval.generate_every_eval=true"), files)
    files.finish("completed")
    steps = Counter(json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines())
    assert steps == {1: 2, 2: 2}  # step 2, the last, is the final evaluation's only
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/diversity" in m] == [1, 2]
    assert [m["step"] for m in metrics if "efficiency/latency_ms_per_token" in m] == [2]


def test_latency_is_timed_alone_at_batch_size_one(monkeypatch, lively):
    model, tokenizer = lively
    calls, decode = [], evaluation._continue

    def spy(model, tokenizer, prompts, max_new_tokens, *args, **kwargs):
        calls.append((len(prompts), max_new_tokens, kwargs.get("min_new_tokens")))
        return decode(model, tokenizer, prompts, max_new_tokens, *args, **kwargs)
    monkeypatch.setattr(evaluation, "_continue", spy)
    m = evaluation.decoding_latency(model, tokenizer, PROMPTS, EvalConfig(max_new_tokens=300))
    n = evaluation.LATENCY_TOKENS
    assert calls == [(1, 2, 2)] + [(1, n, n)] * evaluation.LATENCY_PROMPTS  # a warm-up, then the timed prompts
    assert m["efficiency/latency_ms_per_token"] > 0
    assert evaluation.decoding_latency(model, tokenizer, [], EvalConfig()) == {}


def test_prompts_file_in_the_alpaca_eval_layout(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Red.", "generator": "gpt4"},
                                {"instruction": "Translate", "input": "chat"}, {"instruction": "Third"}]))
    prompts = evaluation.select_prompts(EvalConfig(prompts=str(path), num_generations=2), held_out=[])
    assert prompts == [(chat("Name a colour."), "Red."), (chat("Translate\n\nchat"), "")]
    assert len(evaluation.select_prompts(EvalConfig(num_generations=None), held_out=PROMPTS)) == len(PROMPTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "fine"}) + "\n" + json.dumps({"prompt": "no instruction"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}: row 1 has no column 'instruction'"):
        evaluation.select_prompts(EvalConfig(prompts=str(bad)), held_out=[])
    with pytest.raises(DataError, match="eval.prompts=.*missing.json: no such file"):
        evaluation.select_prompts(EvalConfig(prompts=str(tmp_path / "missing.json")), held_out=[])


def test_next_token_accuracy_counts_response_tokens_only():
    labels = np.array([[-100, -100, 7, 8, -100]])
    preds = np.array([[0, 7, 0, 1, 1]])  # position t predicts token t+1: 7 right, 8 wrong
    assert evaluation.next_token_accuracy(EvalPrediction(preds, labels)) == {"accuracy": 0.5}


def test_classification_accuracy_and_macro_f1():
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1]])
    labels = np.array([0, 1, 0, 1])
    m = evaluation.classification_metrics(EvalPrediction(logits, labels))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_stability_window_std_and_half_drop_step():
    losses = [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.1), (5, 2.0)]
    m = evaluation.stability(losses, window=3)
    assert m["stability/loss_std"] == pytest.approx(np.std([2.5, 2.1, 2.0], ddof=1))
    assert m["stability/half_drop_step"] == 2  # half of the 2.0 drop is reached at 3.0
    assert "stability/half_drop_step" not in evaluation.stability([(1, 1.0), (2, 2.0)], 3)


def test_parameter_counts_count_tied_weights_once_and_zeros():
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = lin.weight
    with torch.no_grad():
        lin.weight[0] = 0
    m = evaluation.parameter_counts(model)
    assert m == {"efficiency/total_params": 16, "efficiency/nonzero_params": 12, "efficiency/param_reduction": 0.25}


def test_noise_off_train_loss_is_the_loss_without_noise(tmp_path, llama_tokenizer):
    """The subset's loss is what the model gives with no noise hook at all, however large alpha is."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from neftlab import data, noise
    cfg = compose_cfg("model=llama_tiny", "data.max_samples=48", "data.eval_size=8", "data.max_length=64")
    prepared = data.prepare(cfg.data, llama_tokenizer, True, seed=0)
    model = models.load_model(cfg.model, llama_tokenizer)
    logged = []
    callback = evaluation.NoiseOffTrainLoss(prepared.train, 4, seed=0, log_event=lambda s, m: logged.append(m))
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                      data_collator=DataCollatorForSeq2Seq(llama_tokenizer, label_pad_token_id=-100),
                      eval_dataset=prepared.eval, callbacks=[callback])
    callback.trainer = trainer
    trainer.evaluate()
    with noise.attach(model, "uniform", alpha=1e4):
        trainer.evaluate()
    expected = trainer.evaluate(callback.subset, metric_key_prefix="subset")["subset_loss"]  # no hook attached
    assert len(callback.subset) == 4
    assert [m["eval/train_loss_noise_off"] for m in logged[:2]] == pytest.approx([expected] * 2, rel=1e-6)
    assert logged[0]["eval/generalization_gap"] == pytest.approx(
        trainer.evaluate()["eval_loss"] - expected, rel=1e-6)


def test_peak_memory_is_the_process_own_not_its_launchers(tmp_path):
    """A job's efficiency/peak_memory_mb must not be its launcher's peak: ru_maxrss carries over fork and exec."""
    import resource
    import subprocess
    import sys
    ballast = bytearray(600 * 2**20)  # the launcher's peak, well above a bare child's
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = ("import resource; from neftlab.evaluation import peak_rss; "
            "print(peak_rss() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    launcher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del ballast
    assert own < launcher - 300, (own, inherited, launcher)
