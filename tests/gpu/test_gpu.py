"""The GPU lane (`pytest -m gpu`, skipped without CUDA): bf16 training against fp32, LoRA with noise, FSDP2 over NCCL
with dynamic noise and pruning (also of every Linear weight), and a sharded checkpoint that SIGTERM leaves behind
resumed to the uninterrupted result, each on one GPU and, where two are present, on two ranks. The FSDP2 lane's
own checks over NCCL on two GPUs (a NaN in one shard among them) are tests/test_fsdp.py's `cuda` cases."""

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers import ROOT, TINY, cli
from neftlab.core import rundir
from neftlab.methods import pruning
from neftlab.methods.noise.dynamic import stability

pytestmark = pytest.mark.gpu

SHORT_EVAL = ["eval.num_generations=2", "eval.max_new_tokens=8", "logger=none"]
# The clock's figures, and the Trainer's own train_loss: its mean over the steps of the last session only.
TIME_DEPENDENT = ("runtime", "per_second", "latency", "memory", "total_flos", "train/train_loss")


RANKS = [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"))]


def fsdp(method: str, scope: str = "embedding") -> list[str]:
    """The issue's FSDP2 command, with NCCL collectives."""
    return ["size=paper", "trainer=fsdp", "model=llama_tiny", "noise=dynamic", "noise.adjust_interval=1",
            "noise.stability_threshold=auto", f"pruning={method}", f"pruning.scope={scope}", "pruning.interval=2",
            "trainer.max_steps=6", "trainer.save_steps=3", "data.max_samples=64", "data.max_length=64", "logger=none"]


def torchrun(*overrides: str, ranks: int = 1) -> list[str]:
    """One process a GPU: with one, the Trainer shards over a one-GPU mesh."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "neftlab", *overrides]


def events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(summary: dict) -> dict:
    """The summary's numbers that do not depend on the clock."""
    return {k: v for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(t in k for t in TIME_DEPENDENT)}


def test_sharded_statistic_and_pruning_over_nccl_equal_the_unsharded_ones(tmp_path):
    """NCCL reduces CUDA tensors only: this is where CPU-built collectives stopped FSDP2 before its first step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        w = torch.randn(1001, 48, generator=torch.Generator().manual_seed(0)).cuda()
        w[::7] = 0.5  # ties at the threshold
        assert stability(distribute_tensor(w, mesh, [Shard(0)])) == pytest.approx(stability(w), rel=1e-6)
        for method in ("l1", "l2"):  # on copies: a one-rank shard may share w's storage, and pruning is in place
            expected = pruning.prune_(w.clone(), 0.3, method)
            assert torch.equal(pruning.prune_(distribute_tensor(w.clone(), mesh, [Shard(0)]), 0.3, method), expected)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_paper_preset_trains_in_bf16(tmp_path):
    """The paper's recipe in bf16 against the same run in fp32: the same first loss to bf16's precision (same
    weights, data and noise stream), but not bit for bit (autocast is on)."""
    common = ["model=llama", "size=paper", "noise=uniform", "trainer.max_steps=3", "trainer.args.logging_steps=1",
              "data.max_samples=64", "data.max_length=128", *SHORT_EVAL]
    losses, summaries = {}, {}
    for name, extra in (("bf16", []), ("fp32", ["trainer.args.bf16=false"])):
        proc, summaries[name] = cli(*common, *extra, out_dir=tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert summaries[name]["status"] == "completed"
        losses[name] = [e["train/loss"] for e in events(tmp_path / name) if "train/loss" in e]
        assert len(losses[name]) == 3 and all(math.isfinite(loss) for loss in losses[name])
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2) and losses["bf16"] != losses["fp32"]
    bf16 = summaries["bf16"]
    assert bf16["noise/alpha"] == 5.0 and math.isfinite(bf16["eval/loss"]) and bf16["efficiency/peak_memory_mb"] > 0
    answers = [json.loads(line) for line in (tmp_path / "bf16" / "samples.jsonl").read_text().split("\n") if line]
    assert len(answers) == 2 and all(a["tokens"] > 0 for a in answers)


@pytest.mark.slow
def test_lora_with_noise(tmp_path):
    """Noise reaches the embedding under PEFT's wrapper at the per-sequence scale, and the adapter alone learns."""
    from safetensors.torch import load_file
    proc, summary = cli("model=llama", "model.lora.enabled=true", "noise=uniform", "trainer.save_model=true", *TINY,
                        *SHORT_EVAL, out_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["status"] == "completed"
    # alpha / sqrt(L_i * d) with d = 576 and 1 <= L_i <= data.max_length = 64
    assert summary["noise/alpha"] == 5.0 and 5 / math.sqrt(64 * 576) <= summary["noise/mean_magnitude"] <= 5 / 24
    trainable = re.search(r"LoRA: (\d+) of (\d+) parameters trainable", (tmp_path / "neftlab.log").read_text())
    assert trainable and int(trainable[1]) < 0.05 * int(trainable[2])
    adapter = load_file(tmp_path / rundir.MODEL / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # the adapter only, not the base weights
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0: it trained


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("method, scope, weights", [("l1", "embedding", 1), ("l2", "embedding", 1),
                                                    ("l1", "all_linear", 14)])
def test_fsdp2_with_dynamic_noise_and_pruning(tmp_path, method, scope, weights, ranks):
    proc = subprocess.run(torchrun(*fsdp(method, scope), f"hydra.run.dir={tmp_path}", ranks=ranks), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    # really sharded, and every weight in scope kept (a DTensor's data_ptr() is 0 for all of them)
    log = (tmp_path / "neftlab.log").read_text()
    assert f"Pruning {weights} weight(s) in scope {scope}: ['(Shard(dim=0),)']" in log
    logged = events(tmp_path)
    assert [e["step"] for e in logged if "noise/stability" in e] == [1, 2, 3, 4, 5, 6]
    pruned = [e for e in logged if "pruning/sparsity" in e]
    assert [e["step"] for e in pruned] == [0, 2, 4, 6]
    assert all(e["pruning/sparsity"] == pytest.approx(0.3, abs=1e-3) for e in pruned)


@pytest.mark.parametrize("ranks", RANKS)
def test_fsdp2_sigterm_saves_a_sharded_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, ranks):
    # Eager attention: the fused attention kernels' backward may accumulate in a varying order, and the runs
    # must be comparable to the last bit. The design's fixed threshold (0.1) lies far below this width's
    # statistic (1/sqrt(64)), so every alpha decision is clear-cut.
    overrides = ["size=paper", "trainer=fsdp", "model=llama_tiny", "+model.arch_config.attn_implementation=eager", "noise=dynamic",
                 "noise.adjust_interval=2", "pruning=l1", "pruning.interval=3", "trainer.max_steps=40",
                 "trainer.save_steps=5", "trainer.args.logging_steps=1", "data.max_samples=64", "data.max_length=64",
                 *SHORT_EVAL]
    reference = subprocess.run(torchrun(*overrides, f"hydra.run.dir={tmp_path}/reference", ranks=ranks), cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "reference" / "summary.json").read_text())

    command = torchrun(*overrides, f"output_root={tmp_path}", ranks=ranks)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/*/checkpoints/checkpoint-5")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) != 0
    (run_dir,) = tmp_path.glob("runs/*")
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and 5 <= interrupted["step"] < 40
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{interrupted['step']}"
    assert any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())  # FSDP's sharded state

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "completed"
    assert comparable(resumed) == pytest.approx(comparable(expected), rel=1e-5, abs=1e-6)
    assert [e["step"] for e in events(run_dir) if "train/loss" in e] == list(range(1, 41))  # none lost, none twice
