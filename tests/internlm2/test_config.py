"""InternLM2Config reads the official config.json unchanged and knows the public sizes."""

import json

import pytest
import torch

from blip2_internlm.internlm2 import PRESETS, InternLM2Config, InternLM2ForCausalLM

# internlm2-chat-1_8b's config.json as published (transformers_version 4.41.0).
OFFICIAL_1_8B = {
    "architectures": ["InternLM2ForCausalLM"],
    "attn_implementation": "eager",
    "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    },
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 32768,
    "model_type": "internlm2",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "pad_token_id": 2,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.0",
    "use_cache": True,
    "vocab_size": 92544,
}


def test_official_config_json_loads_as_is_and_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_1_8B))
    config = InternLM2Config.from_pretrained(tmp_path)
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "bias",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "auto_map",
        "pretraining_tp",
        "rope_scaling",
    ):
        assert getattr(config, key) == OFFICIAL_1_8B[key], key
    assert config.rope_scaling_type == "dynamic" and config.rope_scaling_factor == 2.0
    assert config.head_dim == 128
    assert config.dtype == torch.bfloat16
    # The official "attn_implementation": "eager" is a hint for the remote code only.
    assert config._attn_implementation is None

    config.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["auto_map"] == OFFICIAL_1_8B["auto_map"]
    assert saved["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert InternLM2Config.from_pretrained(tmp_path / "again").to_diff_dict() == config.to_diff_dict()


def test_preset_matches_official_1_8b_config():
    config = InternLM2Config.preset("internlm2-1_8b")
    for key, value in OFFICIAL_1_8B.items():
        if key in (
            "architectures",
            "auto_map",
            "model_type",
            "hidden_act",
            "bias",
            "rope_scaling",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "rope_theta",
            "max_position_embeddings",
        ):
            assert getattr(config, key) == value, key
    assert InternLM2Config.preset("internlm/internlm2-chat-1_8b").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "name, params",
    [("internlm2-1_8b", 1.889e9), ("internlm2-7b", 7.738e9), ("internlm2-20b", 19.86e9)],
)
def test_presets_build_real_size_models_on_meta(name, params):
    with torch.device("meta"):
        model = InternLM2ForCausalLM(InternLM2Config.preset(name))
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - params) / params < 0.005, total
    wqkv = model.model.layers[0].attention.wqkv.weight
    preset = PRESETS[name]
    head_dim = preset["hidden_size"] // preset["num_attention_heads"]
    assert wqkv.shape == (
        (preset["num_attention_heads"] + 2 * preset["num_key_value_heads"]) * head_dim,
        preset["hidden_size"],
    )


def test_rope_type_key_is_accepted_and_bad_scaling_rejected():
    assert InternLM2Config(rope_scaling={"rope_type": "linear", "factor": 4}).rope_scaling_type == "linear"
    with pytest.raises(ValueError, match="rope_scaling"):
        InternLM2Config(rope_scaling={"type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="factor"):
        InternLM2Config(rope_scaling={"type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        InternLM2Config(num_attention_heads=32, num_key_value_heads=6)
