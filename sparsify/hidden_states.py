"""Hidden states at each MoE layer's input, computed from text in bounded memory.

The base model runs once over a batch of texts, and a hook on each selected site's module sees
the tensor that module receives: exactly what the router of the MoE that replaces it will see.
A model whose parameters are on the meta device (the streaming executor's skeleton) is run
layer by layer: each module that owns parameters reads them from the checkpoint just before it
runs and drops them right after, so at most one module's weights are in memory, whatever the
model's size, and each is read once. The run stops as soon as the last site has been seen (no
LM head). Callers reduce each site's states at once (sums, k-means), so only one site's are held.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .errors import OptionError, SourceError
from .merge import Weights, stored_name

__all__ = ["load_tokenizer", "token_batch", "lazy_weights", "site_inputs", "input_embeddings", "max_length"]


def load_tokenizer(tokenizer: Any, model: nn.Module, why: str) -> Any:
    """A tokenizer: the one given (an object, or a directory or hub id to load it from), else the
    one beside the model's checkpoint (`config.name_or_path`); `why` says what needs it."""
    import transformers

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    where = tokenizer or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not where:
        raise OptionError(f"{why} needs a tokenizer and {type(model).__name__} was not loaded from a checkpoint; "
                          "pass tokenizer= (a tokenizer or its directory)")
    try:
        return transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise OptionError(f"{why} needs a tokenizer and none could be read from '{where}' ({first}); "
                          "pass tokenizer= (a tokenizer or its directory)") from None


def max_length(model: nn.Module, cap: int = 512) -> int:
    """The longest token sequence to feed `model`: its position limit, at most `cap`."""
    config = getattr(model, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    return min([cap, *[n for n in limits if isinstance(n, int) and n > 0]])


def token_batch(tokenizer: Any, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and attention mask [B, T] of `texts`, each truncated to `length` and
    right-padded (the padding is masked, so its id does not matter)."""
    rows = [list(tokenizer(t)["input_ids"])[:length] for t in texts]
    if any(not r for r in rows):
        empty = next(t for t, r in zip(texts, rows) if not r)
        raise OptionError(f"the tokenizer makes no tokens of the prompt {empty!r}")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@contextlib.contextmanager
def lazy_weights(model: nn.Module, weights: Weights) -> Iterator[None]:
    """Within the block, every module of `model` that owns parameters reads them from `weights`
    (in the stored dtype) before its forward and returns to its meta parameters after."""
    from .formats.tensors import alias_groups

    aliases, prefix = alias_groups(model), getattr(model, "base_model_prefix", "") or ""
    loaded: dict[nn.Module, dict[str, nn.Parameter | None]] = {}

    def load(path: str) -> Callable:
        def pre(module: nn.Module, args: Any) -> None:
            original = loaded.setdefault(module, dict(module._parameters))
            for name, p in original.items():
                if p is None:
                    continue
                full = f"{path}.{name}" if path else name
                stored = stored_name(weights, full, aliases, prefix)
                if stored is None:
                    raise SourceError(f"checkpoint '{weights.path}' lacks tensor '{full}' that the model runs with")
                module._parameters[name] = nn.Parameter(weights.read(stored), requires_grad=False)
        return pre

    def drop(module: nn.Module, args: Any, out: Any) -> None:
        module._parameters.update(loaded.pop(module, {}))

    handles = []
    for path, module in model.named_modules():
        if any(p is not None for p in module._parameters.values()):
            handles += [module.register_forward_pre_hook(load(path)), module.register_forward_hook(drop)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module, original in loaded.items():  # modules left loaded when the run stopped early
            module._parameters.update(original)


class _Enough(Exception):
    """Raised from the last site's hook: the rest of the forward is not needed."""


def _forward_kwargs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    config = getattr(model, "config", None)
    accepts = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"input_ids": ids}
    if "attention_mask" in accepts:
        kwargs["attention_mask"] = mask
    if getattr(config, "is_encoder_decoder", False):
        # the decoder's sites see the same text, teacher-forced
        kwargs["decoder_input_ids"] = ids
        if "decoder_attention_mask" in accepts:
            kwargs["decoder_attention_mask"] = mask
    if "use_cache" in accepts:
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def site_inputs(model: nn.Module, paths: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
                on_input: Callable[[str, torch.Tensor], None], weights: Weights | None = None) -> None:
    """Run `model` once over token ids [B, T] and call `on_input(path, x)` with the input
    x [B, T, H] (float32) of each module in `paths`, in the order they run. With `weights`,
    the model's meta parameters are read from there module by module (`lazy_weights`)."""
    if getattr(model, "config", None) is None:
        raise OptionError(f"hidden states are computed from text, and {type(model).__name__} has no Hugging Face "
                          "config to feed it tokens")
    pending = set(paths)
    b, t = ids.shape

    def hook(path: str) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if path not in pending:
                return  # a module run twice: its first input is the one
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[:-1].numel() != b * t:
                raise OptionError(f"the input of {path} has shape {tuple(x.shape)}, not one vector per token of "
                                  f"the [{b}, {t}] batch; this model cannot be routed from text")
            pending.discard(path)
            on_input(path, x.detach().reshape(b, t, x.shape[-1]).float())
            if not pending:
                raise _Enough
        return pre

    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
    was_training = model.training
    model.eval()
    try:
        with lazy_weights(model, weights) if weights is not None else contextlib.nullcontext():
            model(**_forward_kwargs(model, ids, mask))
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if pending:
        raise OptionError(f"the model's forward never ran {sorted(pending)[0]}; its router cannot be initialised from text")


def input_embeddings(model: nn.Module, weights: Weights | None = None) -> torch.Tensor:
    """The input token embedding matrix [V, H] of a transformers model (read from `weights`
    when the model's parameters are on the meta device)."""
    from .formats.tensors import alias_groups

    get = getattr(model, "get_input_embeddings", None)
    module = get() if get is not None else None
    weight = getattr(module, "weight", None)
    if weight is None:
        raise OptionError(f"{type(model).__name__} has no input token embeddings to initialise routers from")
    if weights is None and weight.device.type != "meta":
        return weight.detach()
    path = next(n for n, m in model.named_modules() if m is module)
    name = f"{path}.weight" if path else "weight"
    stored = stored_name(weights, name, alias_groups(model), getattr(model, "base_model_prefix", "") or "") if weights else None
    if stored is None:
        raise SourceError(f"the checkpoint lacks the token embeddings '{name}'")
    return weights.read(stored)
