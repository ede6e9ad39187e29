"""Shared fixtures and the suite's marks. Nothing here reaches the hub; the helpers are in tests/helpers.py, the fault
tests' crash states in tests/run/crashes.py."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of make test's workers: one thread, and so the processes it starts
    os.environ["OMP_NUM_THREADS"] = "1"  # two workers of two threads each on two cores spent a third of their time
    #                                      waiting on each other's threads (33 min of CPU against 21)
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


@pytest.fixture(autouse=True)
def measures_registry(monkeypatch):
    """Each test's own copy of the measures' registry: a user's measure one test declares is not another's."""
    from neftlab.core import measures
    monkeypatch.setattr(measures, "_REGISTRY", dict(measures._REGISTRY))
    return measures._REGISTRY


@pytest.fixture(scope="session")
def llama_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose("model=llama_tiny").model)


@pytest.fixture(scope="session")
def bert_tokenizer():
    from neftlab import models
    return models.load_tokenizer(compose("model=bert_tiny").model)


@pytest.fixture(scope="session")
def completed(tmp_path_factory):
    """One uninterrupted 4-step run that keeps every checkpoint (tests/run/crashes.py: BASE): the reference and the
    source of crash states, run once for every fault test that reads it."""
    from tests.helpers import run
    from tests.run.crashes import BASE
    folder = tmp_path_factory.mktemp("completed") / "run"
    outcome, summary = run(*BASE, out_dir=folder)
    assert summary["status"] == "completed", outcome.message
    return folder


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted run of CHAOS (tests/run/crashes.py: 6 steps, evaluations with answers at steps 2 and 4),
    run once for every fault test that reads it."""
    from tests.helpers import run
    from tests.run.crashes import CHAOS
    folder = tmp_path_factory.mktemp("reference") / "run"
    outcome, summary = run(*CHAOS, out_dir=folder)
    assert summary["status"] == "completed", outcome.message
    return folder
