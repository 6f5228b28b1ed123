"""A checkpoint seen through the model's own tensor names, as transformers maps them on load.

Checkpoints do not always store a tensor under its module's name: legacy names (`LayerNorm.gamma`
for `.weight`), a base model's checkpoint loaded into a head class (the `base_model_prefix`),
heads tied to the embeddings and therefore not saved, and families whose in-memory layout differs
from the saved one (per-expert tensors fused into one, `qkv` split into `q`/`k`/`v`, renamed
modules). `from_pretrained` resolves all of this with the rules of
`transformers.conversion_mapping` and `transformers.core_model_loading`; this module applies
exactly those rules, through transformers' own functions, while reading one tensor (or one
converter's group) at a time, which `from_pretrained` cannot do for a model that is not in memory.

What is written here by hand, and why:

- the grouping loop of `convert_and_load_state_dict_in_model`: transformers' version loads every
  tensor into a model, while the streaming executor needs a name -> recipe map that reads
  on demand; the same calls (`rename_source_key`, `WeightConverter.add_tensor`/`convert`) are
  made in the same order;
- shapes of converted tensors: the converter's own operations run on meta tensors, so the shape
  check reads no weights;
- tied tensors: a tied target the checkpoint omits is read from its source, per the model's
  `all_tied_weights_keys` (from `_tied_weights_keys`), as `tie_weights` would share it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn as nn

from ..errors import SourceError

__all__ = ["TensorNames", "TensorStore", "TensorDict"]


class TensorStore(Protocol):
    """What `TensorNames` reads: a checkpoint by its stored names (see `sparsify.io.checkpoint`)."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor: ...


class TensorDict:
    """A `TensorStore` over tensors already in memory (a loaded output's shards)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path=None):
        self.tensors, self.path = tensors, path

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass
class _Group:
    """The checkpoint tensors one transformers `WeightConverter` turns into model tensors."""

    first: str  # the model name transformers keys the group by
    template: object  # the WeightConverter, before any tensor is added
    sources: list[tuple[str, str]] = field(default_factory=list)  # (stored name, source pattern)


def _conversions(model: nn.Module) -> list:
    """transformers' ordered weight transforms for `model` (its conversion mapping, the legacy
    renamings included); none for a model that is not a transformers model."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping

    if not isinstance(model, PreTrainedModel):
        return []
    return get_model_conversion_mapping(model)


def _deterministic_init(model: nn.Module, name: str) -> torch.Tensor | None:
    """Tensor `name` of `model` as its `_init_weights` makes it on a real copy of its module,
    when two seeds give the same values (a computed table, not a random draw); else None."""
    init = getattr(model, "_init_weights", None)
    path, _, attr = name.rpartition(".")
    if init is None:
        return None
    made = []
    for seed in (0, 1):
        try:
            module = copy.deepcopy(model.get_submodule(path)).to_empty(device="cpu")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                with torch.no_grad():
                    init(module)
            made.append(getattr(module, attr).detach())
        except Exception:  # an _init_weights that needs the whole model: not made here
            return None
    return made[0] if torch.equal(made[0], made[1]) else None


