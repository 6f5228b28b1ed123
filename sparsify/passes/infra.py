"""Pass infrastructure, shaped after torch.fx's `PassBase`/`PassManager` and onnx-ir's passes.

A pass is a callable on a `PassContext` (the model, its captured graph, the plan being built)
returning a `PassResult`. `requires` checks preconditions before the work, `ensures`
postconditions after. The manager runs passes in order; an unexpected failure is reported with
the failing pass's name and the passes that ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch.nn as nn

from ..capture import Captured
from ..errors import PassError, SparsifyError
from ..plan import UpcyclePlan

__all__ = ["Pass", "PassContext", "PassResult", "PassManager", "PreconditionError", "PostconditionError"]


class PreconditionError(PassError):
    """A pass was run on a context it cannot work on (e.g. select-layers before find-ffn)."""


class PostconditionError(PassError):
    """A pass finished but left the context in a state it promised not to."""


@dataclass
class PassContext:
    """What passes read and write: the model, example inputs, the captured graph, the plan, and
    `weights`, where the parameters of a model built on the meta device are read (a
    `Checkpoint`; passes that run the model, like init-router, read them from there)."""

    model: nn.Module
    example_inputs: tuple | None = None
    example_kwargs: dict[str, Any] | None = None
    captured: Captured | None = None
    plan: UpcyclePlan = field(default_factory=UpcyclePlan)
    weights: Any = None


@dataclass
class PassResult:
    """The outcome of a pass or a pipeline: the (possibly rewritten) model, the plan, and
    whether anything changed."""

    model: nn.Module
    plan: UpcyclePlan
    modified: bool = False


class Pass:
    """Base of all passes. Subclasses set `name` (kebab-case) and implement `call`."""

    name: ClassVar[str] = "pass"
    in_place: ClassVar[bool] = True  # passes rewrite the given model; nothing is copied

    def requires(self, ctx: PassContext) -> None:
        """Raise `PreconditionError` when `ctx` is not fit for this pass."""

    def ensures(self, ctx: PassContext) -> None:
        """Raise `PostconditionError` when the pass left `ctx` inconsistent."""

    def call(self, ctx: PassContext) -> bool:
        """Do the work on `ctx`; return True when the model or plan changed."""
        raise NotImplementedError(f"{type(self).__name__} must implement call()")

    def __call__(self, ctx: PassContext) -> PassResult:
        self.requires(ctx)
        modified = self.call(ctx)
        self.ensures(ctx)
        return PassResult(ctx.model, ctx.plan, modified)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassManager:
    """Runs passes in order over one model: `PassManager([...]).run(model) -> PassResult`."""

    def __init__(self, passes: Sequence[Pass]):
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {p!r}")
        self.passes = list(passes)

    def run(
        self,
        model: nn.Module,
        example_inputs: tuple | None = None,
        example_kwargs: dict[str, Any] | None = None,
        plan: UpcyclePlan | None = None,
        weights: Any = None,
    ) -> PassResult:
        """Run every pass on `model`. `example_inputs` are positional inputs for capture, needed
        for modules whose inputs cannot be made from a Hugging Face config; `weights` is the
        checkpoint of a model built on the meta device (see `PassContext`)."""
        ctx = PassContext(model, example_inputs, example_kwargs, plan=plan or UpcyclePlan(), weights=weights)
        modified, ran = False, []
        for p in self.passes:
            try:
                result = p(ctx)
            except SparsifyError:
                raise
            except Exception as err:
                before = ", ".join(ran) or "none"
                raise PassError(
                    f"pass '{p.name}' failed with {type(err).__name__}: {err} (passes run before it: {before})"
                ) from err
            ctx.model = result.model
            modified |= result.modified
            ran.append(p.name)
        return PassResult(ctx.model, ctx.plan, modified)
