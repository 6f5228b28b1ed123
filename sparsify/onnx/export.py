"""Export a model (upcycled or dense) to ONNX: capture, translate, fuse, check, write.

    model -> torch.export (MoE layers as one custom op, dynamic batch and sequence)
          -> torch.onnx.export (the op written as standard-ops MoE)
          -> fold-constants, [fuse-moe-ort], dead-node removal -> onnx.checker -> files

Decoder-only and encoder-only models give one graph (the model's inputs, named as its forward
names them: `input_ids` and `attention_mask`, or `pixel_values`, `input_features`, `input_values`
-> `logits` or `last_hidden_state`); encoder-decoder models give `STEM-encoder.onnx`
(-> `last_hidden_state`) and `STEM-decoder.onnx` (`decoder_input_ids`, `encoder_hidden_states`,
and `encoder_attention_mask` after a token encoder -> `logits`). See `signatures`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import operator
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import onnx_ir as ir
import torch
import torch.nn as nn

from .. import __version__
from ..errors import CaptureError, OptionError, SparsifyError
from ..formats.onnx import METADATA_KEY, write_onnx
from ..inputs import main_input_name
from ..io.atomic import check_output
from ..passes.onnx.cleanup import cleanup
from ..passes.onnx.fuse_moe_ort import SITE_KEY, FuseMoEOrt, FusionReport
from .signatures import WRAPPER, fixed_inputs, graph_inputs, graph_paths, model_graphs, name_io
from .torch_op import TRANSLATIONS, export_friendly

__all__ = [
    "export_onnx",
    "check_export_options",
    "capture_graphs",
    "write_graphs",
    "capture_onnx",
    "lower_onnx",
    "CapturedGraph",
    "ExportResult",
    "ExportedGraph",
    "TARGETS",
    "OPSETS",
    "DEFAULT_OPSET",
    "graph_paths",
]

TARGETS = ("ort", "standard")
# The opsets torch.onnx's exporter writes (18, converted upwards) that were checked to run in
# ONNX Runtime 1.32 with the fused operator; 18 runs in every ONNX Runtime since 1.14.
OPSETS = range(18, 24)
DEFAULT_OPSET = 18


@dataclass
class ExportedGraph:
    """One exported graph: its role (model, encoder, decoder), file, and fusion report."""

    role: str
    path: Path
    inputs: list[str]
    outputs: list[str]
    report: FusionReport = field(default_factory=FusionReport)
    fixed: dict[str, list] = field(default_factory=dict)  # inputs held fixed in the graph (an image grid)


@dataclass
class ExportResult:
    """What `export_onnx` wrote."""

    graphs: list[ExportedGraph]
    files: list[Path]
    target: str
    opset: int


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its step names


def _reason(err: BaseException) -> str:
    """One line on why an export failed: torch.onnx wraps the cause in an error whose first line
    only names the step ("Failed to convert the exported program to an ONNX model"), so the
    innermost cause's first line, named with the step's."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    inner, seen = err, set()
    while inner.__cause__ is not None and id(inner) not in seen:
        seen.add(id(inner))
        inner = inner.__cause__
    if inner is not err:
        detail = (str(inner).strip().splitlines() or [""])[0]
        first = f"{first.split('.')[0]}: {type(inner).__name__}: {detail}" if detail else first
    return _ANSI.sub("", first)[:300]


