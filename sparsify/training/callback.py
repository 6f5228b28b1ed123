"""`RouterStats`: router statistics in a `transformers.Trainer`'s logs."""

from __future__ import annotations

from transformers import TrainerCallback

from .stats import RoutingTotals, track_routers

__all__ = ["RouterStats"]


class RouterStats(TrainerCallback):
    """Adds the router statistics (`router/...` keys, see `sparsify.training.stats`) to every
    training log of a `transformers.Trainer`: averaged over the training forwards since the
    previous log, gathered on the device after each micro-batch and read once per log.

        trainer = Trainer(model=moe, args=args, train_dataset=ds, callbacks=[RouterStats()])

    The keys go into the log event itself, so `trainer.state.log_history`, the console and every
    callback after this one receive them. The Trainer calls the integrations named in `report_to`
    before the callbacks passed in `callbacks=`; to give them the keys too, pass the integration's
    callback after this one instead (`report_to="none"`, `callbacks=[RouterStats(),
    TensorBoardCallback()]`).
    """

    def __init__(self) -> None:
        self.totals = RoutingTotals()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.totals.reset()
        if model is not None:
            track_routers(model)  # a Hugging Face MoE loaded by transformers: its routers keep their output

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.totals.add(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.totals.add(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only training logs (they carry "loss"); evaluation logs have eval_* keys.
        if logs is None or "loss" not in logs or not self.totals:
            return
        stats = self.totals.summary()
        self.totals.reset()
        logs.update(stats)
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
