"""One Optuna study shared by several sweeper processes (neftlab.sweep.study): n_trials in all, a trial asked in the
same instant as another process's last one dropped, a trial whose process is gone failed and retried with its
parameters; then two real sweeper processes on one journal file with one of them killed mid-trial, and on a
PostgreSQL server the test starts."""

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from neftlab.core import claim
from neftlab.core.errors import ConfigError
from neftlab.sweep.study import HEARTBEAT, OWNER, SURPLUS, SharedStudy, counted, open_storage, open_study
from tests.helpers import ROOT


def _process(storage: str, n_trials: int) -> SharedStudy:
    """What one sweeper process holds: its own storage object and study, opened from the shared spec."""
    study = optuna.create_study(study_name="s", storage=open_storage(storage), load_if_exists=True)
    return SharedStudy(study, n_trials)


@pytest.fixture
def journal(tmp_path) -> str:
    return f"journal:{tmp_path}/study.journal"


def _gone() -> dict:
    """The owner record of a process of this machine that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {**claim.owner(), "pid": proc.pid, "started": time.time() - 5}


def test_the_storage_is_a_journal_file_or_an_sqlalchemy_url(tmp_path):
    assert isinstance(open_storage(f"journal:{tmp_path}/s.journal"), optuna.storages.JournalStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/s.db"), optuna.storages.RDBStorage)
    assert open_storage(None) is None  # hydra.sweeper.storage=null: in memory, this process's study alone


@pytest.mark.parametrize("storage, reason", [
    ("postgresql+psycopg://nobody@localhost:1/study", "connection"),  # no server there
    ("mysql+nosuchdriver://nobody@localhost/study", "nosuchdriver"),
])
def test_a_storage_that_cannot_be_opened_is_named_in_one_line(storage, reason):
    with pytest.raises(ConfigError, match=re.escape(f"hydra.sweeper.storage={storage} cannot be opened: ")) as e:
        open_study(storage, "s", None, ["minimize"])
    assert reason in str(e.value).lower() and "\n" not in str(e.value)


def test_the_study_ends_at_n_trials_in_all_whichever_process_asks(journal):
    a, b = _process(journal, 3), _process(journal, 3)
    first = a.ask(2)
    assert len(first) == 2 and len(b.ask(2)) == 1 and a.ask(2) == [] and b.ask(1) == []
    for trial in first:
        a.tell(trial, [1.0])
    assert len(a.study.trials) == 3 and a.left() == 0


def test_a_trial_asked_at_the_same_moment_past_n_trials_is_dropped_before_it_draws(journal, monkeypatch):
    """Process b read the study (one trial to go) just before process a took that last trial."""
    a, b = _process(journal, 1), _process(journal, 1)
    monkeypatch.setattr(b, "left", lambda: 1)
    taken = a.ask(1)
    assert b.ask(1) == []
    trials = a.study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert trials[1].system_attrs[SURPLUS] and trials[1].params == {}
    assert [t.number for t in counted(trials)] == [taken[0].number]


def test_a_trial_whose_process_is_gone_is_failed_and_retried_with_its_parameters(journal):
    a, b = _process(journal, 2), _process(journal, 2)
    lost = a.ask(1)[0]
    alpha = lost.suggest_float("noise.alpha", 1, 20, log=True)
    a.storage.set_trial_system_attr(lost._trial_id, OWNER, _gone())  # a was killed with its trial running
    assert b.fail_stale() == [lost.number]
    assert _process(journal, 2).fail_stale() == []  # failed once, retried once, whoever else looks
    trials = b.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert b.left() == 1  # the retry takes the lost trial's place
    retry, new = b.ask(2)
    assert retry.number == 1 and retry.suggest_float("noise.alpha", 1, 20, log=True) == alpha
    assert new.number == 2 and b.ask(1) == []


def test_a_trial_on_another_machine_is_stale_only_when_its_heartbeat_stops(journal):
    a, b = _process(journal, 2), _process(journal, 2)
    trial = a.ask(1)[0]
    elsewhere = {**claim.owner(), "host": "node-7", "boot": "other"}
    a.storage.set_trial_system_attr(trial._trial_id, OWNER, elsewhere)
    assert b.fail_stale() == []  # renewed just now
    a.storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, time.time() - claim.STALE_AFTER_S - 1)
    assert b.fail_stale() == [trial.number]


def test_a_stopped_trial_goes_back_to_the_study_at_once(journal):
    a = _process(journal, 1)
    trial = a.ask(1)[0]
    trial.suggest_int("noise.adv_steps", 1, 3)
    a.give_back(trial)
    retry = a.ask(1)[0]
    assert retry.params == trial.params and a.ask(1) == [] and a.others_running() == []


def test_a_heartbeat_renews_the_running_trials(journal, monkeypatch):
    monkeypatch.setattr(claim, "HEARTBEAT_S", 0.05)
    a = _process(journal, 1)
    trial = a.ask(1)[0]
    before = a.study.get_trials()[0].system_attrs[HEARTBEAT]
    with a.beating():
        time.sleep(0.3)
    assert _process(journal, 1).study.get_trials()[0].system_attrs[HEARTBEAT] > before
    a.tell(trial, [0.5])


def _search(tmp_path: Path, name: str, storage: str, *extra: str) -> subprocess.Popen:
    """A sweeper process of a tiny NEFTune search (each process with its own sweep directory, as on its own
    machine), in its own session so that it can be killed whole. Its trials train one step and answer nothing
    (`extra` may ask for more): what is shared is the study, whatever its trials do."""
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "neftlab", "-m", "hparams_search=neftune", "size=tiny", "logger=none",
         f"output_root={tmp_path}", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared",
         f"hydra.sweep.dir={tmp_path}/{name}", "hydra/sweeper/sampler=random", "trainer.max_steps=1",
         "eval.num_generations=0", *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ})


def _running_job(sweep_dir: Path) -> bool:
    ledger = sweep_dir / "jobs.jsonl"
    return ledger.exists() and any(json.loads(line).get("status") == "running"
                                   for line in ledger.read_text().splitlines() if line.strip())


def _completed_runs(root: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in root.glob("*/*/summary.json")]
    return [r for r in runs if r.get("status") == "completed"]


@pytest.mark.slow
def test_two_processes_share_a_journal_study_and_finish_it_when_one_is_killed_mid_trial(tmp_path):
    storage = f"journal:{tmp_path}/study.journal"
    killed = _search(tmp_path, "a", storage, "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=1")
    survivor = _search(tmp_path, "b", storage, "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=2")
    deadline = time.monotonic() + 300
    while not _running_job(tmp_path / "a"):
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert survivor.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert "their process is gone; failed, and queued to be tried again" in (tmp_path / "b.log").read_text()

    trials = optuna.load_study(study_name="shared", storage=open_storage(storage)).trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert len(done) == 4 and len(counted(trials)) == 4 and not any(t.state == TrialState.RUNNING for t in trials)
    assert len(lost) == 1 and lost[0].system_attrs[OWNER]["pid"] == killed.pid  # the killed process's trial
    retry = next(t for t in done if t.system_attrs.get("failed_trial") == lost[0].number)
    assert retry.params == lost[0].params  # tried again, with its parameters
    runs = _completed_runs(tmp_path)  # one completed run a trial: none trained twice
    assert sorted(r["eval/loss"] for r in runs) == sorted(t.value for t in done)


def _postgres_binaries() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own on localhost, for the test's length: started from the system's packages
    (`.ci/run` installs them where it can), as the `postgres` user when the tests run as root."""
    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server installed (initdb not found): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install -e '.[postgres]'")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="neftlab-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("the tests run as root and there is no postgres user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    try:
        subprocess.run([*as_user, binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                       capture_output=True)
        subprocess.run([*as_user, binaries / "pg_ctl", "-D", data, "-l", folder / "log", "-w", "start", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=localhost"], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server would not start: {e.stderr.decode()[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@localhost:{port}/postgres"
    finally:
        subprocess.run([*as_user, binaries / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_a_study_on_a_postgresql_server(tmp_path, postgres_url):
    procs = [_search(tmp_path, name, postgres_url, "hydra.sweeper.n_trials=3", f"hydra.sweeper.sampler.seed={seed}")
             for name, seed in (("a", 1), ("b", 2))]
    for name, proc in zip("ab", procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    assert len(counted(trials)) == 3 and all(t.state == TrialState.COMPLETE for t in counted(trials))
    assert len(_completed_runs(tmp_path)) == 3


@pytest.mark.slow
def test_a_search_stopped_mid_trial_gives_the_trial_back_and_the_same_command_resumes_it(tmp_path):
    """A stop signal while a trial trains: the run saves a checkpoint, the trial goes back to the study (failed,
    and queued with its parameters), and the same command again resumes that run rather than training anew."""
    storage = f"journal:{tmp_path}/study.journal"
    args = (storage, "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler.seed=3", "trainer.max_steps=10")
    first = _search(tmp_path, "a", *args)
    metrics, deadline = tmp_path / "a" / "0" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and "train/loss" in metrics.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()[-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 128 + signal.SIGTERM, (tmp_path / "a.log").read_text()[-3000:]
    trials = optuna.load_study(study_name="shared", storage=open_storage(storage)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    again = _search(tmp_path, "b", *args)
    assert again.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert f"Resuming {tmp_path}/a/0 from checkpoint-" in (tmp_path / "b.log").read_text()
    trials = optuna.load_study(study_name="shared", storage=open_storage(storage)).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and len(_completed_runs(tmp_path)) == 1
