"""The CPU FSDP2 lane: a tiny LLaMA (tied and untied) sharded with `fully_shard` on a 2-process CPU mesh (gloo),
in accelerate's layout (each decoder layer a unit; embedding, output layer and final norm one unit kept unsharded
after its forward; then the root). accelerate shards only on GPUs, so this is how FSDP2's code paths run here:
pruning's targets, the weight check, the dynamic statistic, the unpruned-latency refill and synced generation,
each against the same model in one process. With two GPUs the same checks run over NCCL on a CUDA mesh
(`pytest -m gpu`)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import spawn
from neftlab.evaluation import generation
from neftlab.methods import noise, pruning
from neftlab.methods.noise.dynamic import stability
from neftlab.methods.noise.freelb import FreeLB
from neftlab.methods.pruner import PruningCallback
from neftlab.run import nonfinite
from neftlab.run.checkpoint import StateCheckpoint
from neftlab.config import EvalConfig, PruningConfig

SIZE = dict(vocab_size=503, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256)  # an odd vocabulary: uneven shards
PRUNINGS = [("l1", "embedding"), ("l2", "embedding"), ("l1", "all_linear"), ("l2", "all_linear")]
IDS = [[5, 9, 11, 2, 7], [3, 1, 4, 1, 5]]
PROMPTS = [[5, 9, 11, 2], [7, 3], [8, 8, 1, 4, 6]]  # 3 prompts over 2 ranks: one rank answers 2, the other 1
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two GPUs")])]  # gloo on a CPU mesh; NCCL on two GPUs


def tiny(tied: bool, device: str = "cpu") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **SIZE)).eval().to(device)


def shard_like_accelerate(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard([model.model.embed_tokens, model.lm_head, model.model.norm], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


class Tokenizer:
    """Just what greedy generation reads of a tokenizer."""
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def pad(self, batch, padding_side, return_tensors):
        rows = batch["input_ids"]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        return _Batch(input_ids=ids, attention_mask=(torch.arange(width) >= width - torch.tensor(
            [len(r) for r in rows])[:, None]).long())


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def answers(model) -> list[str]:
    """Greedy answers to PROMPTS (their token ids) through generation's own batching (and, under FSDP2, its synced
    decoding)."""
    original = generation.encode_prompts
    generation.encode_prompts = lambda tokenizer, prompts, room: (PROMPTS, 0)
    try:
        samples, _ = generation.generate(model, Tokenizer(), [([], "")] * len(PROMPTS), EvalConfig(
            max_new_tokens=6, batch_size=2, repetition_penalty=1.0), step=0)
    finally:
        generation.encode_prompts = original
    return [s["generation"] for s in sorted(samples, key=lambda s: s["prompt_id"])]


def lane(rank, world, store, device, checks, results):
    """A rank of the lane: each of `checks`, (name, check, tied, expected), as `check(model, rank, tied, expected)`
    on a fresh sharded model, on a CPU mesh over gloo or a CUDA one over NCCL (a GPU a rank). All in one pair of
    processes, since starting them is most of the time; each check's outcome goes to results/<name>-<rank> ("ok",
    or its traceback), and the first that fails ends the rank. The model (and FSDP's references to the group) is
    freed before the group is destroyed: the other order crashes a rank at exit."""
    import gc
    import traceback
    from torch.distributed.device_mesh import init_device_mesh
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    model = None
    try:
        for name, check, tied, expected in checks:
            try:
                model = tiny(tied, device)
                shard_like_accelerate(model, init_device_mesh(device, (world,)))
                check(model, rank, tied, expected)
            except BaseException:
                (results / f"{name}-{rank}").write_text(traceback.format_exc())
                raise
            (results / f"{name}-{rank}").write_text("ok")
            model = None
            gc.collect()
            dist.barrier()
    finally:
        del model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def expected_shards(tied: bool, device: str) -> dict:
    model = tiny(tied, device)
    return {"linear": len(pruning.targets(model, "all_linear")), "tied": pruning.output_tied(model),
            "stability": stability(model.get_input_embeddings().weight)}


@pytest.fixture(scope="module", params=DEVICES)
def lane_results(request, tmp_path_factory):
    """Every check of this file on one device, each against what one process gives, in one spawn of 2 ranks."""
    device, folder = request.param, tmp_path_factory.mktemp("fsdp")
    checks = [("row shards tied", worker, True, expected_shards(True, device)),
              ("row shards untied", worker, False, expected_shards(False, device)),
              ("synced generation", generate_worker, True, answers(tiny(True, device))),
              ("state", state_worker, True, expected_state(device, folder))]
    try:
        spawn(lane, folder / "store", device, checks, folder, timeout=480)  # four checks: each spawn had 240 s
    except (Exception, pytest.fail.Exception):
        pass  # each test reads its check's outcome, and says why it has none
    return folder


def passed(results, name: str) -> None:
    for rank in (0, 1):
        outcome = results / f"{name}-{rank}"
        assert outcome.exists(), f"{name}: not run on rank {rank}: an earlier check failed there, or the rank died"
        assert outcome.read_text() == "ok", outcome.read_text()


def worker(model, rank, tied, expected):
    # pruning's all_linear scope keeps every Linear weight (a DTensor's data_ptr() is 0 for all of them)
    assert len(pruning.targets(model, "all_linear")) == expected["linear"]
    assert pruning.output_tied(model) == expected["tied"]
    assert stability(model.get_input_embeddings().weight) == pytest.approx(expected["stability"], rel=1e-5)
    # the unpruned-latency refill reaches the forward, although the embedding unit stays unsharded after one
    pruner = PruningCallback(model, PruningConfig(kind="l1", ratio=0.5), lambda step, m: None)
    pruner.weights = pruning.targets(model, "embedding")
    pruner.prune(0)
    ids = torch.tensor([[5, 9, 11, 2, 7]], device=model.device)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
        with pruner.dense():
            dense = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(dense, pruned) and torch.allclose(again, pruned)
    # a NaN in one rank's rows stops every rank before a save, not just that one
    q = model.model.layers[0].self_attn.q_proj.weight
    if rank == 1:
        with torch.no_grad():
            q.to_local()[0, 0] = float("nan")
    with pytest.raises(nonfinite.NonFiniteError, match="layers.0.self_attn.q_proj.weight holds NaN/inf at step 3"):
        nonfinite.check_finite_weights(model, 3)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp2_row_shards_give_the_single_process_results(lane_results, tied):
    expected = expected_shards(tied, "cpu")
    assert expected["linear"] == 14 and expected["tied"] == tied
    passed(lane_results, f"row shards {'tied' if tied else 'untied'}")


def generate_worker(model, rank, tied, expected):
    assert answers(model) == expected  # every forward a collective: both ranks step until both are done


@pytest.mark.slow
def test_synced_generation_with_unequal_prompt_counts_gives_the_single_process_answers(lane_results):
    passed(lane_results, "synced generation")


def pruned(model, method: str, scope: str) -> tuple[PruningCallback, dict]:
    """The model pruned at 30 % as a run's first step prunes it, and the metrics it logs."""
    logged = {}
    pruner = PruningCallback(model, PruningConfig(kind=method, ratio=0.3, scope=scope),
                                     lambda step, metrics: logged.update(metrics))
    pruner.on_train_begin(None, SimpleNamespace(global_step=0), None)
    return pruner, logged


def noised_logits(model, seed: int) -> torch.Tensor:
    """Training-mode logits with uniform noise from its own stream `seed` (no dropout in this LLaMA)."""
    model.train()
    with noise.attach(model, "uniform", alpha=5.0, seed=seed) as hook, torch.no_grad():
        hook._mask = torch.ones(len(IDS), len(IDS[0]), dtype=torch.long, device=model.device)
        logits = model(input_ids=torch.tensor(IDS, device=model.device)).logits
    model.eval()
    return logits


def freelb_grads(model, sharded: bool) -> list[torch.Tensor]:
    """The parameters' gradients after one FreeLB batch of K = 2 passes as PassesTrainer takes them: the first
    without gradient sync (accelerate's `no_sync` under FSDP2), delta ascended between them."""
    model.train()
    hook = FreeLB.attach(model, adv_init_mag=5.0, seed=7, adv_steps=2, adv_lr=0.1)
    hook._mask = torch.ones(len(IDS), len(IDS[0]), dtype=torch.long, device=model.device)
    ids = torch.tensor(IDS, device=model.device)
    try:
        for k in range(2):
            if sharded:
                model.set_requires_gradient_sync(k == 1)
            (model(input_ids=ids, labels=ids).loss / 2).backward()
            if k == 0:
                hook.ascend()
    finally:
        hook.reset()
        hook.remove()
        model.eval()
    return [full(p.grad) for p in model.parameters()]


def full(w: torch.Tensor) -> torch.Tensor:
    return (w.full_tensor() if hasattr(w, "full_tensor") else w).detach().cpu()


def state_worker(model, rank, tied, expected):
    """Noise and FreeLB on the sharded model, each pruning kind and scope, and the pruning state through a
    checkpoint: each as the single process has it."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(model.device.type, (dist.get_world_size(),))

    def sharded():
        m = tiny(tied, model.device.type)
        shard_like_accelerate(m, mesh)
        return m
    # every rank draws the same noise from the same seed, so the sharded forward is the single one
    assert torch.allclose(noised_logits(model, 7).cpu(), expected["noised"], atol=1e-5)
    # FreeLB's K passes, the first unsynced: every rank saw the same batch, so the gradients are the single one's
    grads = freelb_grads(sharded(), sharded=True)
    assert len(grads) == len(expected["freelb"])
    assert all([torch.allclose(g, want, atol=1e-6, rtol=1e-4) for g, want in zip(grads, expected["freelb"])])
    for (method, scope), (weights, sparsity) in zip(PRUNINGS, expected["pruned"]):
        m = sharded()
        pruner, logged = pruned(m, method, scope)
        assert logged["pruning/sparsity"] == sparsity, (method, scope)
        assert all([torch.equal(full(w), want) for w, want in zip(pruner.weights, weights)]), (method, scope)
        # saved at a checkpoint (each rank its masks' shard), restored into a fresh model as a resume does
        folder = expected["dir"] / f"{method}_{scope}"
        state = SimpleNamespace(global_step=5, is_world_process_zero=rank == 0)
        hook = noise.attach(m, "uniform", seed=rank)
        StateCheckpoint([hook, pruner], keep=None).on_save(
            SimpleNamespace(output_dir=str(folder), world_size=dist.get_world_size()), state, None)
        hook.remove()
        dist.barrier()
        again = sharded()
        restored = PruningCallback(again, PruningConfig(kind=method, ratio=0.3, scope=scope),
                                           lambda step, metrics: None)
        hook = noise.attach(again, "uniform", seed=rank)
        StateCheckpoint([hook, restored], keep=None).load(folder / "checkpoint-5")
        hook.remove()
        restored.on_train_begin(None, state, None)
        # (every rank gathers every weight: all() must not stop one rank's collectives early)
        assert all([torch.equal(full(w), want) for w, want in zip(restored.weights, weights)]), (method, scope)


def expected_state(device: str, folder) -> dict:
    expected = {"noised": noised_logits(tiny(True, device), 7).cpu(), "dir": folder, "pruned": [],
                "freelb": freelb_grads(tiny(True, device), sharded=False)}
    for method, scope in PRUNINGS:
        pruner, logged = pruned(tiny(True, device), method, scope)
        expected["pruned"].append(([w.detach().cpu().clone() for w in pruner.weights], logged["pruning/sparsity"]))
    return expected


@pytest.mark.slow
def test_noise_freelb_pruning_and_their_checkpoint_state_under_fsdp2_equal_the_single_process(lane_results):
    passed(lane_results, "state")
