"""Dynamic alpha and pruning on row-sharded weights (FSDP2's DTensor layout) in 2 CPU processes (gloo) give
exactly what one process gives on the whole matrix; and DDP runs end to end under torchrun."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, TINY
from neftlab import noise, pruning
from neftlab.config import NoiseConfig

ROWS, COLS = 1001, 48  # an odd row count: the shards are uneven


def weights(step: int) -> torch.Tensor:
    """The embedding 'after step': a fixed sequence, so both layouts see the same weights."""
    g = torch.Generator().manual_seed(step)
    w = torch.randn(ROWS, COLS, generator=g) * (1 + step / 10) + step / 50
    w[::7] = 0.5  # ties at one value, spread over both shards
    return w


def alpha_trajectory(make_weight) -> list[float]:
    class Handle:
        alpha = 5.0
    rule = noise.DynamicAlpha(Handle, NoiseConfig(kind="dynamic", alpha_step=0.5, stability_threshold="auto"))
    return [rule.update(noise.stability(make_weight(step)))["noise/alpha"] for step in range(6)]


def single_process_results():
    results = {"alpha": alpha_trajectory(weights), "stability": noise.stability(weights(3))}
    for method, ratio in (("l1", 0.3), ("l1", 0.8), ("l2", 0.4)):
        w = weights(1)
        results[f"{method}-{ratio}"] = pruning.prune_(w, ratio, method).clone()
    return results


def worker(rank, world, store, expected):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        shard = lambda w: distribute_tensor(w, mesh, [Shard(0)])  # noqa: E731
        assert alpha_trajectory(lambda step: shard(weights(step))) == expected["alpha"]
        assert noise.stability(shard(weights(3))) == pytest.approx(expected["stability"], rel=1e-12)
        for method, ratio in (("l1", 0.3), ("l1", 0.8), ("l2", 0.4)):
            w = shard(weights(1))
            local_mask = pruning.prune_(w, ratio, method)
            masks = [None] * world
            dist.all_gather_object(masks, local_mask.contiguous())
            whole = torch.cat(masks)
            assert torch.equal(whole, expected[f"{method}-{ratio}"]), f"{method} {ratio}"
            assert torch.equal(w.full_tensor() == 0, ~whole) or method == "l2"
            zeros = int((~whole).sum())
            exact = math.floor(ratio * ROWS * COLS) if method == "l1" else math.floor(ratio * ROWS) * COLS
            assert zeros == exact
    finally:
        dist.destroy_process_group()


def test_alpha_and_pruning_are_identical_in_one_and_two_processes(tmp_path):
    expected = single_process_results()
    assert len(set(expected["alpha"])) > 1  # the trajectory moves, so equality means something
    mp.spawn(worker, args=(2, tmp_path / "store", expected), nprocs=2, join=True)


def test_ddp_with_two_processes_writes_one_set_of_run_files(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "neftlab",
                           f"hydra.run.dir={run_dir}", *TINY, "model=llama_tiny", "noise=uniform",
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


def test_ddp_sigterm_stops_every_rank_at_one_step_and_the_rerun_resumes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "neftlab", "size=tiny",
               "trainer.max_steps=120", "trainer.save_steps=5", "noise=dynamic", "noise.adjust_interval=2",
               "pruning=l1", "pruning.interval=3", "logger=none", f"hydra.run.dir={tmp_path}/runs/" + "${run_id:}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    assert steps == list(range(1, 121))
