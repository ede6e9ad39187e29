"""Shared fixtures and the suite's marks. Nothing here reaches the hub; the helpers are in tests/helpers.py."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")

from neftlab.config import compose, register  # noqa: E402
from tests.slurm_cluster import slurm_cluster  # noqa: E402, F401 - the session's one SLURM cluster, a fixture

register()


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is, and are skipped elsewhere (CI has no GPU). Under pytest-xdist
    (`--dist loadgroup`, as gpu-check runs the suite) the torchrun tests run one after another on one worker: every
    torchrun job listens on its default port; and so do the SLURM tests, which share one cluster."""
    import torch
    cuda = torch.cuda.is_available()
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in ("test_dist", "test_gpu"):
            item.add_marker(pytest.mark.xdist_group("torchrun"))
        if "slurm_cluster" in getattr(item, "fixturenames", ()):  # one worker, so one cluster for them all
            item.add_marker(pytest.mark.xdist_group("slurm"))
        if item.get_closest_marker("gpu") and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose("model=llama_tiny").model)


@pytest.fixture(scope="session")
def bert_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose("model=bert_tiny").model)
