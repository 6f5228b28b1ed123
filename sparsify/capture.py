"""Capture a model as an ATen graph with torch.export, without its weights.

transformers 5 removed its torch.fx tracer, while `torch.export.export(..., strict=False)`
captures Hugging Face models whole and tags every node with `nn_module_stack`, the path of the
module that owns it. That tag is what FFN discovery maps matches back to modules with.

The weights are never needed: capture swaps every parameter for a fake tensor (shape, dtype and
device, no storage; `torch._subclasses.fake_tensor`) of one fake mode, which torch.export then
traces with. A model built with its parameters on the meta device (`sparsify.io.skeleton`)
captures exactly like a loaded one: its fakes are CPU tensors, so the position tables, masks and
ranges that forward computes from buffers or creates on the CPU meet weights of the same device
(with meta parameters they met meta tensors and failed). Buffers are faked from their values
(they are small and computed from the config), which the second trace below propagates. Buffers
of a few integers (`_shape_constant`: a convolution's stride, kernel size and padding, which Mimi,
EnCodec and WavTokenizer keep as tensors and pad every call by) stay real and trace as constants,
so that the sizes computed from them are numbers in every trace (faked, they were unbacked
symbols, and propagated for real, garbage); `shape_constants` does the same for the ONNX export.

Forward may branch on the values of its inputs ("if padding_mask.any()": FSMT, LED), which a
symbolic trace cannot decide ("Could not guard on data-dependent expression"). Capture then
traces once more, propagating the real values of the example inputs and buffers alongside the
fakes (torch's `fake_tensor_propagate_real_tensors`, which `torch.export.draft_export` uses), so
that the branch those inputs take is the one captured. Only ops on inputs and buffers compute
for real there (masks, positions: small); every op that touches a weight stays fake, since the
weights have no values to propagate. The first trace does without: propagation makes a trace
several times slower.

Vision towers of Qwen2-VL style read their image grid with `.tolist()` and size every tensor
after it from those numbers (window and sequence boundaries, position tables), which neither a
trace with a symbolic grid can decide nor real propagation (its unbacked sizes then fail to
match the real ones). Capture specialises such inputs (`STATIC_VALUE_INPUTS`) to their values:
they enter the trace as Python lists (constants for torch.export), a forward pre-hook makes them
tensors again inside the trace, and `constant_tracing` makes the fake mode and the tracer keep
what is computed from constants (and `torch.arange` of Python numbers) as constants, up to 65536
elements instead of their 1, so that `.tolist()` of them gives Python numbers; what is left
data-dependent is decided by real propagation. The graph is the forward at that grid: its FFN
sites and modules are those of any grid, and the rewritten model runs eagerly for any.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import CaptureError
from .inputs import DEFAULT_BATCH, DEFAULT_SEQ, STATIC_VALUE_INPUTS, example_inputs_for, model_device

__all__ = ["Captured", "capture", "shape_constants", "specialised", "constant_tracing", "static_values", "example_inputs_for",
           "DEFAULT_BATCH", "DEFAULT_SEQ"]


@dataclass
class Captured:
    """An exported program plus the inputs it was captured with."""

    program: torch.export.ExportedProgram
    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        """The ATen graph that analysis passes read."""
        return self.program.graph_module.graph

    def param_name(self, node: torch.fx.Node) -> str | None:
        """The model parameter (or buffer) name a placeholder node stands for, if any."""
        sig = self.program.graph_signature
        return sig.inputs_to_parameters.get(node.name) or sig.inputs_to_buffers.get(node.name)


def _fake_mode(**shape_env):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # what torch.export makes for itself (non_strict_utils.make_fake_inputs), so that it can use this one
    return FakeTensorMode(shape_env=ShapeEnv(tracked_fakes=[], **shape_env), allow_non_fake_inputs=True, export=True)


_SHAPE_CONSTANT_NUMEL = 64  # integer buffers up to this many elements keep their values in the trace


def _shape_constant(t: torch.Tensor) -> bool:
    """Whether buffer `t` holds numbers that sizes are computed from (a stride, a kernel size, a
    padding stored as a tensor): a few integers, computed by the model, never a weight."""
    return (t.numel() <= _SHAPE_CONSTANT_NUMEL and not (t.is_floating_point() or t.is_complex())
            and t.device.type != "meta" and not t.is_sparse)


@contextlib.contextmanager
def shape_constants(model: nn.Module) -> Iterator[None]:
    """Inside the block, torch.export of `model` (with its real weights: ONNX export) keeps the
    values of its few-integer buffers (`_shape_constant`), as capture does: the block gives
    torch.export the fake mode it would make for itself, which already holds those buffers as
    constant fakes. Without such buffers nothing changes."""
    buffers = [t for t in model.buffers() if _shape_constant(t)]
    if not buffers:
        yield
        return
    from torch._guards import TracingContext, tracing

    mode = _fake_mode(trace_asserts=True)  # as torch.export's own, which asserts dynamic sizes' ranges
    kept = [mode.fake_tensor_converter.from_real_tensor(mode, t, make_constant=True) for t in buffers]
    with tracing(TracingContext(mode)):
        yield
    del kept


@contextlib.contextmanager
def _fake_weights(model: nn.Module, mode, device: torch.device) -> Iterator[None]:
    """Inside the block every parameter of `model` is a fake tensor of `mode` (meta ones on
    `device`) and every buffer a fake of its own value (meta ones on `device`, without one).
    Tied tensors stay tied; a few integers (`_shape_constant`) stay real and trace as constants.
    The model's own tensors are put back on exit."""
    # the swap torch.export itself makes to trace with its fakes (torch.func.functional_call's too)
    from torch.nn.utils.stateless import _reparametrize_module

    fakes: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    kept: list[torch.Tensor] = []
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) not in fakes:
            if isinstance(t, nn.Parameter) or t.device.type == "meta":
                # made from a fresh meta tensor, so that no real tensor stands behind it even when
                # the mode propagates real values (a factory call in the mode would allocate one)
                meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                fake = mode.fake_tensor_converter.from_meta_and_device(
                    mode, meta, device if t.device.type == "meta" else t.device)
            elif _shape_constant(t):
                # its value is part of the architecture: kept, so that sizes computed from it
                # (a convolution's padding from its stride and kernel size) are numbers. The
                # buffer itself stays: torch.export fakes it again and finds this constant fake
                # in the mode's memo (a fake of a fake would lose the value); the memo holds
                # fakes weakly, so `kept` holds them for the block
                kept.append(mode.fake_tensor_converter.from_real_tensor(mode, t, make_constant=True))
                fake = t
            else:
                fake = mode.from_tensor(t, static_shapes=True)
            fakes[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
        state[name] = fakes[id(t)]
    with _reparametrize_module(model, state, tie_weights=True):
        yield


def _real(value: Any, device: torch.device) -> Any:
    """Example inputs given on the meta device, as real zeros on `device` (inputs are small)."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    return value


def _export(model: nn.Module, args: tuple, kwargs: dict, device: torch.device, real_values: bool):
    import torch._functorch.config  # noqa: F401 (`import torch` alone does not import it)
    from torch._guards import TracingContext, tracing

    # the fake mode reads the flag when it is made
    with torch._functorch.config.patch(fake_tensor_propagate_real_tensors=real_values):
        mode = _fake_mode()
        # torch.export takes the fake mode of an enclosing tracing context instead of making its own
        with _fake_weights(model, mode, device), tracing(TracingContext(mode)):
            return torch.export.export(model, args, kwargs, strict=False)


_CONSTANT_NUMEL = 1 << 16  # tensors computed from constants that the fake mode keeps as constants


@contextlib.contextmanager
def constant_tracing() -> Iterator[None]:
    """Inside the block, torch.export keeps tensors computed from constants (up to
    `_CONSTANT_NUMEL` elements) as constants, in its fake mode and in its tracer, so that
    `.tolist()` of them gives Python numbers (see the module docstring)."""
    import torch._subclasses.fake_tensor as fake_tensor
    import torch.fx.experimental.proxy_tensor as proxy_tensor

    mode_class = fake_tensor.FakeTensorMode
    may_turn_const = mode_class.may_turn_const

    def constants(mode, t: torch.Tensor) -> bool:
        # never a tensor whose elements share memory (an expand): the fake of a constant is
        # made by copying into a tensor of its strides
        return may_turn_const(mode, t) or (
            t.numel() <= _CONSTANT_NUMEL and not t.is_sparse and not mode.is_our_fake(t)
            and t.device.type != "meta" and torch._debug_has_internal_overlap(t) != 1)  # 1: overlaps

    mode_class.may_turn_const = constants
    limit = proxy_tensor.CONSTANT_NUMEL_LIMIT  # the tracer's own record of constants, read per op
    proxy_tensor.CONSTANT_NUMEL_LIMIT = max(limit, _CONSTANT_NUMEL)
    try:
        with _ConstantRanges():
            yield
    finally:
        proxy_tensor.CONSTANT_NUMEL_LIMIT = limit
        mode_class.may_turn_const = may_turn_const


class _ConstantRanges(torch.overrides.TorchFunctionMode):
    """torch.arange of Python numbers as a constant: neither the fake mode nor the tracer makes
    constants of factories, and the windows of a fixed grid are cut from such ranges."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.arange and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():
                real = torch.arange(*args, **kwargs)
            if real.numel() <= _CONSTANT_NUMEL:
                return torch.ops.aten.lift_fresh_copy(real)  # what torch.tensor(data) records: a constant
        return func(*args, **kwargs)


def static_values(kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inputs among `kwargs` whose values fix the forward's shapes (STATIC_VALUE_INPUTS)."""
    return {k: v for k, v in kwargs.items() if k in STATIC_VALUE_INPUTS and isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def specialised(model: nn.Module, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Inside the block, `model` traced with the kwargs this yields is specialised to the values
    of its STATIC_VALUE_INPUTS (see the module docstring); with none, nothing changes."""
    static = static_values(kwargs)
    if not static:
        yield kwargs
        return
    kinds = {k: (v.dtype, v.device) for k, v in static.items()}

    def as_tensors(_module, args, kw):
        return args, {k: torch.tensor(v, dtype=kinds[k][0], device=kinds[k][1]) if k in kinds and isinstance(v, list)
                      else v for k, v in kw.items()}

    handle = model.register_forward_pre_hook(as_tensors, with_kwargs=True)
    try:
        with constant_tracing():
            yield {k: v.tolist() if k in static else v for k, v in kwargs.items()}
    finally:
        handle.remove()


def _data_dependent(err: BaseException) -> bool:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return isinstance(err, GuardOnDataDependentSymNode) or "data-dependent" in str(err)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """No stack trace per node (discovery reads nn_module_stack only, and recording traces is a
    large share of export time on big models), and nothing written by a failing trace: torch.export
    prints the partial graph to stderr and logs warnings, and capture reports failures itself."""
    import torch.fx.config as fx_config

    emit = getattr(fx_config, "do_not_emit_stack_traces", None)
    if emit is not None:
        fx_config.do_not_emit_stack_traces = True
    loggers = [logging.getLogger(n) for n in ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if emit is not None:
            fx_config.do_not_emit_stack_traces = emit
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(
    model: nn.Module,
    example_inputs: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> Captured:
    """Export `model` in eval mode (dropout as identity) with the given or config-made inputs,
    its weights faked (see the module docstring): no weight memory, on any device."""
    if example_inputs is None and example_kwargs is None:
        args, kwargs = (), example_inputs_for(model)
    else:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    device = model_device(model)
    args = tuple(_real(a, device) for a in args)
    kwargs = {k: _real(v, device) for k, v in kwargs.items()}
    was_training = model.training
    model.eval()
    try:
        with _quiet_export(), specialised(model, kwargs) as traced:
            try:
                program = _export(model, args, traced, device, real_values=False)
            except Exception as err:
                if not _data_dependent(err):
                    raise
                program = _export(model, args, traced, device, real_values=True)
    except Exception as err:  # torch.export raises many types; all mean "could not capture"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first[:300]}; "
            "check that example_inputs match the model's forward"
        ) from err
    finally:
        model.train(was_training)
    return Captured(program, args, kwargs)
