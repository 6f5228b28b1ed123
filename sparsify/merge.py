"""Experts from several checkpoints: the sources an MoE's experts are read from, opened once and
checked against the base before anything is written.

mergekit-moe and Branch-Train-MiX build an MoE from fine-tunes of one base: each expert's FFN
from its own checkpoint, the other weights from the base (`merge_base="base"`) or averaged over
the base and every source (`merge_base="average"`, Branch-Train-MiX). Sources are read tensor by
tensor, like the base (`sparsify.io.checkpoint.Checkpoint`); an in-memory model is read through
`ModuleWeights`, which has the same reading interface, so every executor treats both alike.

Compatibility is checked up front: the same architecture (model type, class and activation),
every tensor of the base present in each source with the same shape, and the same tokenizer
vocabulary where both have a tokenizer. The first difference is named in a one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
import torch.nn as nn

from .errors import OptionError, OutputError, SourceError

__all__ = [
    "MERGE_BASES", "Weights", "ModuleWeights", "ExpertSource", "stored_name", "source_names", "open_sources",
    "check_compatible", "distinct", "average", "average_into",
]

MERGE_BASES = ("base", "average")
_PIECE = 1 << 22

# Config keys naming the FFN's activation, by family (Llama/BERT, GPT-2, T5, Gemma).
_ACTIVATION_KEYS = ("hidden_act", "activation_function", "feed_forward_proj", "hidden_activation")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json")


class Weights(Protocol):
    """What executors read a checkpoint through: `Checkpoint` and `ModuleWeights` both are."""

    path: Any

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str) -> torch.Tensor: ...


class ModuleWeights:
    """The state dict of an in-memory model, read like a `Checkpoint` (no copies are made)."""

    def __init__(self, module: nn.Module, spec: str | None = None):
        self.module = module
        self.path = spec or type(module).__name__
        self.state = {k: v.detach() for k, v in module.state_dict().items()}

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def names(self) -> list[str]:
        """Every tensor name of the state dict."""
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor `name`."""
        return self.state[name].dtype

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` (the model's own; callers must not modify it)."""
        return self.state[name]


def stored_name(weights: Weights, name: str, aliases: dict[str, list[str]], prefix: str) -> str | None:
    """The name under which `weights` stores the model's state-dict tensor `name`: the name
    itself, a tied alias of it (`aliases`, see `sparsify.formats.tensors.alias_groups`), with or
    without the model's `base_model_prefix`; None when it has none of them."""
    for candidate in aliases.get(name, [name]):
        for n in (candidate, f"{prefix}.{candidate}", candidate.removeprefix(f"{prefix}.")):
            if n in weights:
                return n
    return None


def _identity(weights: Weights) -> Any:
    module = getattr(weights, "module", None)
    return id(module) if module is not None else Path(weights.path).resolve()


@dataclass
class ExpertSource:
    """One checkpoint experts are read from: its name in the plan, what the user gave, its
    tensors and config, and its files (for provenance)."""

    name: str
    spec: str
    kind: str  # dir | hub | demo | module
    weights: Weights
    config: Any
    path: Path | None = None
    files: list[Path] = field(default_factory=list)

    def provenance(self, fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
        """What `UpcyclePlan.sources` records of it (`fingerprints`: its files', see
        `sparsify.io.sources.fingerprint_files`)."""
        from .io.sources import FINGERPRINT

        out: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if fingerprints is not None:
            out[FINGERPRINT] = fingerprints
        return out


def source_names(entries: Sequence[str | os.PathLike | nn.Module]) -> list[str]:
    """The plan's names for `experts_from` entries: a path or hub id as given, an in-memory
    model `module{i}` (i: its first position)."""
    if isinstance(entries, (str, os.PathLike)) or not isinstance(entries, Sequence):
        raise OptionError("experts_from must be a list of checkpoints (paths, hub ids, demo names or models), "
                          f"one per expert, got {entries!r}")
    names, seen = [], {}
    for i, entry in enumerate(entries):
        if isinstance(entry, nn.Module):
            names.append(seen.setdefault(id(entry), f"module{i}"))
        elif isinstance(entry, (str, os.PathLike)) and str(entry).strip():
            names.append(str(entry))
        else:
            raise OptionError(f"experts_from entry {i} must be a path, a hub id, a demo name or a model, got {entry!r}")
    return names


def open_sources(entries: Sequence[str | os.PathLike | nn.Module], names: Sequence[str] | None = None
                 ) -> dict[str, ExpertSource]:
    """Resolve and open every distinct `experts_from` entry (headers only; no weights read),
    keyed by its name in the plan (`names`, default `source_names(entries)`)."""
    from .io.checkpoint import Checkpoint
    from .io.demo import build_demo
    from .io.sources import is_native, resolve_source

    out: dict[str, ExpertSource] = {}
    for name, entry in zip(names if names is not None else source_names(entries), entries):
        if name in out:
            continue
        if isinstance(entry, nn.Module):
            if getattr(entry, "config", None) is None:
                raise OptionError(f"expert source {name} ({type(entry).__name__}) has no Hugging Face config; "
                                  "experts are read from transformers models")
            out[name] = ExpertSource(name, type(entry).__name__, "module", ModuleWeights(entry), entry.config)
            continue
        spec = str(entry)
        try:
            src = resolve_source(spec)
        except SourceError as err:
            raise SourceError(f"expert source '{spec}': {err}") from None
        if src.kind == "demo":
            model = build_demo(spec[len("demo:"):])
            out[name] = ExpertSource(name, spec, "demo", ModuleWeights(model, spec), model.config)
            continue
        if is_native(src.path):
            raise SourceError(f"expert source '{spec}' is already an upcycled model; pass a dense checkpoint")
        out[name] = ExpertSource(name, spec, src.kind, Checkpoint(src.path, spec), _read_config(src.path, spec),
                                 src.path, src.files)
    return out


def _read_config(path: Path, spec: str) -> Any:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise SourceError(f"cannot read the config of expert source '{spec}': {str(err).splitlines()[0][:200]}") from None


def _architecture(config: Any) -> tuple[str, tuple[str, ...], str | None]:
    activation = next((str(getattr(config, k)) for k in _ACTIVATION_KEYS if getattr(config, k, None) is not None), None)
    return getattr(config, "model_type", None), tuple(getattr(config, "architectures", None) or ()), activation


def check_compatible(base_model: nn.Module, base: Weights, base_dir: Path | None,
                     sources: dict[str, ExpertSource]) -> None:
    """Refuse a source that is not a fine-tune of the base's architecture: another model type,
    class or activation, a tensor of `base_model` missing or shaped otherwise, or another
    tokenizer vocabulary (where the base and the source both have a tokenizer)."""
    from .formats.tensors import alias_groups

    if getattr(base_model, "config", None) is None:
        raise OptionError(f"experts from other checkpoints need a transformers model as the base, not {type(base_model).__name__}")
    kind, classes, act = _architecture(base_model.config)
    aliases, prefix = alias_groups(base_model), getattr(base_model, "base_model_prefix", "") or ""
    expected = {}
    for name in base_model.state_dict():
        stored = stored_name(base, name, aliases, prefix)
        if stored is not None:
            expected[name] = base.shape(stored)
    vocabulary = _Vocabulary(base_dir)
    for s in sources.values():
        other = _architecture(s.config)
        if other[:2] != (kind, classes):
            raise SourceError(f"expert source '{s.name}' is a {other[0]} model ({', '.join(other[1]) or 'no class'}) and "
                              f"the base a {kind} ({', '.join(classes) or 'no class'}); experts must come from "
                              "fine-tunes of the base's architecture")
        if other[2] != act:
            raise SourceError(f"expert source '{s.name}' uses the activation {other[2]} and the base {act}; "
                              "experts must compute the base's FFN")
        for name, shape in expected.items():
            stored = stored_name(s.weights, name, aliases, prefix)
            if stored is None:
                raise SourceError(f"expert source '{s.name}' lacks tensor '{name}' that the base has; "
                                  "it is not a fine-tune of the base")
            if s.weights.shape(stored) != shape:
                raise SourceError(f"expert source '{s.name}' has tensor '{name}' of shape {s.weights.shape(stored)}, "
                                  f"the base {shape}; it is not a fine-tune of the base")
        vocabulary.check(s)


class _Vocabulary:
    """The base's tokenizer vocabulary, read once, compared with each source's."""

    def __init__(self, base_dir: Path | None):
        self.base = _vocabulary(base_dir, "the base")

    def check(self, source: ExpertSource) -> None:
        if self.base is None:
            return
        theirs = _vocabulary(source.path, f"expert source '{source.name}'")
        if theirs is None or theirs == self.base:
            return
        if len(theirs) != len(self.base):
            raise SourceError(f"expert source '{source.name}' has a tokenizer of {len(theirs)} tokens and the base one of "
                              f"{len(self.base)}; experts must share the base's vocabulary")
        token = next(t for t in sorted(set(self.base) | set(theirs)) if self.base.get(t) != theirs.get(t))
        raise SourceError(f"expert source '{source.name}' has another tokenizer vocabulary than the base: token {token!r} "
                          f"is id {theirs.get(token)} there and {self.base.get(token)} in the base")


def _vocabulary(path: Path | None, what: str) -> dict[str, int] | None:
    if path is None or not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise SourceError(f"cannot read the tokenizer of {what} ('{path}'): {str(err).splitlines()[0][:200]}") from None
    return dict(tokenizer.get_vocab())


def distinct(weights: Iterable[Weights]) -> list[Weights]:
    """`weights` without repeats of one checkpoint (the same directory, the same model), in order."""
    out, seen = [], set()
    for w in weights:
        key = _identity(w)
        if key not in seen:
            seen.add(key)
            out.append(w)
    return out


def average(reads: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """The mean of the tensors that `reads` return, accumulated in float32 (float64 for float64)
    in the order given and cast back to the first one's dtype; one tensor is read at a time, so
    the streaming executor holds the accumulator and one source tensor."""
    first = reads[0]()
    if not first.is_floating_point() or len(reads) == 1:
        return first
    acc = first.to(torch.float64 if first.dtype == torch.float64 else torch.float32, copy=True)
    dtype = first.dtype
    del first
    for read in reads[1:]:
        _add_into(acc, read())  # the tensor read is released on return, before the next read
    acc /= len(reads)
    return acc.to(dtype)


def _add_into(acc: torch.Tensor, t: torch.Tensor) -> None:
    # An add of another dtype first casts its operand to a temporary: adding in 4M-element
    # pieces keeps that temporary at 16 MB instead of a float32 copy of the whole tensor.
    for a, b in zip(acc.view(-1).split(_PIECE), t.reshape(-1).split(_PIECE)):
        a += b


@torch.no_grad()
def average_into(model: nn.Module, skip: set[str], sources: Sequence[Weights]) -> None:
    """Branch-Train-MiX in memory: every floating tensor of `model`'s state dict, except those in
    `skip` (the FFNs that become experts), replaced by its mean over the model and `sources`."""
    from .formats.tensors import alias_groups

    groups = alias_groups(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    # the base itself may be listed among the sources (by object, or by the directory it was loaded from)
    loaded_from = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    base_keys = {id(model), *([Path(loaded_from).resolve()] if loaded_from and Path(loaded_from).is_dir() else [])}
    others = [w for w in distinct(sources) if _identity(w) not in base_keys]
    for name, tensor in model.state_dict(keep_vars=True).items():
        if groups[name][0] != name or name in skip or not tensor.is_floating_point():
            continue
        reads = [lambda t=tensor: t.detach()]
        for w in others:
            stored = stored_name(w, name, groups, prefix)
            if stored is None:
                raise SourceError(f"expert source '{w.path}' lacks tensor '{name}' that the base has")
            reads.append(lambda w=w, n=stored: w.read(n))
        tensor.copy_(average(reads))
