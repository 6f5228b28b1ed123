"""What every output format shares: the writer interface and the crash-safe directory write."""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch.nn as nn

from ..io.atomic import atomic_directory, check_output, check_space
from ..io.headers import read_headers
from ..io.integrity import OutputFiles
from ..io.safetensors_io import OutputTensor, parse_size, plan_shards, write_shards
from ..io.sources import TOKENIZER_FILES
from ..plan import UpcyclePlan
from .layout_digest import LAYOUT_KEY, layout_sha256
from .manifest import MANIFEST
from .tensors import TensorSource

__all__ = ["OutputFormat", "MANIFEST", "tokenizer_files"]


def tokenizer_files(source_dir: Path | None) -> list[Path]:
    """The tokenizer files of a model directory that an output copies."""
    if source_dir is None:
        return []
    return [source_dir / name for name in TOKENIZER_FILES if (source_dir / name).is_file()]


class OutputFormat(abc.ABC):
    """An output format: says whether it can express a plan, and writes it.

    Subclasses implement `explain` (None when supported, else the reason), `config_dict` (the
    output's config.json) and `tensors` (what to write, read through a `TensorSource`)."""

    name = "format"
    description = ""
    # sparsify.json records the layout digest (`layout_digest`): the native format, whose fit to
    # its plan a reader can otherwise check only by building the plan's model
    records_layout = False

    def explain(self, plan: UpcyclePlan, config: Any) -> str | None:
        """Why this format cannot express `plan` for a source with `config` (None if it can)."""
        return None

    def default_options(self, config: Any) -> dict[str, Any]:
        """Upcycle options this format implies when the user did not set them."""
        return {}

    def keeps_meaning(self, plan: UpcyclePlan, config: Any) -> str | None:
        """Why `auto` should not pick this format although it can write the plan (None if it may)."""
        return None

    @abc.abstractmethod
    def config_dict(self, plan: UpcyclePlan, config: Any) -> dict[str, Any]:
        """The output's config.json."""

    @abc.abstractmethod
    def tensors(self, model: nn.Module, plan: UpcyclePlan, source: TensorSource) -> list[OutputTensor]:
        """Every tensor to write, in order. `model` is the converted model (meta or real)."""

    def write(
        self,
        out: str | Path,
        model: nn.Module,
        plan: UpcyclePlan,
        source: TensorSource,
        manifest: dict[str, Any] | Callable[[], dict[str, Any]],
        source_dir: Path | None = None,
        shard_size: int | str = "5GB",
        force: bool = False,
        progress: Callable[[int], None] | None = None,
        tensors: list[OutputTensor] | None = None,
        sources: Iterable[Path | str | None] = (),
    ) -> Path:
        """Write the whole output directory atomically (temporary sibling, fsync, rename).
        `sources` are paths the model was read from besides `source_dir` (never written over).
        `sparsify.json` lists the size and sha256 of every other file written; `manifest` may be
        a function, called once the weights are written (what it records can be computed beside)."""
        sources = [source_dir, *sources]
        check_output(out, force, sources, kind="dir")
        config = self.config_dict(plan, model.config)
        tensors = tensors if tensors is not None else self.tensors(model, plan, source)
        # The config names the dtype loaders should use: that of the weights, the floating dtype
        # holding most bytes (routers are float32 on purpose and must not decide it).
        weights: dict = {}
        for t in tensors:
            if t.dtype.is_floating_point:
                weights[t.dtype] = weights.get(t.dtype, 0) + t.nbytes
        if weights:
            config["dtype"] = str(max(weights, key=weights.get)).removeprefix("torch.")
        config_text = json.dumps(config, indent=2, sort_keys=True, default=str)
        tokenizer = tokenizer_files(source_dir)
        shards = plan_shards(tensors, parse_size(shard_size))
        # Headers, index and manifest are small next to the weights: a generous 512 bytes a tensor.
        needed = (sum(t.nbytes for t in tensors) + 512 * len(tensors) + 8 * len(shards) + len(config_text)
                  + sum(f.stat().st_size for f in tokenizer) + (64 << 10))
        check_space(out, needed)
        with atomic_directory(out, force=force, sources=sources) as tmp:
            files = OutputFiles(tmp)
            files.write_text("config.json", config_text)
            write_shards(tmp, tensors, shard_size, progress, files=files)
            for f in tokenizer:
                files.copy(f, f.name)
            if callable(manifest):
                manifest = manifest()
            record = {"format": self.name, **manifest, "files": files.to_dict()}
            if self.records_layout:
                # of the plan as sparsify.json stores it (JSON) and of the headers as written, read back
                plan = json.loads(json.dumps(record["plan"]))
                record[LAYOUT_KEY] = layout_sha256(plan, read_headers(tmp))
            (tmp / MANIFEST).write_text(json.dumps(record, indent=2))
        return Path(out)
