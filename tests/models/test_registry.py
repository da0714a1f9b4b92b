import pytest

from probprune.errors import UnsupportedModelError
from probprune.models import get_adapter, supported_architectures, tiny_model


def test_tiny_unit_counts_and_costs(tiny_kind):
    model = tiny_model(tiny_kind)
    space = get_adapter(model).mask_space(layers=True)
    cfg = model.config
    n_layers, n_kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_attention_heads // n_kv
    assert space.type_counts() == {"head": n_layers * n_kv, "channel": n_layers * 96, "layer": n_layers}
    bias = (group + 2) * d if tiny_kind == "qwen2" else 0
    assert space.cost[0] == (2 * group + 2) * d * 64 + bias
    assert space.cost[n_layers * n_kv] == 3 * 64
    assert space.total_params == sum(p.numel() for p in model.parameters())
    # the whole model's parameters: every layer's (prunable, norms and shared q/k norms) + embeddings, head, final norm
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    assert space.total_params == outside + sum(ls.layer_params for ls in space.layers)


def test_unsupported_architecture_names_it_and_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(
        UnsupportedModelError,
        match="unsupported architecture 'GPT2LMHeadModel': probprune supports "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, "
        "Phi3ForCausalLM",
    ):
        get_adapter(model)
    assert supported_architectures() == [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    ]


@pytest.mark.slow
def test_smollm2_units_and_costs(smollm2):
    model, _ = smollm2
    space = get_adapter(model).mask_space(layers=True)
    assert space.type_counts() == {"head": 90, "channel": 46_080, "layer": 30}
    assert space.cost[0] == 294_912
    assert space.cost[90] == 1_728
    assert space.prunable_params == 30 * (3 * 294_912 + 1536 * 1_728 + 2 * 576)
    assert space.total_params == sum(p.numel() for p in model.parameters()) == 134_515_008