class TensorNames:
    """The tensors of `model`'s state dict, each read from `store` the way `from_pretrained`
    would fill it. Build it from the dense model (before any rewrite): the map keeps the names,
    shapes and tied pairs it needs, so the model may change afterwards."""

    def __init__(self, store: TensorStore, model: nn.Module):
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.store, self.model = store, model
        self.path = getattr(store, "path", None)
        state = model.state_dict()
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        # Buffers a checkpoint may omit (computed from the config, real on the skeleton).
        buffers = {k for k, _ in model.named_buffers()}
        self._buffers = {k: v for k, v in state.items() if k in buffers and v.device.type != "meta"}
        transforms = _conversions(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", "") or None

        self.direct: dict[str, str] = {}  # model name -> stored name
        self.groups: dict[str, _Group] = {}  # first model name -> converter group
        self.unexpected: list[str] = []
        for original in sorted(store.names(), key=dot_natural_key):
            # The same two calls, in the same order, as convert_and_load_state_dict_in_model.
            renamed, pattern = rename_source_key(original, renamings, converters, prefix, state)
            if renamed not in state and original in state:
                renamed, pattern = rename_source_key(original, [], [], base_model_prefix=prefix, meta_state_dict=state)
            if renamed not in state:
                self.unexpected.append(original)
            elif pattern is not None:
                group = self.groups.setdefault(renamed, _Group(renamed, by_pattern[pattern]))
                group.sources.append((original, pattern))
            else:
                self.direct.setdefault(renamed, original)

        # Which model names each group produces, with shapes and dtypes: its operations on meta tensors.
        self.converted: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for first, group in self.groups.items():
            meta = lambda n: (lambda: torch.empty(store.shape(n), dtype=store.dtype(n), device="meta"))  # noqa: E731
            try:
                made = self._convert(group, meta)
            except Exception:  # an op that needs values: learn its outputs from the real tensors once
                made = self._convert_stored(group)
            for name, t in made.items():
                self.converted[name] = (first, tuple(t.shape), t.dtype)
        # Tied pairs as transformers declares them ({target: source}), then tensors the model
        # already shares (a skeleton ties at construction; plain modules may share too).
        self.tied = {t: s for t, s in (getattr(model, "all_tied_weights_keys", None) or {}).items() if t in state}
        shared: dict[int, list[str]] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            shared.setdefault(id(t), []).append(name)
        for names in shared.values():
            stored = next((n for n in names if n in self.direct or n in self.converted), None)
            for n in names:
                if stored is not None and n != stored:
                    self.tied.setdefault(n, stored)
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None
        # Tensors the model declares a checkpoint may lack (`_keys_to_ignore_on_load_missing`),
        # which from_pretrained fills with the model's own `_init_weights`: Marian's sinusoidal
        # positions, never saved. Made the same way when read, where that is deterministic.
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
        self._declared = {n for n in self.expected
                          if self._resolve(n) is None and n not in self._buffers and any(p.search(n) for p in ignored)}
        self._initialised: dict[str, torch.Tensor | None] = {}

    def _convert(self, group: _Group, reader: Callable[[str], Callable[[], torch.Tensor]]) -> dict[str, torch.Tensor]:
        # A fresh converter per use, as transformers deep-copies one per target (convert() consumes it).
        converter = copy.deepcopy(group.template)
        for original, pattern in group.sources:
            converter.add_tensor(group.first, original, pattern, reader(original))
        made = converter.convert(group.first, model=self.model, config=getattr(self.model, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in made.items()}

    def _convert_stored(self, group: _Group) -> dict[str, torch.Tensor]:
        """`_convert` on the stored tensors. A converter that fails on them (a view by head
        counts that the tensors' sizes do not fit) would fail in `from_pretrained` too: the
        checkpoint does not match its config, said in one line instead of transformers' traceback."""
        try:
            return self._convert(group, lambda n: (lambda: self.store.read(n)))
        except Exception as err:
            stored = ", ".join(f"'{s}'" for s, _ in group.sources[:2]) + (", ..." if len(group.sources) > 2 else "")
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SourceError(f"checkpoint '{self.path}': transformers cannot convert stored tensor {stored} into "
                              f"the model's '{group.first}' ({reason}); the weights do not match config.json "
                              "(transformers' from_pretrained runs the same conversion)") from err

    def _resolve(self, name: str) -> str | None:
        """The model name whose stored tensor fills `name` (itself, or the source it is tied to)."""
        if name in self.direct or name in self.converted:
            return name
        source = self.tied.get(name)
        if source is not None and (source in self.direct or source in self.converted):
            return source
        return None

    def _initial(self, name: str) -> torch.Tensor | None:
        """Model tensor `name` as the model's `_init_weights` makes it, or None when that is
        random (two seeds give different values) or fails."""
        if name not in self._declared:
            return None
        if name not in self._initialised:
            self._initialised[name] = _deterministic_init(self.model, name)
        return self._initialised[name]

    def _local(self, name: str) -> torch.Tensor | None:
        """Model tensor `name` when the checkpoint does not hold it but the model makes it: a
        buffer computed from the config, or a declared-missing tensor (`_initial`)."""
        if self._resolve(name) is not None:
            return None
        return self._buffers[name] if name in self._buffers else self._initial(name)

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) is not None or self._local(name) is not None

    def missing(self) -> list[str]:
        """Model tensors the checkpoint does not provide (computed buffers excepted)."""
        return [n for n in self.expected if n not in self]

    def stored_name(self, name: str) -> str:
        """The checkpoint name that model tensor `name` is read from (the first, for a converted one)."""
        resolved = self._need(name)
        if resolved in self.direct:
            return self.direct[resolved]
        return self.groups[self.converted[resolved][0]].sources[0][0]

    def _need(self, name: str) -> str:
        resolved = self._resolve(name)
        if resolved is None:
            raise SourceError(f"checkpoint '{self.path}' lacks tensor '{name}' that the config requires")
        return resolved

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of model tensor `name` as loaded (after any conversion)."""
        local = self._local(name)
        if local is not None:
            return tuple(local.shape)
        resolved = self._need(name)
        if resolved in self.direct:
            return tuple(self.store.shape(self.direct[resolved]))
        return self.converted[resolved][1]

    def dtype(self, name: str) -> torch.dtype:
        """dtype of model tensor `name` as stored."""
        local = self._local(name)
        if local is not None:
            return local.dtype
        resolved = self._need(name)
        if resolved in self.direct:
            return self.store.dtype(self.direct[resolved])
        return self.converted[resolved][2]

    def read(self, name: str) -> torch.Tensor:
        """Model tensor `name` in memory: one stored tensor, or the outputs of one converter
        (kept until another group is read, since a split serves several names)."""
        local = self._local(name)
        if local is not None:
            return local.clone()
        resolved = self._need(name)
        if resolved in self.direct:
            return self.store.read(self.direct[resolved])
        first = self.converted[resolved][0]
        if self._cached is None or self._cached[0] != first:
            self._cached = None  # release the previous group before converting the next
            self._cached = (first, self._convert_stored(self.groups[first]))
        return self._cached[1][resolved].contiguous()

    def check(self, spec: str) -> None:
        """Refuse a checkpoint that lacks a tensor the model needs, or holds one whose shape
        disagrees with the model: what `from_pretrained` reports as missing or mismatched."""
        bad = [(n, self.shape(n), want) for n, (want, _) in self.expected.items() if n in self and self.shape(n) != want]
        if bad:
            name, got, want = bad[0]
            stored = self.stored_name(name) if self._resolve(name) is not None else name
            what = f"tensor '{stored}'" + (f" (the model's '{name}')" if stored != name else "")
            raise SourceError(f"'{spec}': {what} has shape {got} but config.json implies {want}; "
                              "the weights do not match config.json")
        missing = self.missing()
        if missing:
            raise SourceError(f"'{spec}': checkpoint lacks tensor '{missing[0]}' that the config requires "
                              f"({len(missing)} in all); the weights do not match config.json")

    def names(self) -> Iterable[str]:
        """Every model tensor this checkpoint provides."""
        return [n for n in self.expected if n in self]