def capture_onnx(module: nn.Module, kwargs: dict, dynamic_shapes: dict | None, opset: int = DEFAULT_OPSET,
                 others: Sequence[dict] = ()) -> ir.Model:
    """`module(**kwargs)` as an ONNX model whose MoE layers are standard ops (not yet cleaned
    up or fused: see `lower_onnx`). `others`: inputs at other sizes that a dynamic graph must
    hold for (see `_check_guards`)."""
    inner = getattr(module, WRAPPER, module)
    attention = _set_attention(inner, "eager")
    experts = _set_experts(inner, "batched_mm")
    try:
        with export_friendly(module), _fixed_grid(module):
            program = _export_program(module, kwargs, dynamic_shapes)
            if fixed_inputs(module):
                program = _fold_grid(program, kwargs)
        if dynamic_shapes:
            _check_guards(program, others, type(inner).__name__)
        _keep_near_identity_constants(program)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=TRANSLATIONS,
                                             opset_version=opset, verbose=False)
    except SparsifyError:
        raise
    except Exception as err:  # torch.export and torch.onnx raise many types; all mean "could not capture"
        first = _reason(err)
        if dynamic_shapes and "specialized it to be a constant" in str(err):  # Funnel's pooling, for one
            first = "its forward fixes the batch or sequence length; export a static graph (--static, dynamic=False)"
        raise CaptureError(f"could not export {type(inner).__name__} to ONNX: {first}") from err
    finally:
        _set_attention(inner, attention)
        _set_experts(inner, experts)
    _tag_scopes(onnx_program.model)
    return onnx_program.model


@contextlib.contextmanager
def _fixed_grid(module: nn.Module) -> Iterator[None]:
    """For a wrapper that holds an image grid fixed (signatures.GridGraph): the trace keeps what
    is computed from the grid as constants (sparsify.capture.constant_tracing), so that the
    forward's `.tolist()` of them gives Python numbers; for others nothing changes. (No real
    propagation: the weights are real here, and ranges made constant leave nothing data-dependent.)"""
    if not fixed_inputs(module):
        yield
        return
    from ..capture import constant_tracing

    with constant_tracing():
        yield


def _fold_grid(program: torch.export.ExportedProgram, kwargs: dict) -> torch.export.ExportedProgram:
    """The program with everything computed from its constants alone (the fixed grid's windows,
    boundaries, positions: data-dependent ops on constants) folded into constants, exported
    again: torch.onnx's decomposition re-traces the program, and would meet those ops with
    symbolic sizes. Nothing computed from a parameter or buffer is folded."""
    from torch._export.passes.constant_folding import replace_node_with_constant

    module = program.module()
    sig = program.graph_signature
    state = {*program.state_dict, *sig.parameters, *sig.buffers}  # what is folded: never these
    values: dict[torch.fx.Node, object] = {}  # what each node computed from constants alone holds
    with torch.utils._python_dispatch._disable_current_modes(), torch.no_grad():
        for node in module.graph.nodes:
            if node.op == "get_attr" and node.target not in state:
                values[node] = functools.reduce(getattr, node.target.split("."), module)
            elif (node.op == "call_function" and node.all_input_nodes and all(a in values for a in node.all_input_nodes)
                  and (node.target is operator.getitem  # an element of a folded split
                       or isinstance(node.target, torch._ops.OpOverload)
                       and torch.Tag.nondeterministic_seeded not in node.target.tags)):
                args, kw = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
                values[node] = node.target(*args, **kw)
    for node, value in values.items():
        if node.op == "call_function" and isinstance(value, torch.Tensor) and any(u not in values for u in node.users):
            replace_node_with_constant(module, node, value)
        elif node.op == "call_function" and value is None and not node.users:
            # a check of folded values (_assert_tensor_metadata), which passed as they were folded:
            # left in, it would keep all it checks in the graph (Kimi K2.5's merge index)
            module.graph.erase_node(node)
    module.graph.eliminate_dead_code()
    module.recompile()
    return torch.export.export(module, (), kwargs, strict=False)


