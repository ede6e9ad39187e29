"""Two processes at once on one run, one sweep, or one second: each config trains once, the other process says why
in one line, and two containers get two run directories. Two processes racing are the subject: they are command
lines of their own."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from neftlab import judge as judge_cli
from neftlab.config.resolvers import run_id
from neftlab.core import rundir
from tests.helpers import ROOT
from tests.run.crashes import assert_resumed_to_reference, command, crashed, neftlab_command, once_each


@pytest.mark.slow
def test_two_reruns_started_together_resume_the_run_once(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    procs = [subprocess.Popen(command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    resumed = [o for o in outputs if f"Resuming {run}" in o]
    assert len(resumed) == 1, outputs[0][-2000:] + outputs[1][-2000:]
    loser = procs[1 - outputs.index(resumed[0])]
    other = outputs[1 - outputs.index(resumed[0])]
    assert procs[outputs.index(resumed[0])].returncode == 0
    # issue 32, case 6: the other says in one line that the run is being resumed, and starts nothing of its own
    assert loser.returncode == 1 and f"{run}, this config's interrupted run, is being resumed by pid" in other
    assert "Traceback" not in other and len(list((tmp_path / "runs").iterdir())) == 1
    assert_resumed_to_reference(run, completed, resumed[0], from_step=2)
    for path in (tmp_path / "runs").glob("*/metrics.jsonl"):  # every line whole, in both runs
        assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.slow
def test_the_same_sweep_started_twice_trains_each_job_once(tmp_path):
    sweep = tmp_path / "sweep"
    command = neftlab_command("-m", "size=tiny", "logger=none", "seed=1,2", f"hydra.sweep.dir={sweep}",
                      f"output_root={tmp_path}")
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    for job in (0, 1):
        summary = json.loads((sweep / str(job) / rundir.SUMMARY).read_text())
        assert summary["status"] == "completed"
        assert once_each(sweep / str(job))[0] == [1, 2, 3, 4]  # trained once: no step twice
    for proc, err in zip(procs, outputs):
        assert "Traceback" not in err
        if proc.returncode:  # the other sweep was running some of its jobs: said so, naming them, and how to go on
            assert "job(s) were being run by another process" in err and "is in use by pid" in err, err[-2000:]
            assert "rerun the same command once it has ended: their results are then reused" in err


@pytest.mark.slow
def test_the_same_run_directory_started_twice_trains_once(tmp_path):
    folder = tmp_path / "run"
    command = neftlab_command("size=tiny", "logger=none", f"hydra.run.dir={folder}", f"output_root={tmp_path}")
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.05)
    procs.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and once_each(folder)[0] == [1, 2, 3, 4]
    if 1 in codes:  # the second started while the first worked: one line, and the first's files untouched
        loser = outputs[codes.index(1)]
        assert f"output directory {folder} is in use by pid" in loser and "Traceback" not in loser
    else:  # the second came after the first had completed: its result reused
        assert any("is already completed with this config" in o for o in outputs)


def test_the_judge_refuses_a_run_that_is_still_training(reference, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    (folder / rundir.SUMMARY).unlink()  # no summary yet: it works, and its process holds the lock
    sleeper = subprocess.Popen(["sleep", "30"])
    from neftlab.core import claim
    from neftlab.core.rank import started
    holder = {**{k: claim.owner()[k] for k in ("host", "boot", "ns")}, "pid": sleeper.pid,
              "started": started(sleeper.pid)}
    (folder / rundir.LOCK).write_text(json.dumps(holder))
    try:
        assert judge_cli.main([str(folder), "--baseline", "reference", "--judge", "anything"]) == 2
        err = capsys.readouterr().err
        assert f"{folder} is still running (pid {sleeper.pid}): its answers are not its final ones" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert judge_cli.main([str(folder), "--baseline", "reference", "--judge", "anything"]) == 2
    assert "is not completed (status: killed)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_containers_in_the_same_second_get_two_run_directories(tmp_path):
    """Each python is pid 1 in its own PID namespace (`unshare`), one host name and boot id between them."""
    if subprocess.run(["unshare", "-fp", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("unshare cannot make a PID namespace here")
    command = ["unshare", "-fp", "--mount-proc", sys.executable, "-m", "neftlab", "size=tiny", "logger=none",
               "trainer.max_steps=0", "eval.num_generations=0", f"output_root={tmp_path}"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.split("_")[2].startswith("1-") for r in runs)  # pid 1, two tags
    assert all(json.loads((r / rundir.SUMMARY).read_text())["status"] == "completed" for r in runs)


def test_run_ids_differ_between_pid_namespaces(monkeypatch):
    """Case 8's mechanism, in this process: the tag hashes the PID namespace, so pid 1 in two containers differs."""
    import neftlab.config.resolvers as resolvers
    names = set()
    for namespace in (111, 222):
        monkeypatch.setattr(resolvers.os, "stat", lambda path, ns=namespace: type("S", (), {"st_ino": ns})())
        monkeypatch.setattr(resolvers, "job_pid", lambda: 1)
        monkeypatch.setattr(resolvers, "started", lambda pid: 1_700_000_000.0)
        run_id.cache_clear()
        names.add(run_id())
    run_id.cache_clear()
    assert len(names) == 2 and all("_1-" in n for n in names)

