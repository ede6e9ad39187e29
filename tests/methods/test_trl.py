"""`neftlab.noise_for` in the real thing: TRL's SFTTrainer packing padding-free (what its collator passes to the
model, and the noise each packed sequence gets, next to `neftune_noise_alpha`'s), the HF Trainer with padding and
left padding, ranks, the refusals, a run saved and reloaded, the runner's noise on the same batch, and the import
without Hydra or W&B. docs/trl.md's example runs here as written."""

import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from transformers import (AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)
from trl import SFTConfig, SFTTrainer

import neftlab
from neftlab.methods import factory
from neftlab.methods.noise import DrawnNoise, NoiseError, attach
from tests.helpers import ROOT, compose_cfg

DIM, ALPHA = 64, 5.0
PAGE = (ROOT / "docs" / "trl.md").read_text()
EXAMPLE = re.search(r"```python\n(.*?)```", PAGE, re.S).group(1)
MODEL_NAME = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
NOISE_LINE = 'noise = neftlab.noise_for(trainer, "uniform", alpha=5.0)'
DATA = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}."}  # the docs' example's
        for a in (1, 20, 300, 4000) for b in (5, 60, 700, 8000)]


class Ones(DrawnNoise):
    """A user's own kind: unit noise 1 everywhere, so each token's noise is exactly its scale."""

    name = "ones"

    def sample(self, shape, generator, device):
        return torch.ones(shape, device=device)


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=DIM, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama_tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(llama_tokenizer).save_pretrained(path)
    llama_tokenizer.save_pretrained(path)
    return path


def sft(model, tokenizer, out, peft_config=None, **args) -> SFTTrainer:
    """The docs' packed, padding-free SFTTrainer on its data, in fp32 on the CPU."""
    config = SFTConfig(output_dir=str(out), packing=True, max_length=256, per_device_train_batch_size=4,
                       max_steps=2, report_to="none", bf16=False, use_cpu=True, **{"save_strategy": "no", **args})
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(DATA), processing_class=tokenizer,
                      peft_config=peft_config)


