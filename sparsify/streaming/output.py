"""An upcycled output directory opened for streaming, and the streamed model of a native one.

`UpcycledOutput.open` reads `sparsify.json`, the plan, the format and the safetensors headers,
no weights. `load_streamed` builds what `sparsify.load` builds, with every dense part read and
every MoE layer a `StreamedMoE`: memory for the dense parts and one layer's experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import PlanError, SourceError
from ..formats.base import MANIFEST, OutputFormat
from ..formats.manifest import plan_of, read_output_manifest
from ..formats.native import FORMAT_NAME, assign_tensors, read_config
from ..formats.registry import FORMATS
from ..io.checkpoint import Checkpoint
from ..io.skeleton import build_skeleton, model_class
from ..moe import Router
from ..plan import UpcyclePlan
from ..rewrite import apply_plan
from .layers import StreamedMoE, install_streamed
from .layout import OutputLayout
from .reader import check_names, read_router, read_site

__all__ = ["UpcycledOutput", "converted_skeleton", "load_streamed"]


def converted_skeleton(config: Any, plan: UpcyclePlan, cls: type | None = None, where: Path | None = None) -> nn.Module:
    """The converted model of `plan` over the architecture of `config`, all parameters on the meta
    device (what every writer names its tensors by). `where`: the output the plan was read from,
    so that a plan that does not fit (an edited sparsify.json) is a one-line error naming it."""
    model = build_skeleton(config, cls or model_class(config))
    if where is not None:
        from ..formats.native import apply_stored_plan

        return apply_stored_plan(model, plan, where)
    return apply_plan(model, plan, copy_weights=False)


@dataclass
class UpcycledOutput:
    """A directory written by `sparsify upcycle` / `sparsify.save`, in any format."""

    path: Path
    manifest: dict[str, Any]
    plan: UpcyclePlan
    format: OutputFormat
    checkpoint: Checkpoint

    @classmethod
    def open(cls, path: str | Path) -> "UpcycledOutput":
        """Read the manifest, the plan and the tensor headers of `path`."""
        path = Path(path)
        manifest = read_output_manifest(path)  # validated, and every file's size checked
        fmt = next((f for f in FORMATS.values() if f.name == manifest.get("format")), None)
        if fmt is None:
            raise SourceError(f"'{path}' is in the {manifest.get('format')!r} format, which this sparsify does not know")
        return cls(path, manifest, plan_of(manifest, path / MANIFEST), fmt, Checkpoint(path, str(path)))

    @property
    def native(self) -> bool:
        """True for sparsify's native format (the source architecture's config and names)."""
        return self.format.name == FORMAT_NAME

    def check_fits(self) -> None:
        """For a native output: refuse one whose tensor names and shapes (headers only) are not
        those the plan's model has, as `sparsify.load` would, without reading a weight."""
        if not self.native:
            return
        try:
            self.layout(converted_skeleton(read_config(self.path), self.plan, where=self.path))
        except (SourceError, PlanError) as err:
            raise PlanError(f"the weights of '{self.path}' do not fit its plan ({str(err)[:200]}); "
                            "sparsify.json or the weights were changed, write the output again") from None

    def layout(self, model: nn.Module) -> OutputLayout:
        """The layout of this output for `model` (the converted model), checked against the headers."""
        layout = OutputLayout.of(self.format, model, self.plan)
        check_names(self.checkpoint, layout, str(self.path))
        return layout


def load_streamed(path: str | Path, backend: str = "reference") -> nn.Module:
    """A native output as a model whose MoE layers read their experts when they run (see
    `StreamedMoE`); the dense parts and the routers are read now."""
    out = UpcycledOutput.open(path)
    if not out.native:
        raise SourceError(f"'{path}' is in the {out.format.name} format; this reads sparsify's native format "
                          "(upcycle with --format native)")
    config = read_config(out.path)
    model = converted_skeleton(config, out.plan, where=out.path)
    layout = out.layout(model)
    plan, ckpt = out.plan, out.checkpoint

    def make(site) -> StreamedMoE:
        layer = plan.layer(site)
        router = Router(site.hidden_size, layer.moe)
        router.weight.data = read_router(ckpt, layout, site)
        return StreamedMoE(site, layer, router, lambda: read_site(ckpt, layout, plan, site), backend)

    install_streamed(model, plan, make)
    tensors = {name: ckpt.read(stored) for name, stored in layout.plain()}
    assign_tensors(model, tensors, out.manifest, out.path)
    model.eval()
    model.sparsify_plan = plan
    model.sparsify_source = out.manifest.get("source", {})
    return model
