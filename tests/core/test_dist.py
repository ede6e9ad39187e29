"""Dynamic alpha and pruning on row-sharded weights (FSDP2's DTensor layout) in 2 CPU processes (gloo) give
exactly what one process gives on the whole matrix, also when the backend takes only tensors on another device
(as NCCL does); other layouts are refused before training; and DDP runs end to end under torchrun, on the CPU."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ROOT, TINY, spawn
from neftlab.config import PruningConfig
from neftlab.config.noise import typed
from neftlab.core import dist as sharding
from neftlab.methods import noise, pruning
from neftlab.methods.noise.dynamic import DynamicAlpha, stability
from neftlab.methods.pruner import PruningCallback
from neftlab.models import parameter_counts

ROWS, COLS = 1001, 48  # an odd row count: the shards are uneven
CPU_ONLY = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo tests: ranks must not share one GPU


def weights(step: int) -> torch.Tensor:
    """The embedding 'after step': a fixed sequence, so both layouts see the same weights."""
    g = torch.Generator().manual_seed(step)
    w = torch.randn(ROWS, COLS, generator=g) * (1 + step / 10) + step / 50
    w[::7] = 0.5  # ties at one value, spread over both shards
    return w


def alpha_trajectory(make_weight) -> list[float]:
    rule, alpha, trajectory = DynamicAlpha(typed({"kind": "dynamic", "alpha_step": 0.5, "stability_threshold": "auto"})), 5.0, []
    for step in range(6):
        alpha, _ = rule.next_alpha(alpha, stability(make_weight(step)))
        trajectory.append(alpha)
    return trajectory


def single_process_results():
    results = {"alpha": alpha_trajectory(weights), "stability": stability(weights(3))}
    for method, ratio in (("l1", 0.3), ("l1", 0.8), ("l2", 0.4)):
        w = weights(1)
        results[f"{method}-{ratio}"] = pruning.prune_(w, ratio, method).clone()
    return results


def act_as_nccl() -> list:
    """Make gloo behave like NCCL, which refuses tensors that are not on its CUDA device: the collectives' device
    is torch's lazy-tensor device, a second device that holds data without a GPU, and all_reduce rejects any
    tensor elsewhere (NCCL's "No backend type associated with device type cpu"). Returns the devices it saw."""
    import torch._lazy.ts_backend
    torch._lazy.ts_backend.init()
    device, seen, reduce = torch.device("lazy", 0), [], dist.all_reduce
    sharding.collective_device = lambda group: device

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        seen.append(tensor.device)
        if tensor.device != device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        on_cpu = tensor.cpu()
        reduce(on_cpu, op=op, group=group)
        tensor.copy_(on_cpu)
    dist.all_reduce = all_reduce
    return seen


def check_sharded(world, expected, like_nccl):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    backend = "like NCCL" if like_nccl else "gloo"
    reduced_on = act_as_nccl() if like_nccl else None
    mesh = init_device_mesh("cpu", (world,))
    shard = lambda w: distribute_tensor(w, mesh, [Shard(0)])  # noqa: E731
    assert alpha_trajectory(lambda step: shard(weights(step))) == expected["alpha"], backend
    assert stability(shard(weights(3))) == pytest.approx(expected["stability"], rel=1e-12), backend
    for method, ratio in (("l1", 0.3), ("l1", 0.8), ("l2", 0.4)):
        w = shard(weights(1))
        local_mask = pruning.prune_(w, ratio, method)
        masks = [None] * world
        dist.all_gather_object(masks, local_mask.contiguous())
        whole = torch.cat(masks)
        assert torch.equal(whole, expected[f"{method}-{ratio}"]), f"{backend}: {method} {ratio}"
        assert torch.equal(w.full_tensor() == 0, ~whole) or method == "l2"
        zeros = int((~whole).sum())
        exact = math.floor(ratio * ROWS * COLS) if method == "l1" else math.floor(ratio * ROWS) * COLS
        assert zeros == exact, f"{backend}: {method} {ratio}"
        model = torch.nn.Module()
        model.weight = torch.nn.Parameter(w)
        counts = parameter_counts(model)
        assert counts["efficiency/nonzero_params"] == int(torch.count_nonzero(w.full_tensor())), backend
    if like_nccl:  # the statistic, both pruning kinds' histograms and the counts all went through it
        assert len(reduced_on) > 10 and set(reduced_on) == {torch.device("lazy", 0)}


def worker(rank, world, store, expected):
    """Both backends in one pair of processes (starting them is most of the test's time): gloo as it is, then
    acting as NCCL, whose patches stay for the rest of the process."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for like_nccl in (False, True):
            check_sharded(world, expected, like_nccl)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_alpha_and_pruning_are_identical_in_one_and_two_processes_on_gloo_and_as_on_nccl(tmp_path):
    expected = single_process_results()
    assert len(set(expected["alpha"])) > 1  # the trajectory moves, so equality means something
    spawn(worker, tmp_path / "store", expected)


def test_collectives_go_to_the_device_their_backend_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the rank's GPU, which the Trainer sets
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    assert sharding.collective_device(object()) == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group: "gloo")
    assert sharding.collective_device(object()) == torch.device("cpu")


@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_layouts_other_than_row_sharding_are_refused_before_the_first_step(one_rank_mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(ROWS, COLS)
            self.embed.weight = torch.nn.Parameter(distribute_tensor(weights(1), one_rank_mesh, [Replicate()]))

        def get_input_embeddings(self):
            return self.embed

    model, begin = Model(), (None, SimpleNamespace(global_step=0), None)
    refused = r"placements \(Replicate\(\),\): neftlab supports FSDP2's row sharding \(Shard\(dim=0\),\) only"
    for method in ("l1", "l2"):
        with pytest.raises(sharding.UnsupportedLayoutError, match=refused):
            PruningCallback(model, PruningConfig(kind=method), lambda step, m: None).on_train_begin(*begin)
    for threshold in ("auto", 0.1):
        callback = noise.attach(model, "dynamic", stability_threshold=threshold)  # the kind is its own callback
        with pytest.raises(sharding.UnsupportedLayoutError, match="no hybrid sharding"):
            callback.on_train_begin(*begin)
        callback.remove()
    assert torch.equal(model.embed.weight.full_tensor(), weights(1))  # nothing pruned a copy
    # Counting only reads, so it takes any layout: the end of a run never fails on it.
    assert parameter_counts(model)["efficiency/nonzero_params"] == int(torch.count_nonzero(weights(1)))


@pytest.mark.slow
# freelb: K passes, the first K - 1 under no_sync; a symmetric consistency term: two forwards, one backward
@pytest.mark.parametrize("kind", ["uniform", "freelb", "uniform noise.consistency=symmetric"])
def test_ddp_with_two_processes_writes_one_set_of_run_files(tmp_path, kind):
    run_dir = tmp_path / "run"
    env = {**os.environ, **CPU_ONLY}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "neftlab",
                           f"hydra.run.dir={run_dir}", *TINY, "model=llama_tiny", *f"noise={kind}".split(),
                           "logger=wandb", "logger.mode=offline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == [1, 2]  # once, not once per rank
    # Data parallel: 2 ranks x batch 2 per step over the 22 training examples: 6 steps an epoch, not 11.
    assert summary["train/epoch"] == pytest.approx(2 / math.ceil(22 / (2 * 2)))
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert (run_dir / "neftlab.log").exists() and (run_dir / "neftlab-rank1.log").exists()


def test_each_rank_draws_its_own_noise():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).train()
    ids = torch.randint(0, 100, (2, 8))
    seen = []
    for seed in (0, 0, 1_000_003):  # rank 0 twice, then rank 1's seed
        torch.manual_seed(0)  # the Trainer seeds every rank alike
        with noise.attach(model, "uniform", alpha=5.0, seed=seed):
            capture = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
            model(input_ids=ids)
            capture.remove()
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])


@pytest.mark.slow
def test_ddp_sigterm_stops_every_rank_at_one_step_and_the_rerun_resumes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "neftlab", "size=tiny",
               "trainer.max_steps=30", "trainer.save_steps=5", "noise=dynamic", "noise.adjust_interval=2",
               "pruning=l1", "pruning.interval=3", "logger=none", f"output_root={tmp_path}"]
    env = {**os.environ, **CPU_ONLY}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list(tmp_path.glob("runs/*/checkpoints/checkpoint-5")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) != 0
    (run_dir,) = tmp_path.glob("runs/*")
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted"
    for rank in (0, 1):  # both ranks saved their part of the same checkpoint
        assert (run_dir / "checkpoints" / f"checkpoint-{interrupted['step']}" / f"neftlab_rank{rank}.pt").exists()
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 31))


def test_a_mixed_backend_takes_cuda_tensors_on_nccl(monkeypatch):
    """accelerate starts `cuda:nccl,cpu:gloo` for FULL_STATE_DICT or offload: its collectives go on the GPU."""
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cuda:nccl,cpu:gloo")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert sharding.collective_device(object()) == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert sharding.collective_device(object()) == torch.device("cpu")


@pytest.mark.slow
def test_ddp_sigterm_during_the_final_generation_stops_every_rank_together(tmp_path):
    """Each rank answers its own prompts, and the answers are then gathered: a rank that raised at once, as one
    process does, would leave the other in the gather while it saved. The ranks agree on the signal between
    batches (or after the checkpoint of the trained model, if it came before), checkpoint together, and the rerun
    only evaluates; complete, the run keeps no checkpoint, as trainer.save_steps asked for none."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "neftlab", "size=tiny",
               "eval.num_generations=8", "eval.max_new_tokens=1000", "eval.batch_size=1", "logger=none",
               f"output_root={tmp_path}"]  # a batch well within the 30 s torchrun waits before its SIGKILL
    env = {**os.environ, **CPU_ONLY}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not any("train/train_runtime" in p.read_text() for p in tmp_path.glob("runs/*/metrics.jsonl")):
        assert proc.poll() is None, "the run ended before the end of training"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports its ranks' exit 143 with a traceback of its own
    assert stderr.count("[WARNING] - stopped by SIGTERM at step 4; a checkpoint was saved") == 2, stderr[-3000:]
    (run_dir,) = tmp_path.glob("runs/*")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == 4
    for rank in (0, 1):
        assert (run_dir / "checkpoints" / "checkpoint-4" / f"neftlab_rank{rank}.pt").exists()
    # Rerun with short answers (eval.* may change on a resume): it only evaluates, without answering 8 prompts with
    # 1,000 tokens each again.
    rerun = subprocess.run([*command, "eval.max_new_tokens=8"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and "evaluating only" in rerun.stderr, rerun.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert not (run_dir / "checkpoints").exists()
