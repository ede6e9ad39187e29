"""Out of a resource (the disk, memory, open files) or handed a record too big to hold: the run ends in one line
naming it, keeps what it trained, and the rerun finishes."""

import errno
import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest

from neftlab.core import rundir
from neftlab.core.files import read_jsonl
from neftlab.run import checkpoint as checkpoints
from tests.helpers import ROOT, TINY, subprocess_run
from tests.run.crashes import neftlab_command, rerun


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_the_rerun_resumes(small_disk):
    # 300 MiB, 200 of them free at the start check, 41 MiB a checkpoint: full within a few saves.
    proc = rerun(small_disk, "trainer.max_steps=12")
    assert proc.returncode == 1
    assert "no space left on device" in proc.stderr and "rerun the same command to resume" in proc.stderr
    (run,) = (small_disk / "runs").iterdir()
    assert not list(run.glob("*summary.json*"))  # no room for it: no empty, torn or temporary summary either
    complete = [c for c in checkpoints.checkpoints(run) if checkpoints.problem(c) is None]
    assert complete, "no complete checkpoint was kept"
    subprocess.run(["mount", "-o", "remount,size=2g", str(small_disk)], check=True)  # space freed
    proc = rerun(small_disk, "trainer.max_steps=12")
    assert proc.returncode == 0
    assert f"Resuming {run} from {complete[0].name}" in proc.stderr
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if "train/loss" in e] == list(range(1, 13))


def test_a_full_disk_during_the_model_save_leaves_nothing_torn(tmp_path, monkeypatch):
    from transformers import Trainer
    real = Trainer.save_model

    def full(self, folder=None, *args, **kwargs):
        if not str(folder).endswith("model.partial"):  # a checkpoint's save: whole
            return real(self, folder, *args, **kwargs)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "save_model", full)
        first = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "a",
                               root=tmp_path)
    run_dir = tmp_path / "runs" / "a"
    assert first.returncode == 1 and "no space left on device" in first.stderr
    assert not (run_dir / rundir.MODEL).exists()
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "interrupted"
    assert Trainer.save_model is real
    again = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert again.returncode == 0 and "evaluating only" in again.stderr
    assert (run_dir / rundir.MODEL / "model.safetensors").stat().st_size > 1000


def test_out_of_memory_in_the_final_generation_keeps_the_model_and_names_the_key(tmp_path, monkeypatch):
    from neftlab.evaluation import generation
    with monkeypatch.context() as m:
        m.setattr(generation, "generate", lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")))
        first = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "a",
                               root=tmp_path)
    assert first.returncode == 1
    assert "out of memory while generating the answers (eval.batch_size=16): lower it" in first.stderr
    again = subprocess_run(*TINY, "model=llama_tiny", "logger=none", "eval.batch_size=1",
                           out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert again.returncode == 0 and "evaluating only" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("limit, extra", [(16, []), (32, ["-m", "hydra/launcher=parallel", "seed=1,2"])],
                         ids=["run", "parallel_sweep"])
def test_a_low_open_files_limit_completes_or_says_so_in_one_line(tmp_path, limit, extra):
    proc = subprocess.run(neftlab_command(*extra, "size=tiny", "logger=none", f"output_root={tmp_path}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    if proc.returncode:  # one line naming the limit
        assert "Too many open files" in proc.stderr and "ulimit -n" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    else:
        summaries = [json.loads(p.read_text()) for p in tmp_path.rglob(rundir.SUMMARY)]
        assert summaries and all(s["status"] == "completed" for s in summaries)


@pytest.mark.slow
def test_one_huge_record_is_skipped_counted_and_costs_no_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(48):
            f.write(json.dumps({"instruction": f"Say {i}", "output": f"{i} it is"}) + "\n")
        f.write(json.dumps({"instruction": "Read this", "output": "word " * 10_000_000}) + "\n")  # 50 MB
    folder = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(neftlab_command("size=tiny", "logger=none", "data=alpaca", f"data.path={path}",
                                  f"hydra.run.dir={folder}", f"output_root={tmp_path}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 record(s) of more than 1000000 characters" in proc.stderr
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    assert summary["efficiency/peak_memory_mb"] < 2500 and time.perf_counter() - start < 180

