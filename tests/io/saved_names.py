"""Which families of the installed transformers save tensors under names other than their modules'.

`saved_names(model)` is the set of names `save_pretrained` writes for `model`, computed with
save_pretrained's own steps (`_keys_to_ignore_on_save`, `remove_tied_weights_from_state_dict`,
`revert_weight_conversion`) on meta tensors, so that a sweep over every family costs no weights.
`python -m tests.io.saved_names` walks transformers' registries (base, causal LM, masked LM,
seq2seq), builds each family small from its default config, and writes the families whose saved
names differ from their state dicts' to `renamed_families.py` (the tests' table of that class).
"""

from __future__ import annotations

import os
import pprint
import signal
import sys

import torch.nn as nn

__all__ = ["saved_names", "small_config", "differing_families"]

_SMALL = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "embedding_size"), 32),
    **dict.fromkeys(("intermediate_size", "d_ff", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim"), 64),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer", "encoder_layers", "decoder_layers",
                     "num_decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads"), 4),
    "num_key_value_heads": 2, "head_dim": 8, "d_kv": 8, "vocab_size": 128,
    **dict.fromkeys(("max_position_embeddings", "n_positions"), 512),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    "moe_intermediate_size": 32,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")
MAX_PARAMS = 5_000_000  # families still larger than this when shrunk are left out of the real-weight tests


def small_config(model_type: str):
    """The family's default config with its common size fields shrunk (only downwards), built
    through the config class so that fields derived from them (per-layer lists) follow."""
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    default = cls()
    small = {}
    for name, size in _SMALL.items():
        if isinstance(getattr(cls, name, None), property):
            continue  # derived, not settable
        value = getattr(default, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > size:
            small[name] = size
    for name in _TOKEN_IDS:  # token ids must lie inside the shrunk vocabulary
        value = getattr(default, name, None)
        if isinstance(value, int) and value >= small.get("vocab_size", 1 << 62):
            small[name] = 1
    # per-layer lists sized for the default depth are dropped, for the config to derive them again
    depth = getattr(default, "num_hidden_layers", None)
    for name, value in default.to_dict().items():
        if "num_hidden_layers" in small and isinstance(value, list) and len(value) == depth and name.endswith("types"):
            small[name] = None
    try:
        return cls(**small)
    except Exception:  # a family whose fields constrain each other: keep its default size
        return default


def saved_names(model: nn.Module) -> set[str]:
    """The tensor names `model.save_pretrained` would write (the model may be on the meta device)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state.pop(key, None)
    return set(revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model)))


def _registries() -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    pairs = []
    for mapping in (auto.MODEL_MAPPING_NAMES, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                    auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        for model_type, cls in mapping.items():
            pairs.append((model_type, cls[0] if isinstance(cls, (list, tuple)) else cls))
    return sorted(set(pairs))


class _Slow(Exception):
    pass


def differing_families() -> dict[tuple[str, str], dict]:
    """(model type, class) -> what differs, for every registered family whose small meta skeleton
    saves names that are not its state dict's; families that cannot be built are skipped."""
    import transformers

    from sparsify.io.skeleton import params_on_meta

    def slow(*_):
        raise _Slow()

    signal.signal(signal.SIGALRM, slow)
    found = {}
    for model_type, cls_name in _registries():
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        signal.alarm(60)
        try:
            with params_on_meta():
                model = cls(small_config(model_type))
            state = set(model.state_dict())
            saved = saved_names(model)
        except Exception as err:  # a family whose default config does not build small is not in the class
            print(f"skip {model_type}/{cls_name}: {type(err).__name__}", file=sys.stderr)
            continue
        finally:
            signal.alarm(0)
        renamed = sorted(saved - state)
        if renamed or (state - saved) - set(getattr(model, "all_tied_weights_keys", {}) or {}):
            params = sum(p.numel() for p in model.parameters())
            found[(model_type, cls_name)] = {"renamed": len(renamed), "example": renamed[:1],
                                            "small": params <= MAX_PARAMS}
    return found


def write_table(path: str) -> None:
    """Write `differing_families()` as the module `path` (FAMILIES) for the tests to read."""
    import transformers

    table = pprint.pformat(differing_families(), width=120)
    with open(path, "w") as f:
        f.write(f'"""Families whose saved tensor names differ from their modules\' in transformers '
                f'{transformers.__version__}.\n\nGenerated by `python -m tests.io.saved_names`; do not edit."""\n\n'
                f"FAMILIES = {table}\n")


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    write_table(os.path.join(os.path.dirname(__file__), "renamed_families.py"))
