"""Batched greedy generation: equal to one prompt at a time, cut to fit, gathered over ranks, timed alone."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tests.helpers import TINY, compose_cfg
from neftlab import models
from neftlab.config import EvalConfig
from neftlab.core.rundir import RunFiles
from neftlab.data import DataError
from neftlab.evaluation import generation
from neftlab.run import pipeline
from neftlab.run.signals import GracefulStop


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


def test_batches_group_prompts_by_length_at_most_half_padding():
    lengths = [10, 11, 100, 12, 200]
    assert generation._batches([0, 1, 2, 3, 4], lengths, size=2) == [[0, 1], [3, 2], [4]]
    assert generation._batches([0, 1, 2, 3, 4], lengths, size=16) == [[0, 1, 3], [2, 4]]  # 4 x 100 > 2 x 133


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
    prompt_ids = generation.encode_prompts(tokenizer, PROMPTS, room=None)[0]
    assert not any(stop in ids for ids in prompt_ids)  # else plain generate would penalise it, and ours not
    generation_config, pad = model.generation_config.eos_token_id, tokenizer.pad_token
    model.generation_config.eos_token_id, tokenizer.pad_token = stop, tokenizer.convert_ids_to_tokens(stop)
    try:
        reference = [alone(messages) for messages, _ in PROMPTS]
        samples, metrics = generation.generate(model, tokenizer, PROMPTS, cfg, step=7)
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
    penalty = generation.RepetitionPenalty(2.0, padding=torch.tensor([1, 0]), stop_ids={2})
    scores = penalty(torch.tensor([[3, 0, 2], [0, 1, 2]]), torch.tensor([[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 4.0, -4.0]]))
    # Row 0: token 3 is padding, 0 was said, 2 ends; row 1: 0 and 1 were said.
    assert scores.tolist() == [[2.0, 4.0, 4.0, 4.0], [2.0, 2.0, 4.0, -4.0]]


def test_prompts_are_cut_from_the_left_to_fit_the_context(llama_tokenizer):
    cfg = compose_cfg("model=llama_tiny", "model.arch_config.max_position_embeddings=64").model
    model = models.load_model(cfg, llama_tokenizer).eval()
    prompts = [(chat("word " * 200), ""), (chat("hi"), "")]
    full, cut = generation.encode_prompts(llama_tokenizer, prompts, room=None)
    ids, truncated = generation.encode_prompts(llama_tokenizer, prompts, room=56)
    assert cut == 0 and truncated == 1
    assert ids == [full[0][-56:], full[1]]  # the end, with the assistant marker, is kept
    samples, metrics = generation.generate(model, llama_tokenizer, prompts, EvalConfig(max_new_tokens=8), step=0)
    assert metrics["eval/prompts_truncated"] == 1 and len(samples) == 2


def test_samples_are_appended_across_evaluations(tmp_path, lively):
    model, tokenizer = lively
    files, cfg = RunFiles(tmp_path), EvalConfig(max_new_tokens=4, batch_size=2)
    for step in (3, 6):
        files.append_samples(generation.generate(model, tokenizer, PROMPTS[:3], cfg, step)[0])
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
    alone, _ = generation.generate(model, tokenizer, prompts, cfg, step=1)

    class Gathered(Exception):
        pass

    def catch(value, group):
        raise Gathered(value)
    batches, decode = [], generation._continue

    def unsynced(model, tokenizer, ids, max_new_tokens, penalty, synced, **kwargs):
        batches[-1].append((len(ids), synced))  # synced_gpus would need a real process group
        return decode(model, tokenizer, ids, max_new_tokens, penalty, False, **kwargs)
    monkeypatch.setattr(generation, "_continue", unsynced)
    monkeypatch.setattr(generation, "_sharded", lambda m: sharded)
    monkeypatch.setattr(generation, "all_max", lambda values, distributed: [3])  # the most batches of any rank
    monkeypatch.setattr(generation, "all_gather", catch)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(generation, "world", lambda: (rank, 2))
        batches.append([])
        with pytest.raises(Gathered) as e:
            generation.generate(model, tokenizer, prompts, cfg, step=1)
        parts.append(e.value.args[0])
    assert sorted(parts[0]) == [0, 2, 4] and sorted(parts[1]) == [1, 3]
    # Sharded by FSDP2, every forward pass needs both ranks: each runs the most batches of any rank (3 here), the
    # missing ones on prompt 0 alone, keeping nothing.
    unsharded = [[(2, False), (1, False)], [(2, False)]]
    assert batches == ([[(2, True), (1, True), (1, True)]] * 2 if sharded else unsharded)
    monkeypatch.setattr(generation, "all_gather", lambda value, group: parts)
    gathered, _ = generation.generate(model, tokenizer, prompts, cfg, step=1)
    assert gathered == alone


def test_activation_checkpointing_keeps_the_kv_cache_for_generation(tmp_path):
    """Trained with trainer.args.activation_checkpointing=true (LoRA, config.use_cache=False, checkpointing on) and
    called in train mode, as in the middle of training: generation feeds one new token per step and answers
    as decoding without any cache does. In train mode the checkpointed layers would drop the cache while
    generate still fed one token, and answer nonsense."""
    cfg = compose_cfg(*TINY, "model=llama_tiny", "logger=none", "model.lora.enabled=true",
                      "+trainer.args.activation_checkpointing=true")
    with GracefulStop() as stopper:
        built = pipeline.build(cfg, RunFiles(tmp_path), stopper, resume=None)
        pipeline.train(built, stopper, resume=None)
    model, tokenizer, prompts = built.model, built.tokenizer, built.data.prompts[:2]
    assert model.base_model.model.is_activation_checkpointing and not model.config.use_cache
    model.train()
    lengths = []
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: lengths.append(args[0].shape))
    samples, _ = generation.generate(model, tokenizer, prompts, cfg.eval, step=2)
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
    # each generation marked unfinished as its answers are written, and finished once its stage is done with it
    assert [(m["step"], m["stage"], m["answers_finished"]) for m in metrics if "answers_finished" in m] == [
        (1, "train", False), (1, "train", True), (2, "final", False), (2, "final", True)]


def test_latency_is_timed_alone_at_batch_size_one(monkeypatch, lively):
    model, tokenizer = lively
    calls, decode = [], generation._continue

    def spy(model, tokenizer, prompts, max_new_tokens, *args, **kwargs):
        calls.append((len(prompts), max_new_tokens, kwargs.get("min_new_tokens")))
        return decode(model, tokenizer, prompts, max_new_tokens, *args, **kwargs)
    monkeypatch.setattr(generation, "_continue", spy)
    m = generation.decoding_latency(model, tokenizer, PROMPTS, EvalConfig(max_new_tokens=300))
    n = generation.LATENCY_TOKENS
    assert calls == [(1, 2, 2)] + [(1, n, n)] * generation.LATENCY_PROMPTS  # a warm-up, then the timed prompts
    assert m["efficiency/latency_ms_per_token"] > 0
    assert generation.decoding_latency(model, tokenizer, [], EvalConfig()) == {}


def test_prompts_file_in_the_alpaca_eval_layout(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Red.", "generator": "gpt4"},
                                {"instruction": "Translate", "input": "chat"}, {"instruction": "Third"}]))
    prompts = generation.select_prompts(EvalConfig(prompts=str(path), num_generations=2), held_out=[])
    assert prompts == [(chat("Name a colour."), "Red."), (chat("Translate\n\nchat"), "")]
    assert len(generation.select_prompts(EvalConfig(num_generations=None), held_out=PROMPTS)) == len(PROMPTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "fine"}) + "\n" + json.dumps({"prompt": "no instruction"}) + "\n")
    with pytest.raises(DataError, match=f"{bad}: row 1 has no column 'instruction'"):
        generation.select_prompts(EvalConfig(prompts=str(bad)), held_out=[])
    with pytest.raises(DataError, match="eval.prompts=.*missing.json: no such file"):
        generation.select_prompts(EvalConfig(prompts=str(tmp_path / "missing.json")), held_out=[])
