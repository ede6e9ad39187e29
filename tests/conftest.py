"""Shared fixtures: composed configs, tiny tokenizers and a CLI runner. Nothing here reaches the hub."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

from neftlab.config import compose as compose_cfg  # noqa: E402,F401  (the config `python -m neftlab` runs with)
from neftlab.config import register  # noqa: E402

register()

# Small enough for seconds per run on 2 cores.
TINY = ["data.max_samples=48", "data.eval_size=8", "data.max_length=64", "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=2", "eval.num_generations=2", "eval.max_new_tokens=8"]


def cli(*overrides: str, out_dir: Path, env: dict | None = None, timeout: int = 600):
    """Run `python -m neftlab` in a subprocess; returns (CompletedProcess, summary dict or None)."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's argparse wants flags before overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "neftlab", *flags, f"hydra.run.dir={out_dir}", f"output_root={out_dir}",
                           *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    summary = out_dir / "summary.json"
    return proc, json.loads(summary.read_text()) if summary.exists() else None


def spawn(fn, *args, nprocs: int = 2, timeout: float = 240):
    """`mp.spawn(fn, args=(nprocs, *args))`, bounded: a rank that dies or hangs fails the test within `timeout`
    instead of leaving the others waiting in a collective (gloo waits 30 minutes by default)."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=(nprocs, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is, and are skipped elsewhere (CI has no GPU). Under pytest-xdist
    (`--dist loadgroup`, as gpu-check runs the suite) the torchrun tests run one after another on one worker: every
    torchrun job listens on its default port."""
    import torch
    cuda = torch.cuda.is_available()
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in ("test_sharding", "test_gpu"):
            item.add_marker(pytest.mark.xdist_group("torchrun"))
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose_cfg("model=llama_tiny").model)


@pytest.fixture(scope="session")
def bert_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose_cfg("model=bert_tiny").model)
