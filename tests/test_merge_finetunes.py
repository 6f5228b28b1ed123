"""Acceptance: four fine-tunes of one tiny base, each trained briefly on its own tiny task, merged
into four experts through the CLI, as mergekit-moe users do.

- the Llama-family result loads in `MixtralForCausalLM`, and with the router forced to expert i
  it computes what the base computes with source i's FFNs (base attention + source i's FFNs);
- with prompt gates, each expert's own prompts go (top-1) to that expert in at least 80% of the
  MoE layers.
"""

import pytest
import torch
import transformers
import yaml

from tests.finetunes import RANGE, TASKS, save_checkpoint, task_text, trained_finetunes


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """(dir, base model, tuned models, base dir, source dirs, prompts file, prompts per task)."""
    root = tmp_path_factory.mktemp("finetunes")
    base, tuned = trained_finetunes("llama")
    base_dir = save_checkpoint(base, root / "base")
    source_dirs = [save_checkpoint(m, root / f"task{i}") for i, m in enumerate(tuned)]
    prompts = [[task_text(i, 12, s) for s in range(0, RANGE, 3)] for i in range(TASKS)]
    prompts_file = root / "prompts.yaml"
    prompts_file.write_text(yaml.safe_dump([{"positive": p} for p in prompts]))
    return root, base, tuned, base_dir, source_dirs, prompts_file, prompts


def _merge(sparsify_cli, finetunes, out, *extra):
    root, _, _, base_dir, source_dirs, _, _ = finetunes
    code, stdout, err = sparsify_cli("upcycle", base_dir, "--experts-from", ",".join(map(str, source_dirs)),
                                     "--format", "mixtral", "-o", out, *extra)
    assert code == 0, err
    return transformers.MixtralForCausalLM.from_pretrained(out).eval()


def _gate_hooks(model, hook):
    return [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]


def test_forced_expert_i_is_base_attention_plus_source_i_ffns(tmp_path, sparsify_cli, finetunes):
    _, base, tuned, _, _, _, prompts = finetunes
    moe = _merge(sparsify_cli, finetunes, tmp_path / "moe")
    assert moe.config.num_local_experts == TASKS
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")(prompts[t][0])["input_ids"]
                        for t in range(TASKS)])
    for i, source in enumerate(tuned):
        reference = transformers.LlamaForCausalLM(base.config).eval()
        state = base.state_dict()
        state.update({k: v for k, v in source.state_dict().items() if ".mlp." in k})
        reference.load_state_dict(state)

        def force(gate, args, out, i=i):
            logits, scores, index = out
            other = (i + 1) % TASKS
            index = torch.tensor([[i, other]]).expand(index.shape[0], 2)
            return logits, torch.tensor([[1.0, 0.0]], dtype=scores.dtype).expand(index.shape[0], 2), index

        handles = _gate_hooks(moe, force)
        with torch.no_grad():
            got, want = moe(input_ids=ids).logits, reference(input_ids=ids).logits
        for h in handles:
            h.remove()
        assert torch.equal(got, want), (i, float((got - want).abs().max()))  # the same operations, bit for bit
        # and the experts differ: another source's FFNs compute something else
        other = transformers.LlamaForCausalLM(base.config).eval()
        other.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert (other(input_ids=ids).logits - want).abs().max() > 1e-3


def _routed_share(moe, tokenizer, prompts):
    """Per task: the share of (prompt, MoE layer) pairs whose tokens go top-1 mostly to its expert."""
    logits = {}
    handles = _gate_hooks(moe, lambda gate, args, out: logits.__setitem__(id(gate), out[0]))
    gates = [id(layer.mlp.gate) for layer in moe.model.layers]
    shares = []
    for task, texts in enumerate(prompts):
        hits = []
        for text in texts:
            with torch.no_grad():
                moe(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            for g in gates:
                top1 = logits[g].argmax(dim=-1)
                hits.append(int(torch.bincount(top1, minlength=TASKS).argmax()) == task)
        shares.append(sum(hits) / len(hits))
    for h in handles:
        h.remove()
    return shares


@pytest.mark.parametrize("kind", ["prompts", "embeddings"])
def test_prompt_gates_route_each_experts_prompts_to_it(tmp_path, sparsify_cli, finetunes, kind):
    _, _, _, _, _, prompts_file, prompts = finetunes
    moe = _merge(sparsify_cli, finetunes, tmp_path / "moe", "--router-init", kind, "--prompts", prompts_file)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "moe")
    shares = _routed_share(moe, tokenizer, prompts)
    bound = 0.8 if kind == "prompts" else 0.5  # cheap embeddings know each token, not its context
    assert min(shares) >= bound, shares
    if kind == "prompts":  # what random gates do with the same prompts
        random = _routed_share(_merge(sparsify_cli, finetunes, tmp_path / "random"), tokenizer, prompts)
        assert min(random) < bound, random
