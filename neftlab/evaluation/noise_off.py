"""The training loss measured with the noise off, at every evaluation: NEFTune's effect on the training loss shows
only there, and its gap to the held-out loss is the generalisation gap."""

from __future__ import annotations

from transformers import TrainerCallback

from ..core.measures import GAP, NOISE_OFF_LOSS


class NoiseOffTrainLoss(TrainerCallback):
    """At every evaluation, the loss on a fixed seeded subset of the training set (as many examples as are held
    out), computed in eval mode, where the noise hooks add nothing. NEFTune's authors point out that its effect on
    the training loss shows only with the noise off; the gap to the held-out loss is the generalisation gap."""

    def __init__(self, trainer, size: int, seed: int, log_event):
        """`trainer`: the Trainer whose evaluation loop computes the loss (the callback is added to it once it is
        built); `size` examples of its training set, drawn by `seed`."""
        train = trainer.train_dataset
        self.subset = train.shuffle(seed=seed).select(range(min(size, len(train))))
        self.trainer, self.log_event = trainer, log_event

    def _loop(self, loader):
        """The Trainer's evaluation loop over `loader`, with a progress bar of its own: the Trainer's progress
        callback closes the held-out split's bar only after this callback, and would count these batches into it."""
        from transformers.trainer_callback import ProgressCallback
        handler = self.trainer.callback_handler
        bars = [c for c in handler.callbacks if isinstance(c, ProgressCallback)]
        for bar in bars:
            if bar.prediction_bar is not None:
                bar.prediction_bar.close()
                bar.prediction_bar = None
        outer, handler.eval_dataloader = handler.eval_dataloader, loader
        try:
            return self.trainer.evaluation_loop(loader, "Noise-off train loss", prediction_loss_only=True,
                                                metric_key_prefix="noise_off")
        finally:
            handler.eval_dataloader = outer
            for bar in bars:
                if bar.prediction_bar is not None:
                    bar.prediction_bar.close()
                    bar.prediction_bar = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if "eval_loss" not in (metrics or {}):
            return
        out = self._loop(self.trainer.get_eval_dataloader(self.subset))
        loss = out.metrics["noise_off_loss"]
        self.log_event(state.global_step, {NOISE_OFF_LOSS.key: loss, GAP.key: metrics["eval_loss"] - loss})