class Recorder:
    """Each training forward's noise, from global module hooks, which see every model a script builds and run
    before a module's own hooks: the embedding's clean output, then the first decoder layer's input (the noised
    embeddings), then the model's own inputs."""

    def __enter__(self):
        self.forwards, self._clean, self._noise = [], None, None
        self._handles = [register_module_forward_hook(self._embedded), register_module_forward_pre_hook(self._layer),
                         register_module_forward_hook(self._model, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _embedded(self, module, args, output):
        if isinstance(module, torch.nn.Embedding) and module.training:
            self._clean = output.detach().float()

    def _layer(self, module, args):
        if self._clean is not None and type(module).__name__ == "LlamaDecoderLayer":
            self._noise, self._clean = args[0].detach().float() - self._clean, None

    def _model(self, module, args, kwargs, output):
        if self._noise is not None and "labels" in kwargs:
            self.forwards.append((self._noise, kwargs))
            self._noise = None


def sequences(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each sequence of a padding-free row: its position ids restart at 0."""
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(zip(starts, starts[1:]))


def largest(noise: torch.Tensor, spans) -> list[float]:
    return [noise[0, a:b].abs().max().item() for a, b in spans]


def run_example(code: str, model_dir, cwd, monkeypatch) -> tuple[dict, list]:
    """The docs' block, run in this process from `cwd`, with the tiny model's directory for the model's name."""
    assert code.count(MODEL_NAME) == 1
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    with Recorder() as recorder:
        exec(compile(code.replace(MODEL_NAME, repr(str(model_dir))), str(ROOT / "docs" / "trl.md"), "exec"),
             namespace)
    return namespace, recorder.forwards


def test_the_docs_example_gives_each_packed_sequence_its_own_scale_and_neftune_alpha_the_rows(model_dir, tmp_path,
                                                                                              monkeypatch):
    """The page's example as written, and with transformers' `neftune_noise_alpha=5.0` in place of the noise_for
    line: on the same first batch (one padding-free row), each sequence's largest |noise| reaches alpha/sqrt(L_i d)
    with neftlab, alpha/sqrt(T d) with transformers' hook (T the row's length). `-s` prints them side by side."""
    assert EXAMPLE.count(NOISE_LINE) == 1 and EXAMPLE.count('report_to="none"') == 1
    ours, forwards = run_example(EXAMPLE, model_dir, tmp_path / "neftlab", monkeypatch)
    hf_code = EXAMPLE.replace(NOISE_LINE, "").replace('report_to="none"', 'report_to="none", neftune_noise_alpha=5.0')
    theirs, hf_forwards = run_example(hf_code, model_dir, tmp_path / "neftune", monkeypatch)
    assert ours["trainer"].state.global_step == theirs["trainer"].state.global_step == 2
    assert len(forwards) == len(hf_forwards) == 2

    (noise, inputs), (hf_noise, hf_inputs) = forwards[0], hf_forwards[0]
    positions = inputs["position_ids"][0].tolist()
    assert hf_inputs["position_ids"][0].tolist() == positions  # the same batch, seeded alike
    # What TRL 1.16's padding-free collator passes: one row, position ids restarting at each sequence, the varlen
    # boundaries computed from them, and no attention mask.
    spans = sequences(positions)
    assert inputs["input_ids"].shape == (1, len(positions)) and "attention_mask" not in inputs
    assert inputs["cu_seq_lens_q"].tolist() == [a for a, _ in spans] + [len(positions)]
    row = len(positions)
    lengths = [b - a for a, b in spans]
    assert len(lengths) == len(DATA) and len(set(lengths)) > 1  # every example, in one flattened row

    mine, hf = largest(noise, spans), largest(hf_noise, spans)
    print(f"\nT = {row}, d = {DIM}, alpha = {ALPHA}, {len(lengths)} sequences")
    print("L_i  neftlab max|noise|  alpha/sqrt(L_i d)  neftune_noise_alpha max|noise|  alpha/sqrt(T d)")
    for n in sorted(set(lengths)):
        pick = [i for i, length in enumerate(lengths) if length == n]
        print(f"{n:3d}  {min(mine[i] for i in pick):.4f}-{max(mine[i] for i in pick):.4f}  "
              f"{ALPHA / math.sqrt(n * DIM):.4f}  {min(hf[i] for i in pick):.4f}-{max(hf[i] for i in pick):.4f}  "
              f"{ALPHA / math.sqrt(row * DIM):.4f}")
    for n, m, h in zip(lengths, mine, hf):
        assert 0.97 < m / (ALPHA / math.sqrt(n * DIM)) <= 1 + 1e-5
        assert 0.97 < h / (ALPHA / math.sqrt(row * DIM)) <= 1 + 1e-5
    assert ours["noise"].padded_ratio < 0.5  # the run's own log of it: the row's scale over the sequences'

    # Saved: the weights alone, which reload into a model with no hook
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "neftlab" / "sft-neftlab")
    assert not hasattr(saved.get_input_embeddings(), "_neftlab_noise")
    assert torch.equal(saved.get_input_embeddings().weight, ours["trainer"].model.get_input_embeddings().weight)


def test_the_readmes_recipe_is_the_docs_example_run_here():
    """Its lines are the docs' example's, which the test above runs."""
    readme = (ROOT / "README.md").read_text().split("## Recipes")[1].split("## Documentation")[0]
    (recipe,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert NOISE_LINE in recipe and [line for line in recipe.splitlines() if line not in EXAMPLE.splitlines()] == []


def test_a_kind_of_ones_gets_each_sequence_length_exactly_from_position_ids_or_cu_seq_lens(llama_tokenizer, tmp_path):
    """A user's own kind, on a padding-free batch of TRL's collator: every token's noise is alpha/sqrt(L_i d) of its
    own sequence. The same without position ids, from `cu_seq_lens_q` alone (transformers' flattening collator
    with return_position_ids=False)."""
    model = tiny_llama(llama_tokenizer)
    trainer = sft(model, llama_tokenizer, tmp_path)
    noise = neftlab.noise_for(trainer, Ones, alpha=ALPHA)
    assert noise in trainer.callback_handler.callbacks and noise.name == "ones"
    batch = next(iter(trainer.get_train_dataloader()))
    flattened = DataCollatorWithFlattening(return_position_ids=False, return_flash_attn_kwargs=True)(
        [{"input_ids": batch["input_ids"][0, a:b].tolist()} for a, b in sequences(batch["position_ids"][0].tolist())])
    assert "position_ids" not in flattened and "attention_mask" not in flattened
    for inputs in (batch, flattened):
        assert_each_sequence_gets_its_own_scale(model, inputs)


def assert_each_sequence_gets_its_own_scale(model, inputs):
    """With the kind of ones: every token's noise is alpha/sqrt(L_i d), L_i its sequence's span of cu_seq_lens."""
    with Recorder() as recorder:
        model.train()(**inputs)
    ((added, _),) = recorder.forwards
    row = inputs["input_ids"].shape[1]
    cu = inputs["cu_seq_lens_q"].tolist()
    expected = torch.cat([torch.full((b - a,), ALPHA / math.sqrt((b - a) * DIM)) for a, b in zip(cu, cu[1:])])
    assert cu[-1] == row and torch.allclose(added[0], expected[:, None].expand(row, DIM), rtol=1e-4, atol=0)


def test_a_lora_model_gets_the_noise_on_its_base_embedding(llama_tokenizer, tmp_path):
    """SFTTrainer wraps the model in PEFT's LoRA: noise_for reaches the base model's embedding through it."""
    from peft import LoraConfig, PeftModel
    trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path,
                  peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, PeftModel)
    neftlab.noise_for(trainer, Ones, alpha=ALPHA)
    assert_each_sequence_gets_its_own_scale(trainer.model, next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("side, positions", [("right", None), ("left", None), ("left", "cumsum"),
                                             ("left", "fill_one")])
def test_padded_and_left_padded_rows_get_their_real_lengths(llama_tokenizer, tmp_path, side, positions):
    """The HF Trainer with a padded batch: each row's real tokens get alpha/sqrt(L_i d), its padding none, also left
    padded, with or without position ids as left-padded batches write them (0 or 1 on the padding)."""
    model = tiny_llama(llama_tokenizer)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    neftlab.noise_for(trainer, "symnoise", alpha=ALPHA)  # +-1: every noised value is its scale exactly
    lengths = [3, 7, 12]
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    mask = mask.flip(1) if side == "left" else mask
    inputs = {"input_ids": torch.randint(5, 400, mask.shape), "attention_mask": mask, "labels": None}
    if positions is not None:
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0) if positions == "cumsum" else \
            (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    with Recorder() as recorder:
        model.train()(**inputs)
    ((added, _),) = recorder.forwards
    scale = torch.tensor([ALPHA / math.sqrt(n * DIM) for n in lengths])[:, None] * mask
    assert torch.allclose(added.abs(), scale[:, :, None].expand_as(added), rtol=1e-4, atol=0)


def runner_noise(model, batch, rank: int, seed: int) -> torch.Tensor:
    """The noise the runner's `noise=uniform noise.alpha=5.0 seed=<seed>` adds on rank `rank` to `batch`."""
    cfg = compose_cfg("noise=uniform", f"noise.alpha={ALPHA}", f"seed={seed}")
    factory.build(model, cfg.noise, cfg.pruning, cfg.seed, rank, fresh=True, log_event=lambda *a: None)
    return added(model, batch)


def added(model, batch) -> torch.Tensor:
    with Recorder() as recorder:
        model.train()(**batch)
    ((noise, _),) = recorder.forwards
    return noise


def test_the_api_draws_the_runners_noise_on_the_same_batch_and_each_rank_its_own(llama_tokenizer, tmp_path):
    """On TRL's padding-free batch, `noise_for` on rank r with seed s adds to the bit the noise the runner adds on
    rank r with seed=s; ranks differ. (A trainer's rank is `args.process_index`: rank 1 is a stand-in here.)"""
    trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path, seed=7)
    batch = next(iter(trainer.get_train_dataloader()))
    neftlab.noise_for(trainer, "uniform", alpha=ALPHA)
    api = added(trainer.model, batch)
    assert torch.equal(api, runner_noise(tiny_llama(llama_tokenizer), batch, rank=0, seed=7))
    rank1 = SimpleNamespace(model=tiny_llama(llama_tokenizer), add_callback=lambda callback: None,
                            args=SimpleNamespace(seed=7, process_index=1, neftune_noise_alpha=None))
    neftlab.noise_for(rank1, "uniform", alpha=ALPHA)
    api1 = added(rank1.model, batch)
    assert torch.equal(api1, runner_noise(tiny_llama(llama_tokenizer), batch, rank=1, seed=7))
    assert not torch.equal(api, api1)


DDP = """
import sys, torch, neftlab
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
data = [{"input_ids": row, "labels": row} for row in torch.arange(64).view(8, 8)]
args = TrainingArguments(output_dir=sys.argv[1], max_steps=1, per_device_train_batch_size=2, seed=3,
                         report_to="none", use_cpu=True, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=data)
noise = neftlab.noise_for(trainer, "uniform", alpha=5.0)
seen = []
model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append((i[0], o - m.weight[i[0]])))
trainer.train()
torch.save({"world": args.world_size, "ids": seen[0][0], "noise": seen[0][1].detach()},
           f"{sys.argv[1]}/rank{args.process_index}.pt")
"""


@pytest.mark.slow
def test_each_ddp_rank_draws_the_runners_noise_for_its_rank(tmp_path):
    """Two ranks under torchrun (gloo): each rank's noise_for draws, on its own batch, the noise the runner draws on
    that rank with the same seed, and the ranks' streams differ."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for rank, seen in enumerate(ranks):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
        batch = {"input_ids": seen["ids"], "labels": seen["ids"]}
        assert torch.allclose(seen["noise"], runner_noise(model, batch, rank=rank, seed=3), rtol=0, atol=1e-6)
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])


def test_two_steps_train_save_and_reload_with_no_noise_at_evaluation(llama_tokenizer, tmp_path):
    """The noise moves the training loss and the weights train, its schedule moved by the trainer's steps (the kind
    is among its callbacks); evaluation sees none (the same loss twice, and the same as with the noise removed),
    and the saved model reloads without a hook, to the same evaluation loss."""
    trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path)
    trainer.eval_dataset = trainer.train_dataset
    before = trainer.model.get_input_embeddings().weight.detach().clone()
    noise = neftlab.noise_for(trainer, "uniform", alpha=ALPHA, schedule="linear")
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trainer.model.train()
        noisy, noisy_again = trainer.model(**batch).loss, trainer.model(**batch).loss
    assert noisy != noisy_again  # fresh noise at each training forward
    trainer.train()
    assert noise.alpha == ALPHA * (1 - 1 / 2)  # linear, set before the second of two steps
    assert not torch.equal(before, trainer.model.get_input_embeddings().weight)
    evaluated = [trainer.evaluate()["eval_loss"] for _ in range(2)]
    trainer.save_model(str(tmp_path / "saved"))
    noise.remove()
    assert evaluated[0] == evaluated[1] == trainer.evaluate()["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert not hasattr(model.get_input_embeddings(), "_neftlab_noise")
    reloaded = sft(model, llama_tokenizer, tmp_path / "reloaded")
    reloaded.eval_dataset = reloaded.train_dataset
    assert reloaded.evaluate()["eval_loss"] == pytest.approx(evaluated[0], rel=1e-6)


def test_a_resumed_run_draws_the_noise_the_uninterrupted_one_drew(llama_tokenizer, tmp_path):
    """Each checkpoint holds the noise's stream (a file per rank); resuming from it, the second step's noise is the
    uninterrupted run's second, to the bit."""
    def train(resume) -> list:
        trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path, save_strategy="steps", save_steps=1)
        neftlab.noise_for(trainer, "uniform", alpha=ALPHA)
        with Recorder() as recorder:
            trainer.train(resume_from_checkpoint=resume)
        return [noise for noise, _ in recorder.forwards]

    whole = train(None)
    assert (tmp_path / "checkpoint-1" / "neftlab_noise_rank0.pt").is_file()
    shutil.rmtree(tmp_path / "checkpoint-2")
    resumed = train(True)
    assert len(whole) == 2 and len(resumed) == 1 and torch.equal(resumed[0], whole[1])


