"""An upcycled model trains with `transformers.Trainer` and nothing else: the router losses are in
the loss it logs, the router statistics in its logs, and its checkpoints load with `sparsify.load`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

import sparsify
from sparsify.training import RouterStats

pytest.importorskip("accelerate")  # the Trainer needs it (the dev extra installs it)

ROWS, SEQ, VOCAB = 8, 24, 512


def _rows(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(seed))


def _dataset(rows: torch.Tensor) -> list[dict]:
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(tmp_path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=ROWS, max_steps=4, logging_steps=1,
                learning_rate=3e-3, save_steps=4, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kwargs})


class ExpectedLoss(TrainerCallback):
    """Before each step, the loss the step should log, computed outside the Trainer with the
    model's weights at that moment: the task loss (cross-entropy written out) plus
    `sparsify.aux_losses` of the same forward, per micro-batch of `rows`."""

    def __init__(self, micro_batches: list[torch.Tensor]):
        self.micro_batches, self.losses = micro_batches, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        total = 0.0
        with torch.no_grad():
            for rows in self.micro_batches:
                logits = model(input_ids=rows).logits
                task = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
                total += (task + sparsify.aux_losses(model)).item()
        self.losses.append(total / len(self.micro_batches))


def _train_losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_native_model_trains_with_the_aux_losses_in_the_logged_loss(tmp_path, demo, accumulate):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2, noise=0.01)
    rows = _rows()
    # Every row in each step, in `accumulate` micro-batches; in order, since the balancing loss
    # of a micro-batch depends on which rows it holds.
    expected = ExpectedLoss(list(rows.chunk(accumulate)))
    args = _args(tmp_path, per_device_train_batch_size=ROWS // accumulate, gradient_accumulation_steps=accumulate,
                 train_sampling_strategy="sequential")
    trainer = Trainer(model=moe, args=args, train_dataset=_dataset(rows), callbacks=[RouterStats(), expected])
    trainer.train()
    logged = _train_losses(trainer)
    assert len(logged) == 4 and logged[-1] < logged[0]
    assert logged == pytest.approx(expected.losses, rel=2e-6)
    # the router statistics are in every training log
    layers = [n for n, m in moe.named_modules() if isinstance(m, sparsify.SparseMoE)]
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        for n in layers:
            assert sum(entry[f"router/{n}/load/{e}"] for e in range(4)) == pytest.approx(1.0)
            assert entry[f"router/{n}/balancing_loss"] >= 1.0 - 1e-6 and entry[f"router/{n}/dropped"] == 0.0


def test_trainer_checkpoint_is_a_native_output_that_reproduces_the_model(tmp_path, demo):
    moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2, noise=0.01)
    trainer = Trainer(model=moe, args=_args(tmp_path), train_dataset=_dataset(_rows()))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "sparsify.json", "model.safetensors.index.json", "trainer_state.json",
            "optimizer.pt"} <= names
    loaded = sparsify.load(checkpoint)
    assert loaded.sparsify_plan.to_dict() == moe.sparsify_plan.to_dict()
    ids = _rows(seed=1)
    moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, moe(input_ids=ids).logits, rtol=0, atol=0)
    # the final save into the output directory keeps the checkpoints beside it
    trainer.save_model()
    assert sparsify.load(tmp_path / "run") is not None and (checkpoint / "sparsify.json").is_file()


def test_training_resumes_from_a_native_checkpoint(tmp_path, demo):
    def run(max_steps: int, resume: bool = False) -> Trainer:
        moe = sparsify.upcycle(demo("llama"), experts=4, top_k=2, every=2, noise=0.01)
        trainer = Trainer(model=moe, args=_args(tmp_path, max_steps=max_steps, save_steps=2),
                          train_dataset=_dataset(_rows()))
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer

    straight = _train_losses(run(4))
    run(2)
    resumed = _train_losses(run(4, resume=True))
    assert resumed[-2:] == pytest.approx(straight[-2:], rel=1e-5)


def test_mixtral_output_trains_and_its_checkpoint_loads_both_ways(tmp_path, sparsify_cli):
    import transformers

    code, _, err = sparsify_cli("upcycle", "demo:llama", "--experts", "4", "--format", "mixtral", "-o", tmp_path / "out")
    assert code == 0, err
    model = sparsify.load(tmp_path / "out")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(_rows()))
    trainer.train()
    logged = _train_losses(trainer)
    assert logged[-1] < logged[0]
    checkpoint = tmp_path / "run" / "checkpoint-4"
    ids = _rows(seed=1)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for loaded in (sparsify.load(checkpoint), transformers.MixtralForCausalLM.from_pretrained(checkpoint)):
            torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
