"""`auto`: a Hugging Face format only when it fits the source and keeps the options' meaning."""

import pytest

from sparsify.errors import OptionError
from sparsify.formats.registry import FORMAT_NAMES, choose_format, format_defaults
from tests.formats.hf_helpers import dense, upcycled


def test_hf_formats_are_registered_most_specific_first():
    assert FORMAT_NAMES[:1] == ("auto",)
    assert [n for n in FORMAT_NAMES if n in ("mixtral", "qwen2-moe", "switch")] == ["mixtral", "qwen2-moe", "switch"]
    assert format_defaults("mixtral", dense("llama").config) == {"every": 1}
    assert format_defaults("switch", dense("t5").config) == {"router": "switch", "top_k": 1}
    assert format_defaults("qwen2-moe", dense("qwen2").config) == {}


@pytest.mark.parametrize("name,options,chosen,why", [
    ("llama", {"every": 1}, "mixtral", "keep their meaning"),
    ("mistral", {"every": 1}, "mixtral", "keep their meaning"),
    ("llama", {"every": 2}, "sparsify-native", "mixtral: Mixtral has no sparse step"),
    ("llama", {"every": 1, "normalize": False}, "sparsify-native", "mixtral: Mixtral renormalises"),
    ("qwen2", {"every": 2}, "qwen2-moe", "keep their meaning"),
    ("qwen3", {"layers": [0, 3]}, "qwen2-moe", "keep their meaning"),
    ("t5", {"every": 2, "router": "switch"}, "switch", "keep their meaning"),
    ("t5", {"every": 2}, "sparsify-native", "switch: SwitchTransformers routes each token to its top-1 expert"),
    ("t5", {"every": 2, "router": "switch", "capacity_factor": 1.0}, "sparsify-native", "only approximated"),
    ("t5-gated", {"every": 2, "router": "switch"}, "sparsify-native", "has no gated FFN"),
    ("gpt2", {"every": 2}, "sparsify-native", "this source is 'gpt2'"),
])
def test_auto_picks_a_hf_format_only_when_it_keeps_the_meaning(name, options, chosen, why):
    moe = upcycled(name, **options)
    fmt, summary = choose_format("auto", moe.sparsify_plan, moe.config)
    assert fmt.name == chosen
    assert why in summary and "\n" not in summary


def test_a_named_format_that_cannot_express_the_plan_says_why():
    moe = upcycled("llama", every=2)
    with pytest.raises(OptionError, match="--format mixtral cannot express this conversion: Mixtral has no sparse"):
        choose_format("mixtral", moe.sparsify_plan, moe.config)
    with pytest.raises(OptionError, match="--format switch cannot express .* this source is 'llama'"):
        choose_format("switch", moe.sparsify_plan, moe.config)
