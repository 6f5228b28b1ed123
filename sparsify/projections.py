"""Projections in an ATen graph: the linear maps by a model parameter that FFN matching joins.

A projection is any of

- `aten.linear` (nn.Linear, F.linear; weight [out, in]);
- `aten.addmm` between views (GPT-2's Conv1D; weight [in, out]);
- `aten.matmul` / `aten.mm` by a parameter ([in, out]) or by its transpose (`x @ W.T`, with W
  [out, in]), with an optional bias `add`;
- a 1x1 convolution, `aten.conv1d` / `aten.conv2d` with unit kernel, stride and dilation and
  no padding (SqueezeBERT's grouped Conv1d; `padding="same"` or `"valid"`, EfficientNet's,
  pads a unit kernel with nothing): channels-first, weight [out, in / groups, 1...].

A projection may also be fused: one projection whose output is cut into equal parts (gate and
up of a fused gate/up projection, GLM's and ModernBERT's `chunk(2, dim=-1)`, or interleaved
rows, `[..., 0::2]` and `[..., 1::2]`). `part_at` recognises one part of such an output.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .capture import Captured

__all__ = ["Projection", "projection_at", "part_at", "VIEWS", "TRANSPOSES", "through_views_back", "is_op"]

aten = torch.ops.aten

VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
}
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default, aten.permute.default, aten.transpose.int}
# (the .padding overloads take padding as a string: "same" or "valid", both none for a 1x1 kernel)
_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv1d.padding: 1, aten.conv2d.padding: 2}


@dataclass
class Projection:
    """A linear map by a model parameter: input node, weight/bias names, layout, its nodes.

    `part` is set for one part of a fused projection's output: (index, parts, "halves" |
    "interleaved"); `out_features` is then the part's size. `groups` is a grouped
    convolution's group count and `feature_axis` the input axis holding the features."""

    input: Node
    output: Node
    weight: str
    bias: str | None
    layout: str  # "linear" ([out, in]), "conv1d" ([in, out]) or "conv1x1" ([out, in / groups, 1...])
    in_features: int
    out_features: int
    nodes: list[Node] = field(default_factory=list)
    groups: int = 1
    feature_axis: int = -1
    part: tuple[int, int, str] | None = None


def is_op(node: Node, *targets) -> bool:
    """True when `node` calls one of `targets`."""
    return node.op == "call_function" and node.target in targets


def _param(captured: Captured, node: object) -> str | None:
    return captured.param_name(node) if isinstance(node, Node) and node.op == "placeholder" else None


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def through_views_back(node: Node, out: list[Node]) -> Node:
    """The first non-view node above `node`; the views passed are appended to `out`."""
    while is_op(node, *VIEWS) and isinstance(node.args[0], Node):
        out.append(node)
        node = node.args[0]
    return node


def _is_transpose_2d(node: Node) -> bool:
    """A transpose of a 2-D tensor (every spelling torch.export writes for `W.T`, `W.t()`, `W.mT`)."""
    if not is_op(node, *TRANSPOSES):
        return False
    if node.target is aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target is aten.transpose.int:
        return {int(d) % 2 for d in node.args[1:3]} == {0, 1}
    return True


def _bias_add(captured: Captured, node: Node) -> tuple[Node, str | None]:
    """`node` followed by `+ bias` (a parameter): the add and the bias name, else (node, None)."""
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], aten.add.Tensor) and len(users[0].args) == 2:
        other = [a for a in users[0].args if a is not node]
        if len(other) == 1 and _param(captured, other[0]) is not None:
            return users[0], _param(captured, other[0])
    return node, None


def _ones(value: object, n: int, one: int) -> bool:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    return len(values) in (1, n) and all(int(v) == one for v in values)


def _conv(captured: Captured, node: Node) -> Projection | None:
    dims = _CONVS[node.target]
    args = list(node.args) + [None] * (7 - len(node.args))
    x, wnode, b, stride, padding, dilation, groups = args[:7]
    w, shape = _param(captured, wnode), _shape(wnode)
    if w is None or shape is None or len(shape) != 2 + dims or any(d != 1 for d in shape[2:]):
        return None
    if isinstance(padding, str):  # padding="same" / "valid": a unit kernel at stride 1 pads nothing
        padding = 0 if padding in ("same", "valid") else None
        if padding is None:
            return None
    if not (_ones(stride if stride is not None else 1, dims, 1) and _ones(padding if padding is not None else 0, dims, 0)
            and _ones(dilation if dilation is not None else 1, dims, 1)):
        return None
    groups = int(groups) if groups is not None else 1
    bias = _param(captured, b) if b is not None else None
    if b is not None and bias is None:
        return None
    return Projection(x, node, w, bias, "conv1x1", shape[1] * groups, shape[0], [node], groups=groups,
                      feature_axis=-(dims + 1))