def _export_program(module: nn.Module, kwargs: dict, dynamic_shapes: dict | None) -> torch.export.ExportedProgram:
    """torch.export with dynamic axes. A model that fixes the size of an axis asked dynamic, or
    ties it to another (xLSTM, CPM-Ant: a fixed sequence length; Reformer: its chunking), makes
    torch.export fail with "Constraints violated (L['input_ids'].size()[1])"; that is refused in
    one line naming the axes. (Dim.AUTO would export such models, but as graphs that only run at
    the traced sizes while their inputs read as dynamic: ONNX Runtime then fails at other sizes.)
    A forward that computes sizes as tensors from a dynamic size (audio codecs pad each
    convolution by a length computed from the input's and their integer stride buffers, which
    `shape_constants` keeps as values) cannot be traced dynamic: refused, saying to export static."""
    from ..capture import shape_constants

    try:
        with shape_constants(module):
            return torch.export.export(module, (), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        from ..capture import _data_dependent

        first = (str(err).strip().splitlines() or [""])[0]
        model = type(getattr(module, WRAPPER, module)).__name__
        if dynamic_shapes and _data_dependent(err):
            # sizes computed as tensors from a dynamic size (an audio codec's padding from the
            # length): unknown values to the trace, known ones at fixed shapes
            raise CaptureError(f"could not export {model} to ONNX with dynamic shapes: its forward computes sizes from "
                               "tensor values (data-dependent); export with static shapes (--static, or dynamic=False)"
                               ) from err
        if not dynamic_shapes or "Constraints violated" not in first:
            raise
        axes = re.findall(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", first)
        named = ", ".join(dict.fromkeys(f"{name} axis {axis}" for name, axis in axes)) or "an input axis"
        raise CaptureError(f"could not export {model} to ONNX with dynamic shapes: the model fixes the size of {named} "
                           "(or ties it to another); export with static shapes (--static, or dynamic=False)") from err


def _check_guards(program: torch.export.ExportedProgram, others: Sequence[dict], model: str) -> None:
    """Refuse a dynamic graph that holds only at some sizes. torch.export records the conditions
    on input sizes that the traced code took for granted (its guards: SEW pads its upsampled
    frames only for odd lengths, so its graph assumes the example's even length); torch checks
    them when the program runs, but an ONNX graph has no such check and computes a wrong result
    at other sizes. Each guard is evaluated on the inputs `others` that lie in the ranges the
    program declares for its sizes (a model's fixed limit, as its maximum positions, is no branch:
    an example at that limit is not refused)."""
    others = [kwargs for kwargs in others if _in_range(program, kwargs)]
    for code in getattr(program, "_guards_code", None) or ():
        for kwargs in others:
            try:
                holds = eval(code, {"__builtins__": {}, "min": min, "max": max, "L": kwargs})  # noqa: S307
            except Exception:  # a guard on something other than input sizes: not ours to judge
                continue
            if holds:
                continue
            sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor))
            raise CaptureError(f"could not export {model} to ONNX with dynamic shapes: the traced graph holds only "
                               f"for some input sizes (not for {sizes}: its code branches on them); export with "
                               "static shapes (--static, or dynamic=False)")


