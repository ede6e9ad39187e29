"""Run-time guards: NaN/inf losses stop or skip alike on every rank, NaN weights are never saved, bad output dirs
fail early."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from neftlab.config import ConfigError
from neftlab.run import nonfinite
from neftlab.sweep import launch
from neftlab.run.signals import GracefulStop
from tests.helpers import cli, run, spawn


@pytest.mark.parametrize("kind", ["none", "freelb"])  # freelb: the guard sees each of its K passes
def test_nan_loss_stops_the_run_with_its_step(tmp_path, kind):
    outcome, summary = run("size=tiny", "trainer.learning_rate=1e30", "logger=none", f"noise={kind}", out_dir=tmp_path)
    assert outcome.exit_code == 1 and summary["status"] == "failed"
    assert summary["error"].startswith("train loss is not finite at step ") and "stopping" in summary["error"]


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def step(model, agreement, optimizer, world_size=1, step=0, nan=False):
    """One optimizer step as the Trainer takes it: forward, backward, the pre-optimizer callbacks, the update."""
    ids = torch.arange(16).reshape(2, 8) % 100
    poison = getattr(model, "module", model).register_forward_hook(  # before the guard's hook sees the output
        lambda m, a, out: out.__setitem__("loss", out["loss"] * float("nan")) if nan else None, prepend=True)
    model(input_ids=ids, labels=ids).loss.backward()
    poison.remove()
    agreement.on_pre_optimizer_step(SimpleNamespace(world_size=world_size), SimpleNamespace(global_step=step), None)
    optimizer.step()
    optimizer.zero_grad()


def guarded(model, mode, max_skipped, events=None):
    events = [] if events is None else events
    guard = nonfinite.NonFiniteGuard(model, mode, max_skipped, lambda step, m: events.append((step, m)))
    guard.on_train_begin(None, None, None)
    return guard, nonfinite.StepAgreement(guard, GracefulStop())


def test_skip_mode_drops_the_batch_without_moving_any_weight():
    model = tiny_llama().train()
    events = []
    guard, agreement = guarded(model, "skip", max_skipped=1, events=events)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    step(model, agreement, opt, step=5)  # a normal step first: AdamW has momentum to move weights with
    before = [p.clone() for p in model.parameters()]
    step(model, agreement, opt, step=6, nan=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert events == [(7, {"train/skipped_batches": 1})]
    with pytest.raises(nonfinite.NonFiniteError, match=r"train loss is not finite at step 8 after 1 skipped batches"):
        step(model, agreement, opt, step=7, nan=True)
    guard.remove()


def nan_on_one_rank(rank, world, store, out):
    """Rank 1 alone sees a NaN loss at its second step; both ranks must skip it, then both must stop."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        (out / f"rank{rank}.json").write_text(json.dumps(three_steps_with_nan_on_rank_1(rank)))
    finally:  # DDP is gone by now: a Reducer freed after this line deadlocks in gloo's destructor (torch 2.13)
        dist.destroy_process_group()


def three_steps_with_nan_on_rank_1(rank):
    from torch.nn.parallel import DistributedDataParallel
    model = tiny_llama().train()
    ddp = DistributedDataParallel(model)
    guard, agreement = guarded(model, "skip", max_skipped=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    step(ddp, agreement, opt, world_size=2, step=0)
    before = [p.clone() for p in model.parameters()]
    step(ddp, agreement, opt, world_size=2, step=1, nan=rank == 1)
    result = {"unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
              "skipped": guard.skipped}
    try:
        step(ddp, agreement, opt, world_size=2, step=2, nan=rank == 1)
    except nonfinite.NonFiniteError as e:
        result["stopped"] = str(e)
    return result


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_or_stops_every_rank_at_the_same_step(tmp_path):
    spawn(nan_on_one_rank, tmp_path / "store", tmp_path)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["unchanged"] and result["skipped"] == 1
        assert result["stopped"].startswith("train loss is not finite at step 3 after 1 skipped batches")


def test_nan_weights_are_never_saved():
    model = tiny_llama()
    guard = nonfinite.NonFiniteGuard(model, "fail", 0, lambda step, m: None)
    save, step = SimpleNamespace(should_save=True, should_log=False), SimpleNamespace(should_save=False, should_log=False)
    guard.on_step_end(None, SimpleNamespace(global_step=3), save)  # finite: fine
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(nonfinite.NonFiniteError, match="lm_head.weight holds NaN/inf at step 4; not saving it"):
        guard.on_step_end(None, SimpleNamespace(global_step=4), save)
    guard.on_step_end(None, SimpleNamespace(global_step=5), step)  # no save, no check


def test_one_process_reads_the_nan_flag_only_where_it_decides():
    """No host sync per optimizer step: the first bad step is kept on the device, read at a logging or save step
    (or the end), and named exactly."""
    guard = nonfinite.NonFiniteGuard(tiny_llama(), "fail", 0, lambda step, m: None)
    agreement = nonfinite.StepAgreement(guard, GracefulStop())
    args, quiet = SimpleNamespace(world_size=1), SimpleNamespace(should_save=False, should_log=False)
    for step, loss in enumerate([1.0, float("nan"), 2.0], 1):
        guard.bad = ~torch.isfinite(torch.tensor(loss))
        agreement.on_pre_optimizer_step(args, SimpleNamespace(global_step=step - 1), quiet)
        guard.on_step_end(args, SimpleNamespace(global_step=step), quiet)  # not a logging step: nothing read
    assert guard.bad is None and int(guard.first_bad) == 2
    with pytest.raises(nonfinite.NonFiniteError, match="train loss is not finite at step 2; stopping"):
        guard.on_step_end(args, SimpleNamespace(global_step=3), SimpleNamespace(should_save=False, should_log=True))


@pytest.mark.slow
def test_unwritable_output_dir_fails_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("")
    proc, _ = cli("size=tiny", out_dir=tmp_path / "file" / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output directory {tmp_path}/file/run is not writable: Not a directory" in proc.stderr


def test_full_output_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(ConfigError, match="has 10 MiB free, less than the 200 MiB"):
        launch.check_output_dir(tmp_path)


def test_a_stop_in_mid_epoch_adds_no_evaluation(tmp_path):
    """The Trainer ends the epoch it stops in, and with trainer.eval_steps=epoch would evaluate there: an
    evaluation the uninterrupted run never makes, which a study's per-epoch curves would then hold (it happened to
    a resumed run of experiment=overfit). A stopping run skips it; a run that is not stopping evaluates."""
    import signal

    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="epoch", report_to=[], use_cpu=True)
    stop = GracefulStop()
    handler = CallbackHandler([DefaultFlowCallback, stop], None, None, None, None)
    assert handler.on_epoch_end(args, TrainerState(epoch=2.0), TrainerControl()).should_evaluate
    stop.signum = signal.SIGTERM
    assert not handler.on_epoch_end(args, TrainerState(epoch=1.67), TrainerControl()).should_evaluate