def projection_at(captured: Captured, node: Node) -> Projection | None:
    """The projection whose main op is `node`, or None."""
    if is_op(node, aten.linear.default):
        w = _param(captured, node.args[1])
        b = _param(captured, node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        shape = _shape(node.args[1])
        if w is None or shape is None or len(shape) != 2:
            return None
        return Projection(node.args[0], node, w, b, "linear", shape[1], shape[0], [node])
    if is_op(node, aten.addmm.default):
        b, x2d, wnode = node.args[:3]
        w, shape = _param(captured, wnode), _shape(wnode)
        if w is None or shape is None or len(shape) != 2 or _param(captured, b) is None:
            return None
        pre: list[Node] = []
        x = through_views_back(x2d, pre)
        nodes = [*reversed(pre), node]
        out = node
        users = list(node.users)
        if len(users) == 1 and is_op(users[0], *VIEWS):
            out = users[0]
            nodes.append(out)
        return Projection(x, out, w, _param(captured, b), "conv1d", shape[0], shape[1], nodes)
    if is_op(node, aten.matmul.default, aten.mm.default):
        x, wnode = node.args[:2]
        nodes, layout = [node], "conv1d"
        if isinstance(wnode, Node) and _is_transpose_2d(wnode):
            nodes.insert(0, wnode)
            wnode, layout = wnode.args[0], "linear"
        w, shape = _param(captured, wnode), _shape(wnode)
        if w is None or shape is None or len(shape) != 2:
            return None
        fin, fout = (shape[1], shape[0]) if layout == "linear" else shape
        out, bias = _bias_add(captured, node)
        if bias is not None:
            nodes.append(out)
        return Projection(x, out, w, bias, layout, fin, fout, nodes)
    if node.op == "call_function" and node.target in _CONVS:
        return _conv(captured, node)
    return None


def _last_axis(dim: object, node: Node) -> bool:
    shape = _shape(node)
    return shape is not None and isinstance(dim, int) and dim in (-1, len(shape) - 1)


def part_at(proj: Projection, node: Node) -> Projection | None:
    """`proj` narrowed to the part of its output that `node` is, when `node` takes one of two
    equal parts of the output's last axis: `chunk(2)` / `split` then `getitem`, a slice of one
    half, or every second feature (interleaved). None otherwise."""
    out, size = proj.output, proj.out_features
    if proj.layout == "conv1x1" or size % 2:
        return None
    half = size // 2
    part: tuple[int, str] | None = None
    nodes: list[Node] = []
    if node.op == "call_function" and node.target is operator.getitem:
        cut, k = node.args
        if isinstance(cut, Node) and cut.args and cut.args[0] is out and isinstance(k, int):
            a = list(cut.args) + [None]
            if is_op(cut, aten.chunk.default) and a[1] == 2 and _last_axis(a[2] if a[2] is not None else 0, out):
                part = (k, "halves")
            elif is_op(cut, aten.split.Tensor) and a[1] == half and _last_axis(a[2] if a[2] is not None else 0, out):
                part = (k, "halves")
            elif is_op(cut, aten.split_with_sizes.default) and list(a[1]) == [half, half] \
                    and _last_axis(a[2] if a[2] is not None else 0, out):
                part = (k, "halves")
            nodes = [cut, node]
    elif is_op(node, aten.slice.Tensor) and node.args[0] is out:
        a = list(node.args) + [None] * (5 - len(node.args))
        dim, start, end, step = (a[1] if a[1] is not None else 0), a[2] or 0, a[3], a[4] or 1
        end = size if end is None or end > size else end
        if _last_axis(dim, out):
            if step == 1 and (start, end) in ((0, half), (half, size)):
                part = (start // half, "halves")
            elif step == 2 and start in (0, 1) and end >= size - 1 + start:
                part = (start, "interleaved")
        nodes = [node]
    if part is None or part[0] not in (0, 1):
        return None
    return dataclasses.replace(proj, output=node, out_features=half, nodes=[*proj.nodes, *nodes],
                               part=(part[0], 2, part[1]))
