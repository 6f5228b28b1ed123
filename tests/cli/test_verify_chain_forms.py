"""`sparsify verify` on outputs whose FFN is a chain of the layer's modules, not one module:
the split form (BERT's `intermediate` then `output.dense`) and the inline form (BART's `fc1`,
`activation_fn`, `fc2` called by the layer's forward; the Time Series Transformer's, with a
dropout rate the plan overrides). The streamed comparison must install each site as the loader
does (activation and exit as identities, the overrides set) and compare each MoE layer with the
whole dense chain; before it did, every such output was reported as a MISMATCH.

Marian is here too: its checkpoint lacks the sinusoidal position tables (transformers neither
saves them nor expects them, `_keys_to_ignore_on_load_missing`, and makes them with the model's
`_init_weights`); upcycle makes them the same way, and verify compares with the dense model that
from_pretrained loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.coverage.tiny import tiny_config

FAMILIES = {
    "bert": "BertModel",
    "bart": "BartForConditionalGeneration",
    "whisper": "WhisperForConditionalGeneration",
    "time_series_transformer": "TimeSeriesTransformerModel",
    "marian": "MarianMTModel",
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_verify_matches_chain_form_outputs(model_type, tmp_path, sparsify_cli):
    config = tiny_config(model_type, [FAMILIES[model_type]])
    torch.manual_seed(0)
    getattr(transformers, FAMILIES[model_type])(config).eval().save_pretrained(tmp_path / "dense")
    code, _, err = sparsify_cli("upcycle", tmp_path / "dense", "--experts", "4", "--every", "1", "-o", tmp_path / "moe")
    assert code == 0, err
    sites = [s for s in json.loads((tmp_path / "moe" / "sparsify.json").read_text())["plan"]["sites"]]
    assert any(s.get("exit_path") for s in sites)  # the chain form this test is about
    code, stdout, err = sparsify_cli("verify", tmp_path / "dense", tmp_path / "moe", "--json")
    assert code == 0, stdout + err
    doc = json.loads(stdout)
    assert doc["match"] and doc["max_rel"] <= 1e-5
    assert all(layer["max_rel"] <= 1e-5 for layer in doc["layers"]), doc["layers"]
