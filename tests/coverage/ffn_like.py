"""Does a captured graph hold anything shaped like an FFN at all? (The sweep's "no FFN" class.)

Independent of sparsify's matcher on purpose. An FFN-like chain is a projection by a weight
(linear, matmul, 1x1 convolution, einsum; the weight a parameter or computed from parameters
alone) whose output reaches another such projection through elementwise ops, views, casts and
normalisations, at least one of them nonlinear, where every other tensor an op on the way takes
is a weight or constant (a scale) or itself such a projection's output (a gate). Attention
(softmax over a product of two activations), state-space scans and residual adds (also of
another projection's output: a projected shortcut, ResNet's downsampling) therefore end a
chain. A family whose graph has no such chain has no FFN to upcycle; one whose graph has some,
but where sparsify finds no site, is a dense family that fails, with sparsify's reason.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from sparsify.capture import Captured
from sparsify.ffn_match import TRANSPARENT

__all__ = ["has_ffn_like_chain"]

aten = torch.ops.aten
_LINEAR = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
           aten.einsum.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.convolution.default, aten.conv1d.padding,
         aten.conv2d.padding}
_LOOKED_THROUGH = {
    operator.getitem, *TRANSPARENT, aten.to.dtype, aten._to_copy.default, aten.type_as.default,
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.slice.Tensor, aten.flatten.using_ints,
    aten.t.default, aten.expand.default, aten.select.int,
    # normalisation inside an FFN (BitNet's ffn_sub_norm) is neither projection nor activation
    aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.group_norm.default,
    aten.reshape_as.default,
}
# elementwise activations that torch does not tag pointwise
_UNTAGGED = {aten.hardswish.default}
# a batch norm right after a linear layer (LeViT's Linear + BatchNorm1d) is per channel at
# inference, part of that projection; after a convolution it is a CNN's (ResNet's), which the
# chain does not go through, or every residual network would look like a chain of FFNs
_BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
# elementwise ops that are affine in their input: not an activation on their own
_AFFINE = {aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.mul.Tensor, aten.neg.default, aten.clone.default}
# a normalisation written out (x * rsqrt(mean(x^2))) scales by a statistic of the chain's own value
_STATISTICS = {aten.mean.dim, aten.var.correction, aten.var_mean.correction}
_MAX_DEPTH = 16
_WEIGHT_OPS = 8


class _Graph:
    def __init__(self, captured: Captured) -> None:
        self.captured = captured
        self.weights: dict[Node, bool] = {}

    def from_weights(self, node: Node, depth: int = 0) -> bool:
        """`node` is a parameter, buffer or constant, or computed from them alone within a few ops."""
        if node in self.weights:
            return self.weights[node]
        if node.op == "placeholder":
            found = self.captured.param_name(node) is not None or node.name.startswith(("c_", "_lifted"))
        elif node.op == "get_attr":
            found = True
        elif node.op == "call_function" and depth < _WEIGHT_OPS:
            found = all(self.from_weights(n, depth + 1) for n in node.all_input_nodes)
        else:
            found = False
        if found or depth == 0:  # a False found deeper may only be the depth bound
            self.weights[node] = found
        return found

    def is_projection(self, node: Node) -> bool:
        if node.op != "call_function" or node.target not in _LINEAR | _CONV:
            return False
        if not any(self.from_weights(n) for n in node.all_input_nodes):
            return False
        if node.target in _CONV:
            weight = node.args[1] if len(node.args) > 1 else None
            shape = getattr(getattr(weight, "meta", {}).get("val"), "shape", None)
            return shape is not None and all(k == 1 for k in shape[2:])
        return True

    def elementwise(self, node: Node) -> bool:
        target = node.target
        if node.op != "call_function":
            return False
        if target in _BATCH_NORM:
            return self._after_linear(node.args[0])
        return (target in _LOOKED_THROUGH or target in _UNTAGGED or torch.Tag.pointwise in getattr(target, "tags", ())
                or "view" in str(target))

    def _after_linear(self, node: Node) -> bool:
        """`node` is a linear layer's output, through views only."""
        for _ in range(_MAX_DEPTH):
            if not isinstance(node, Node) or node.op != "call_function":
                return False
            if node.target in _LINEAR:
                return self.is_projection(node)
            if not ("view" in str(node.target) or node.target in (aten.reshape.default, aten.flatten.using_ints,
                                                                  aten.transpose.int, aten.permute.default)):
                return False
            node = node.args[0]
        return False

    def from_projection(self, node: Node, depth: int = 0) -> str | None:
        """"gate" when `node` is a projection's output through elementwise ops only, "statistic"
        when it is a statistic of one (a normalisation's scale), else None."""
        if self.is_projection(node):
            return "gate"
        statistic = node.op == "call_function" and node.target in _STATISTICS
        if depth >= _MAX_DEPTH or not (self.elementwise(node) or statistic):
            return None
        kinds = {self.from_projection(n, depth + 1) for n in node.all_input_nodes if not self.from_weights(n)}
        if "gate" in kinds and not statistic:
            return "gate"
        return "statistic" if kinds - {None} else None

    def step(self, node: Node, came_from: Node, start: Node | None = None) -> tuple[bool, bool]:
        """(the chain goes on through `node`, `node` is nonlinear), entering it from `came_from` on
        a chain from the projection `start`."""
        if not self.elementwise(node):
            return False, False
        operands = [n for n in node.all_input_nodes if n is not came_from and not self.from_weights(n)]
        others = [self.from_projection(n) for n in operands]
        if None in others:
            return False, False
        if node.target is aten.mul.Tensor:
            return True, "gate" in others
        if node.target in (aten.add.Tensor, aten.sub.Tensor) and start is not None and any(
                kind == "gate" and not _descends(n, start) for n, kind in zip(operands, others)):
            return False, False  # another projection's output summed in: a residual merge (a projected shortcut)
        nonlinear = (torch.Tag.pointwise in getattr(node.target, "tags", ()) or node.target in _UNTAGGED) \
            and node.target not in _AFFINE
        return True, nonlinear


def _descends(node: Node, start: Node) -> bool:
    """`node` is computed from `start` within a few ops (ConvNeXt V2's response normalisation adds
    the chain's own value, rescaled, back to it)."""
    frontier, seen = [(node, 0)], set()
    while frontier:
        n, depth = frontier.pop()
        if n is start:
            return True
        if n in seen or depth >= _MAX_DEPTH:
            continue
        seen.add(n)
        frontier.extend((m, depth + 1) for m in n.all_input_nodes)
    return False


def has_ffn_like_chain(captured: Captured) -> bool:
    """True when some projection feeds another through an FFN-like chain (module docstring)."""
    g = _Graph(captured)
    for start in captured.graph.nodes:
        if not g.is_projection(start):
            continue
        frontier = [(u, start, False, 1) for u in start.users]
        seen: set[Node] = set()
        while frontier:
            node, came_from, nonlinear, depth = frontier.pop()
            if node in seen or depth > _MAX_DEPTH:
                continue
            seen.add(node)
            if g.is_projection(node):
                if nonlinear:
                    return True
                continue
            goes_on, is_nonlinear = g.step(node, came_from, start)
            if goes_on:
                frontier.extend((u, node, nonlinear or is_nonlinear, depth + 1) for u in node.users)
    return False