def one_line_error(call) -> str:
    with pytest.raises(NoiseError) as raised:
        call()
    assert "\n" not in str(raised.value)
    return str(raised.value)


def test_neftune_noise_alpha_with_the_api_is_refused_in_one_line(llama_tokenizer, tmp_path):
    """Set in the trainer's args, refused by noise_for; attached by the trainer's train() after neftlab's noise,
    refused by neftlab's hook at the first training forward: the noise is never applied twice."""
    trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path, neftune_noise_alpha=5.0)
    message = one_line_error(lambda: neftlab.noise_for(trainer, "uniform", alpha=ALPHA))
    assert message.startswith("neftune_noise_alpha=5.0 is set in the trainer's args")
    assert not hasattr(trainer.model.get_input_embeddings(), "_neftlab_noise")
    attach(trainer.model, "uniform", alpha=ALPHA)  # neftlab's noise without noise_for, then the trainer's own
    message = one_line_error(trainer.train)
    assert message.startswith("this embedding already has noise attached")


@pytest.mark.parametrize("kind, keys, why", [
    ("freelb", {}, "needs each batch's passes (2) driven and reset by neftlab.methods.passes.PassesTrainer"),
    ("freelb", {"adv_steps": 1}, "needs each batch's passes (1) driven"),
    ("uniform", {"antithetic": True}, "with antithetic=True trains each batch twice"),
    ("gaussian", {"consistency": "kl"}, "computes its own training loss"),
    ("noisytune", {}, "changes the pretrained weights once before training"),
    ("noisefit", {}, "computes its own training loss"),
])
def test_the_kinds_that_need_the_runner_are_refused_in_one_line_and_leave_no_hook(llama_tokenizer, tmp_path, kind,
                                                                                   keys, why):
    trainer = sft(tiny_llama(llama_tokenizer), llama_tokenizer, tmp_path)
    callbacks = list(trainer.callback_handler.callbacks)
    message = one_line_error(lambda: neftlab.noise_for(trainer, kind, **keys))
    assert message.startswith(f"noise kind {kind} {why}") and message.endswith(f"python -m neftlab noise={kind})")
    assert not hasattr(trainer.model.get_input_embeddings(), "_neftlab_noise")
    assert trainer.callback_handler.callbacks == callbacks
    neftlab.noise_for(trainer, "uniform")  # nothing left behind in the way


BLOCKED = """
import importlib.abc, importlib.machinery, sys

class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    '''Found, so that a library that only looks for them (accelerate looks for wandb) goes on; never loaded.'''
    names = ("hydra", "wandb", "optuna", "neftlab.run", "neftlab.tracking")
    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError(f"blocked: {spec.name}")
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Blocked())
import neftlab
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
trainer = Trainer(model=model, args=TrainingArguments(output_dir=sys.argv[1], report_to="none", use_cpu=True))
noise = neftlab.noise_for(trainer, "uniform", alpha=5.0)
model.train()(input_ids=__import__("torch").arange(8)[None])
loaded = sorted(m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in Blocked.names))
print(type(noise).__name__, noise.mean_magnitude > 0, loaded)
"""


def test_the_api_imports_and_runs_without_hydra_wandb_or_the_runner(tmp_path):
    """The process boundary is the subject: what a fresh script loads."""
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "Uniform True []"
