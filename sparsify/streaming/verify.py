"""Compare a dense model with its upcycled output in the memory of the dense model and one layer.

The dense model runs once on seeded inputs (the reference). Then it becomes the MoE model in
place: each of its non-FFN tensors is replaced by the output's, and each converted FFN by a
`StreamedMoE` that reads its experts from the output when it runs. The second run gives the
end-to-end difference; at each MoE layer the dense FFN also runs on that layer's input, which
gives the layer's own difference. So the MoE model computes with the output's tensors only
(a damaged attention weight changes its outputs), and memory stays at the dense model plus one
layer's experts.

Every stored tensor is also compared, as it is read, with what the output's format writes for
the plan over this dense model (the writer's own code, fed from the dense tensors): a damaged
expert no token was routed to is found too. A tensor that the dense model and the plan do not
determine (experts from other checkpoints, routers initialised from data) is counted unchecked.
Floating tensors match within one unit in the last place of their dtype at their largest
magnitude, since the in-memory and streaming writers round noise and casts in different orders.
The output's config.json is compared with the one the format writes for this dense config.

The MoE layers run as the plan defines them. A format that only approximates the plan (the
switch format's fixed per-sequence expert capacity for a capacity factor) computes otherwise
when transformers loads it; the comparison then carries a note saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..capture import example_inputs_for
from ..errors import PlanError, SourceError
from ..formats.tensors import SourceTensors
from ..init import canonical_shape
from ..moe import Router
from ..formats.native import native_config_view
from ..plan import UpcyclePlan
from ..rewrite import chain_steps
from ..verify import Comparison, seeded_output
from .layers import StreamedMoE, install_streamed
from .layout import Part, StoredTensor
from .output import UpcycledOutput, converted_skeleton
from .reader import read_router, read_site

__all__ = ["LayerDifference", "TensorDifference", "StreamedComparison", "compare_streamed"]

# config.json keys that describe the writing, not the model
_CONFIG_IGNORED = {"dtype", "torch_dtype", "transformers_version", "_name_or_path"}


@dataclass
class LayerDifference:
    """One MoE layer's output against the dense FFN's on the same input (the MoE model's)."""

    module: str
    max_abs: float
    max_ref: float

    @property
    def max_rel(self) -> float:
        """max_abs relative to the dense FFN's largest output magnitude."""
        return self.max_abs / self.max_ref if self.max_ref else float(self.max_abs > 0)


@dataclass
class TensorDifference:
    """A stored tensor that is not what the plan makes of the dense model."""

    name: str
    max_abs: float
    max_ref: float


@dataclass
class StreamedComparison(Comparison):
    """The end-to-end difference (`max_abs`, `max_ref`), each MoE layer's, and the tensor and
    config checks."""

    layers: list[LayerDifference] = field(default_factory=list)
    tensors_checked: int = 0
    tensors_unchecked: list[str] = field(default_factory=list)
    tensors_differing: list[TensorDifference] = field(default_factory=list)
    config_differing: list[str] = field(default_factory=list)
    note: str | None = None  # how the output, loaded by its format's class, computes otherwise

    @property
    def problems(self) -> list[str]:
        """What is wrong with the output besides its outputs' difference (empty when nothing)."""
        out = []
        if self.tensors_differing:
            t = self.tensors_differing[0]
            more = f" and {len(self.tensors_differing) - 1} more" if len(self.tensors_differing) > 1 else ""
            out.append(f"tensor '{t.name}'{more} differs from what the plan makes of the dense model "
                       f"(max abs diff {t.max_abs:.3e})")
        if self.config_differing:
            out.append(f"config.json differs from the one the plan implies in '{self.config_differing[0]}'"
                       + (f" and {len(self.config_differing) - 1} more" if len(self.config_differing) > 1 else ""))
        return out


class _ModuleTensors:
    """A dense module read as `SourceTensors` reads a checkpoint: `name in`, `read`, `dtype`.
    Other tensors are looked up on each read, never held, so that one replaced later is freed;
    the FFN weights of the plan's sites are held from the start, as their modules are about to
    leave the model."""

    def __init__(self, model: nn.Module, plan: UpcyclePlan):
        self.model, self.path = model, Path(type(model).__name__)
        self.keys = set(model.state_dict(keep_vars=True))
        self.ffn = {n: _tensor(model, n) for s in plan.selected_sites for n in s.weights.values()}

    def __contains__(self, name: str) -> bool:
        return name in self.keys

    def read(self, name: str) -> torch.Tensor:
        return (self.ffn.get(name) if name in self.ffn else _tensor(self.model, name)).detach()

    def dtype(self, name: str) -> torch.dtype:
        return self.ffn[name].dtype if name in self.ffn else _tensor(self.model, name).dtype


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    # Into the dense tensor's own memory where it fits: a fresh tensor for each of hundreds of
    # mid-sized weights, the old one freed after, leaves the heap fragmented by up to the dense
    # model's size. Tied parameters are one object, so every name of a tied tensor sees it.
    t = _tensor(model, name)
    if t.shape == value.shape and t.dtype == value.dtype:
        t.data.copy_(value)
    else:
        t.data = value


class _TensorCheck:
    """Compares each stored tensor, as it is read, with what the writer makes of the dense model."""

    def __init__(self, expected: dict[str, Any], plain_reproducible: bool):
        self.expected, self.plain_reproducible = expected, plain_reproducible
        self.checked, self.unchecked, self.differing = 0, [], []

    def __call__(self, stored: StoredTensor, value: torch.Tensor) -> None:
        if not self.plain_reproducible and any(p.kind == "plain" for p in stored.reads):
            self.unchecked.append(stored.name)
            return
        flat, offset, max_abs, max_ref = value.reshape(-1), 0, 0.0, 0.0
        try:
            for piece in self.expected[stored.name].produce():
                want = piece.reshape(-1)
                got = flat[offset: offset + want.numel()]
                offset += want.numel()
                if got.numel() != want.numel():
                    break
                want = want.to(value.dtype)
                if value.dtype.is_floating_point:
                    max_abs = max(max_abs, float((got.float() - want.float()).abs().max()) if want.numel() else 0.0)
                    max_ref = max(max_ref, float(want.float().abs().max()) if want.numel() else 0.0)
                elif not torch.equal(got, want):
                    max_abs = float("inf")
        except (SourceError, PlanError):  # experts of other checkpoints, routers made from data
            self.unchecked.append(stored.name)
            return
        self.checked += 1
        ulp = torch.finfo(value.dtype).eps * max_ref if value.dtype.is_floating_point else 0.0
        if offset != flat.numel() or max_abs > ulp:
            self.differing.append(TensorDifference(stored.name, max_abs if offset == flat.numel() else float("inf"), max_ref))


def _config_differences(out: UpcycledOutput, dense_config: Any, plan: Any) -> list[str]:
    want = json.loads(json.dumps(out.format.config_dict(plan, dense_config), default=str))
    try:
        have = json.loads((out.path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["config.json (missing or not JSON)"]
    want, have = native_config_view(want), native_config_view(have)
    keys = sorted((set(want) | set(have)) - _CONFIG_IGNORED)
    return [k for k in keys if want.get(k) != have.get(k)]


def _check_dense(dense: nn.Module, plan: UpcyclePlan, moe: str | Path) -> None:
    """Refuse a dense model that lacks the output's FFNs (another architecture or size): the
    output's layout and the streamed layers are made from them."""
    shapes = {k: tuple(v.shape) for k, v in dense.state_dict(keep_vars=True).items()}
    for site in plan.selected_sites:
        for role, name in site.weights.items():
            if name not in shapes:
                raise PlanError(f"'{moe}' was upcycled from another model: the dense {type(dense).__name__} has no "
                                f"FFN weight '{name}'; pass the dense model it was made from")
            if sorted(_stored_as_matrix(site, role, shapes[name])) != sorted(canonical_shape(site, role)):
                raise PlanError(f"'{moe}' was upcycled from another model: the dense weight '{name}' has shape "
                                f"{list(shapes[name])}, not that of a {site.hidden_size} x {site.intermediate_size} FFN; "
                                "pass the dense model it was made from")


def _stored_as_matrix(site: Any, role: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A dense weight's shape as the matrix it holds, to compare with the canonical one (sorted,
    since GPT-2 stores [in, out]): a 1x1 convolution's [out, in / groups, 1...] without its unit
    kernel axes, its input axis whole."""
    if site.layout != "conv1x1" or not role.startswith("w") or len(shape) < 3 or any(k != 1 for k in shape[2:]):
        return shape
    return (shape[0], shape[1] * site.groups.get(role, 1))


def _difference(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    got, ref = got.float(), ref.float()
    if got.shape != ref.shape:
        return float("inf"), float(ref.abs().max())
    return float((got - ref).abs().max()), float(ref.abs().max())


@torch.no_grad()
def compare_streamed(dense: nn.Module, moe: str | Path, seed: int = 0, batch: int = 2, seq: int = 16,
                     backend: str = "reference", progress: Callable[[str], None] | None = None) -> StreamedComparison:
    """Run `dense` and the upcycled output `moe` (any format) on the same inputs made from the
    dense config, one MoE layer's experts in memory at a time (see the module's docstring).

    `dense` is used up: it becomes the MoE model as the comparison runs (its non-FFN tensors
    replaced by the output's, its FFNs by streamed MoE layers); load it again to use it after.
    The numbers equal `sparsify.verify.compare(dense, sparsify.load(moe, backend=backend))`
    for a native output."""
    say = progress or (lambda line: None)
    out = UpcycledOutput.open(moe)
    plan, ckpt = out.plan, out.checkpoint
    if getattr(dense, "config", None) is None:
        raise PlanError(f"{type(dense).__name__} has no Hugging Face config; the output's layout is read from it")
    _check_dense(dense, plan, moe)
    dense.eval()
    inputs = example_inputs_for(dense, batch=batch, seq=seq, seed=seed)
    say("running the dense model")
    ref = seeded_output(dense, inputs, seed).float()

    meta = converted_skeleton(dense.config, plan, type(dense), where=out.path)
    layout = out.layout(meta)
    tensors = _ModuleTensors(dense, plan)
    expected = {t.name: t for t in out.format.tensors(meta, plan, SourceTensors(tensors, plan, meta, allow_nonfinite=True))}
    check = _TensorCheck(expected, plan.merge_base == "base")
    derive = SourceTensors(tensors, plan, meta, allow_nonfinite=True)

    say("reading the output's dense tensors")
    for name, stored in layout.plain():
        value = ckpt.read(stored)
        check(layout.stored[stored], value)  # before the dense tensor is replaced
        _set(dense, name, value)
    for stored in layout.others():
        if stored.parts is None:  # the format's constants
            check(stored, ckpt.read(stored.name))

    diffs: dict[str, LayerDifference] = {}
    sites = {s.path: s for s in plan.selected_sites}

    def observe(layer: StreamedMoE, x: torch.Tensor, args: tuple, kwargs: dict, y: torch.Tensor) -> None:
        site = layer.site
        ffn = replaced[site.path]
        w = next(ffn.parameters(), None)
        d = ffn(x.to(w.dtype) if w is not None and w.is_floating_point() else x, *args, **kwargs)
        for step in chain_steps(site):  # the chain's activation (BART's activation_fn), then its exit
            d = replaced[step](d)
        a, r = _difference(y, d)
        prev = diffs.get(site.path)
        diffs[site.path] = LayerDifference(site.path, max(a, prev.max_abs if prev else 0.0), max(r, prev.max_ref if prev else 0.0))

    def derived(part: Part) -> torch.Tensor:
        return derive.expert(sites[part.site], part.role, part.expert)

    def make(site) -> StreamedMoE:
        layer = plan.layer(site)
        router = Router(site.hidden_size, layer.moe)
        router.weight.data = read_router(ckpt, layout, site, check)

        def load() -> dict[str, torch.Tensor]:
            say(f"comparing MoE layer {site.path}")
            return read_site(ckpt, layout, plan, site, check, derived)

        return StreamedMoE(site, layer, router, load, backend, observe)

    replaced = install_streamed(dense, plan, make)
    say("running the MoE model layer by layer")
    got = seeded_output(dense, inputs, seed).float()
    for site in plan.selected_sites:  # layers no input reached: their tensors are checked all the same
        if dense.get_submodule(site.path).calls == 0:
            read_site(ckpt, layout, plan, site, check, derived)
    max_abs, max_ref = _difference(got, ref)
    return StreamedComparison(
        max_abs, max_ref, layers=[diffs[p] for p in sites if p in diffs], tensors_checked=check.checked,
        tensors_unchecked=check.unchecked, tensors_differing=check.differing,
        config_differing=_config_differences(out, dense.config, plan), note=_approximation(out, dense.config))


def _approximation(out: UpcycledOutput, config: Any) -> str | None:
    why = None if out.native else out.format.keeps_meaning(out.plan, config)
    return (f"{why}; the MoE layers were compared as the plan defines them, and the output loaded by transformers "
            "computes otherwise") if why else None
