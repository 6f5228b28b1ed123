"""Compare two models on the same seeded inputs: the check that a conversion preserved function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from .errors import OptionError
from .inputs import example_inputs_for

__all__ = ["Comparison", "compare", "main_output", "seeded_output", "RTOL", "rtol_for", "weights_dtype", "lowest_precision", "check_atol"]

# Default tolerance relative to the largest reference output, by the lowest precision among the
# weights compared. float32 differs only by summation order; bfloat16 (8-bit mantissa) and
# float16 (11-bit) round every weight, which the demos measure at up to 1.2e-2 and 1.2e-3 of the
# largest output: the bounds leave about 4x of headroom for deeper models.
RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class Comparison:
    """Largest absolute difference, the reference's largest magnitude, and their ratio."""

    max_abs: float
    max_ref: float
    note: str | None = None  # why max_abs is not a number: shapes differ, or NaN/Inf in an output

    @property
    def max_rel(self) -> float:
        """max_abs relative to the largest reference output magnitude."""
        return self.max_abs / self.max_ref if self.max_ref else float(self.max_abs > 0)

    def within(self, atol: float | None = None, rtol: float = 1e-5) -> bool:
        """True when max_abs <= atol (default: rtol x the largest reference magnitude)."""
        bound = atol if atol is not None else rtol * self.max_ref
        return self.max_abs <= bound


def lowest_precision(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The floating dtype of least precision among `dtypes` (float32 if none is floating)."""
    return max(set(dtypes) & set(RTOL), key=RTOL.__getitem__, default=torch.float32)


def weights_dtype(*models: nn.Module) -> torch.dtype:
    """The floating dtype of least precision among the parameters of `models` (float32 if none)."""
    return lowest_precision(p.dtype for m in models for p in m.parameters())


def rtol_for(dtype: torch.dtype | str | None) -> float:
    """The default relative tolerance of a comparison with weights of `dtype` (a torch dtype or its name)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return RTOL.get(dtype or torch.float32, RTOL[torch.float32])


def check_atol(atol: float | None, name: str = "atol") -> float | None:
    """`atol` when it is a finite number at least 0 (or None), else an `OptionError`."""
    if atol is not None and not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise OptionError(f"{name} must be a finite number at least 0, got {atol}")
    return atol


def _first_tensor(out, floating: bool) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() or not floating else None
    if isinstance(out, (tuple, list, dict)):
        for o in out.values() if isinstance(out, dict) else out:
            t = _first_tensor(o, floating)
            if t is not None:
                return t
    return None


def main_output(out) -> torch.Tensor:
    """The first floating-point tensor of a model output (logits, or the last hidden state; a
    backbone's first feature map, inside the tuple it returns; an audio codec's audio values,
    after its integer codes), else its first tensor."""
    t = _first_tensor(out, floating=True)
    if t is None:
        t = _first_tensor(out, floating=False)
    if t is None:
        raise ValueError(f"the model returned no tensor ({type(out).__name__})")
    return t


def seeded_output(model: nn.Module, inputs: dict, seed: int = 0) -> torch.Tensor:
    """`main_output(model(**inputs))` with torch's generator set to `seed` for the call (and
    restored after). A forward that draws random numbers in eval mode (ViLT samples image
    patches with torch.multinomial) then draws the same ones in the dense model and in its
    conversion, whose MoE layers draw none: their outputs are comparable."""
    tensors = [*model.parameters(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):  # manual_seed seeds CUDA too: restore what it touches
        torch.manual_seed(seed)
        return main_output(model(**inputs))


@torch.no_grad()
def compare(reference: nn.Module, candidate: nn.Module, seed: int = 0, batch: int = 2, seq: int = 16) -> Comparison:
    """Run both models (eval mode) on the same inputs made from the reference's config."""
    inputs = example_inputs_for(reference, batch=batch, seq=seq, seed=seed)
    reference.eval()
    candidate.eval()
    ref = seeded_output(reference, inputs, seed).float()
    try:
        got = seeded_output(candidate, inputs, seed).float()
    except (TypeError, ValueError, RuntimeError, IndexError, StopIteration) as err:
        # Another architecture's model does not take the reference's inputs (decoder ids, token
        # ids past its vocabulary, ...): the two were not meant to be compared.
        detail = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        raise OptionError(f"the two models do not take the same inputs ({type(reference).__name__} vs "
                          f"{type(candidate).__name__}: {detail}); compare an output with the dense model it was "
                          "made from") from None
    if ref.shape != got.shape:
        return Comparison(float("inf"), float(ref.abs().max()), "the outputs have different shapes")
    for what, t in (("dense", ref), ("converted", got)):
        if not bool(torch.isfinite(t).all()):
            return Comparison(float("inf"), float(ref.abs().max()), f"the {what} model's outputs hold NaN or Inf")
    return Comparison(float((ref - got).abs().max()), float(ref.abs().max()))
