"""Compare two models on the same seeded inputs: the check that a conversion preserved function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .inputs import example_inputs_for

__all__ = ["Comparison", "compare", "main_output"]


@dataclass
class Comparison:
    """Largest absolute difference, the reference's largest magnitude, and their ratio."""

    max_abs: float
    max_ref: float

    @property
    def max_rel(self) -> float:
        """max_abs relative to the largest reference output magnitude."""
        return self.max_abs / self.max_ref if self.max_ref else float(self.max_abs > 0)

    def within(self, atol: float | None = None, rtol: float = 1e-5) -> bool:
        """True when max_abs <= atol (default: rtol x the largest reference magnitude)."""
        bound = atol if atol is not None else rtol * self.max_ref
        return self.max_abs <= bound


def main_output(out) -> torch.Tensor:
    """The first tensor of a model output (logits, or the last hidden state; a backbone's first
    feature map, inside the tuple it returns)."""
    if isinstance(out, torch.Tensor):
        return out
    for o in out.values() if isinstance(out, dict) else out:
        if isinstance(o, torch.Tensor):
            return o
        if isinstance(o, (tuple, list, dict)) and o:
            return main_output(o)
    raise ValueError(f"the model returned no tensor ({type(out).__name__})")


@torch.no_grad()
def compare(reference: nn.Module, candidate: nn.Module, seed: int = 0, batch: int = 2, seq: int = 16) -> Comparison:
    """Run both models (eval mode) on the same inputs made from the reference's config."""
    inputs = example_inputs_for(reference, batch=batch, seq=seq, seed=seed)
    reference.eval()
    candidate.eval()
    ref = main_output(reference(**inputs)).float()
    got = main_output(candidate(**inputs)).float()
    if ref.shape != got.shape:
        return Comparison(float("inf"), float(ref.abs().max()))
    return Comparison(float((ref - got).abs().max()), float(ref.abs().max()))