def _in_range(program: torch.export.ExportedProgram, kwargs: dict) -> bool:
    """Whether each size of `kwargs` lies in the range torch.export recorded for its symbol."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, value in kwargs.items():
        fake = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(value, torch.Tensor) or not isinstance(fake, torch.Tensor):
            continue
        for size, dim in zip(value.shape, fake.shape):
            bounds = program.range_constraints.get(getattr(getattr(dim, "node", None), "expr", None))
            if bounds is not None and not (bounds.lower <= size <= bounds.upper):
                return False
    return True


# onnxscript's optimizer (which torch.onnx runs) removes `x + c`, `x - c` as no-ops when
# |c| <= 1e-8 and `x * c`, `x / c` when c is within 1e-5 of 1 (its scalar patterns' math.isclose
# tolerances): an RMSNorm's eps of 1e-8 vanishes, and the norm of a small vector is wrong
# (MuseGlimmer's post-norms). Such scalars are written as one-element tensors, which those
# scalar patterns do not match; the result is the same for any input of rank 1 or more.
_NEAR_IDENTITY = {"add": 0.0, "sub": 0.0, "mul": 1.0, "div": 1.0}
_ABS_TOL, _REL_TOL = 1e-8, 1e-5


def _near_identity(op: str, value) -> bool:
    if not isinstance(value, float) or value == _NEAR_IDENTITY[op]:
        return False
    if _NEAR_IDENTITY[op] == 0.0:
        return abs(value) <= _ABS_TOL
    return abs(value - 1.0) <= max(_REL_TOL * max(abs(value), 1.0), _ABS_TOL)


def _keep_near_identity_constants(program: torch.export.ExportedProgram) -> int:
    """Rewrite in place each add/sub/mul/div of a tensor (rank >= 1) by a Python scalar the
    optimizer would take for 0 or 1 into one by a one-element tensor; returns how many."""
    aten = torch.ops.aten
    ops = {getattr(aten, name).Tensor: name for name in _NEAR_IDENTITY}
    ops.update({getattr(aten, name).Scalar: name for name in _NEAR_IDENTITY})
    graph, changed = program.graph, 0
    for node in list(graph.nodes):
        op = ops.get(node.target) if node.op == "call_function" else None
        if op is None or len(node.args) < 2 or not _near_identity(op, node.args[1]):
            continue
        x = node.args[0]
        fake = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(fake, torch.Tensor) or fake.dim() == 0 or not fake.is_floating_point():
            continue
        with graph.inserting_before(node):
            const = graph.call_function(aten.full.default, ([1], node.args[1]),
                                        {"dtype": fake.dtype, "device": fake.device})
        const.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        const.meta["val"] = fake.new_full((1,), node.args[1])
        target = getattr(aten, op).Tensor
        node.target = target
        node.args = (x, const, *node.args[2:])
        changed += 1
    if changed:
        program.graph_module.recompile()
    return changed


def _tag_scopes(model: ir.Model) -> None:
    """Make the module scopes the exporter recorded read as paths of the model (not of the
    export wrapper), and mark the nodes of each MoE layer with `sparsify.site`."""
    key = "pkg.torch.onnx.name_scopes"
    for node in model.graph:
        if key not in node.metadata_props:
            continue
        scopes = ast.literal_eval(node.metadata_props[key])
        scopes = [s.removeprefix(WRAPPER + ".") for s in scopes if s not in ("", WRAPPER)]
        node.metadata_props[key] = repr(scopes)
        if "ExportMoE" in node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "") and len(scopes) > 1:
            node.metadata_props[SITE_KEY] = scopes[-2]


@dataclass
class CapturedGraph:
    """One graph of a model captured in standard ops, before clean-up and fusion."""

    role: str
    model: ir.Model
    outputs: list[str]
    fixed: dict[str, list] = field(default_factory=dict)  # inputs the graph holds instead of taking


def check_export_options(target: str, opset: int, batch: int, seq: int) -> None:
    """Raise `OptionError` for a target, opset or static shape the exporter cannot write."""
    if target not in TARGETS:
        raise OptionError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if opset not in OPSETS:
        raise OptionError(f"--opset {opset} is not supported: the exporter targets opsets {OPSETS[0]} to {OPSETS[-1]}")
    if batch < 1 or seq < 1:
        raise OptionError(f"--batch and --seq must be 1 or more, got {batch} and {seq}")


def capture_graphs(model: nn.Module, opset: int = DEFAULT_OPSET, dynamic: bool = True, batch: int = 2,
                   seq: int = 8) -> list[CapturedGraph]:
    """Every graph of `model` (one, or encoder and decoder) in standard ops."""
    check_export_options("standard", opset, batch, seq)
    if getattr(model, "config", None) is None or main_input_name(model) is None:
        raise OptionError(f"cannot export {type(model).__name__}: only transformers models (token, image or audio "
                          "inputs) export")
    if dynamic:  # size-1 example dims would be specialised to 1
        batch, seq = max(batch, 2), max(seq, 3)
    was_training = model.training
    model.eval()
    graphs = []
    try:
        # inputs one batch and one or two positions larger, that a dynamic graph must also hold for
        others: dict[str, list[dict]] = {}
        for size in (1, 2) if dynamic else ():
            for role, kwargs, _ in graph_inputs(model, batch + 1, seq + size, True):
                others.setdefault(role, []).append(kwargs)
        for role, wrapper, kwargs, shapes, output in model_graphs(model, batch, seq, dynamic):
            onnx_model = capture_onnx(wrapper, kwargs, shapes if dynamic else None, opset, others.get(role, ()))
            outputs = [output]
            name_io(onnx_model, outputs)
            graphs.append(CapturedGraph(role, onnx_model, outputs, fixed_inputs(wrapper)))
    finally:
        model.train(was_training)
    return graphs


def write_graphs(graphs: list[CapturedGraph], model: nn.Module, out: str | Path, target: str = "ort",
                 force: bool = False, sources: Sequence = ()) -> ExportResult:
    """Clean up and (for "ort") fuse captured graphs in place, then write them next to `out`."""
    check_export_options(target, DEFAULT_OPSET, 1, 1)
    paths = graph_paths(model, out)
    exported, written = {}, []
    opset = 0
    for g in graphs:
        opset = g.model.opset_imports.get("", DEFAULT_OPSET)
        report = lower_onnx(g.model, target)
        g.model.metadata_props[METADATA_KEY] = json.dumps(_metadata(model, g.role, target, opset, report, g.fixed))
        exported[paths[g.role]] = g.model
        written.append(ExportedGraph(g.role, paths[g.role], [v.name for v in g.model.graph.inputs], g.outputs, report,
                                     g.fixed))
    files = write_onnx(exported, force=force, sources=sources)
    return ExportResult(written, files, target, opset)


def export_onnx(
    model: nn.Module,
    out: str | Path,
    target: str = "ort",
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    batch: int = 2,
    seq: int = 8,
    force: bool = False,
    sources: Sequence = (),
) -> ExportResult:
    """Export `model` (a transformers model, dense or upcycled) to ONNX file(s) at `out`.

    `target` "ort" fuses every MoE layer ONNX Runtime supports into `com.microsoft.MoE`;
    "standard" keeps portable standard ops. `dynamic` makes batch and sequence axes dynamic;
    `batch`/`seq` are the shapes of a static export (and of the example inputs otherwise).
    `sources`: the paths the model was read from, never written over.
    """
    check_export_options(target, opset, batch, seq)
    for p in graph_paths(model, out).values():  # before the slow capture
        check_output(p, force, sources, kind="file")
    return write_graphs(capture_graphs(model, opset, dynamic, batch, seq), model, out, target, force, sources)


def _set_attention(model: nn.Module, implementation: str | None) -> str | None:
    """Switch the attention implementation; returns the previous one. Exports use "eager":
    the SDPA decomposition of torch.onnx breaks T5's reshape of the attention output under
    symbolic shapes, and eager attention exports for every architecture."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if implementation and previous and previous != implementation and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    return previous


def _set_experts(model: nn.Module, implementation: str | None) -> str | None:
    """Switch the implementation of transformers' native experts (models with MoE blocks of
    their own that sparsify keeps, HunYuan-MoE's); returns the previous one. Exports use
    "batched_mm", one batched matmul over each token's selected experts: the default
    "grouped_mm" calls a custom op (transformers::grouped_mm_fallback) ONNX has no translation
    for, and "eager" loops over the experts a batch hits, which torch.export cannot trace."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_experts_implementation", None)
    if implementation and previous and previous != implementation and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    return previous


def lower_onnx(model: ir.Model, target: str) -> FusionReport:
    """Clean up `model` in place, then fuse its MoE layers for ONNX Runtime when the target is
    "ort"; returns what was fused."""
    cleanup()(model)
    if target != "ort":
        return FusionReport()
    fuse = FuseMoEOrt()
    fuse(model)
    return fuse.report


def _metadata(model: nn.Module, role: str, target: str, opset: int, report: FusionReport,
              fixed: dict[str, list] | None = None) -> dict:
    plan = getattr(model, "sparsify_plan", None)
    return {
        **({"fixed_inputs": fixed} if fixed else {}),  # values the graph holds (an image grid), not inputs
        "sparsify_version": __version__,
        "graph": role,
        "target": target,
        "opset": opset,
        "plan": plan.to_dict() if plan is not None else None,
        "fusion": report.to_dict(),
    }
