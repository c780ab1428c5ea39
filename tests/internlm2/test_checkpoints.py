"""from_pretrained round trips, the official auto_map, and errors that name the file at fault."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from blip2_internlm.internlm2 import (
    InternLM2CheckpointError,
    InternLM2Config,
    InternLM2ForCausalLM,
    InternLM2Model,
    InternLM2Tokenizer,
    register_auto_classes,
)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_round_trip_keeps_official_names(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=True)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {
        "model.tok_embeddings.weight",
        "model.layers.0.attention.wqkv.weight",
        "model.layers.0.attention.wo.weight",
        "model.layers.0.feed_forward.w1.weight",
        "model.layers.0.feed_forward.w2.weight",
        "model.layers.0.feed_forward.w3.weight",
        "model.layers.0.attention_norm.weight",
        "model.layers.0.ffn_norm.weight",
        "model.norm.weight",
        "output.weight",
    } <= names
    assert not any("inv_freq" in n for n in names)
    loaded = InternLM2ForCausalLM.from_pretrained(tmp_path)
    assert _same_weights(model, loaded)
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_sharded_bin_loads_low_cpu_mem_in_bf16(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=False, max_shard_size="20KB")
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert len(list(tmp_path.glob("pytorch_model-*.bin"))) > 1
    loaded = InternLM2ForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usage=True, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p.to(torch.bfloat16), q), name
    with torch.no_grad():
        logits = loaded(torch.randint(3, 97, (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_bin_files_are_unpickled_weights_only(make_model, tmp_path):
    """A pickle that runs code on load is refused and does not run."""
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = model.state_dict()
    state["model.norm.weight"] = Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception) as err:
        InternLM2ForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()
    assert "pytorch_model.bin" in str(err.value)


def test_official_auto_map_dir_loads_natively_without_trust_remote_code(tiny_dir, monkeypatch):
    config = json.loads((tiny_dir / "config.json").read_text())
    tok_config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert "AutoTokenizer" in tok_config["auto_map"]
    assert not list(tiny_dir.glob("*.py"))  # nothing remote to run

    def no_prompt(*args):
        raise AssertionError("transformers asked whether to trust remote code")

    monkeypatch.setattr("builtins.input", no_prompt)
    register_auto_classes()
    register_auto_classes()  # idempotent
    assert type(AutoConfig.from_pretrained(tiny_dir)) is InternLM2Config
    assert type(AutoModelForCausalLM.from_pretrained(tiny_dir)) is InternLM2ForCausalLM
    assert type(AutoModel.from_pretrained(tiny_dir)) is InternLM2Model
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is InternLM2Tokenizer
    assert type(AutoTokenizer.from_pretrained(tiny_dir, use_fast=False)) is InternLM2Tokenizer


def test_trust_remote_code_true_defers_to_the_checkpoints_own_code(tiny_dir):
    register_auto_classes()
    # The tiny dir ships no configuration_internlm2.py, so opting in must go looking for it.
    with pytest.raises(OSError, match="configuration_internlm2"):
        AutoConfig.from_pretrained(tiny_dir, trust_remote_code=True)


def test_wrong_shapes_name_the_weight_file(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(InternLM2CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tiny_copy)
    message = str(err.value)
    assert str(tiny_copy / "model.safetensors") in message
    assert "feed_forward.w1.weight" in message


def test_missing_shard_is_named(make_model, tmp_path):
    make_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(InternLM2CheckpointError) as err:
        InternLM2ForCausalLM.from_pretrained(tmp_path)
    assert shards[-1].name in str(err.value)


def test_missing_tensor_is_an_error_naming_the_file(tiny_copy):
    path = tiny_copy / "model.safetensors"
    state = load_file(path)
    del state["model.layers.1.attention.wo.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(InternLM2CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tiny_copy)
    assert str(path) in str(err.value) and "model.layers.1.attention.wo.weight" in str(err.value)
    # an explicit opt-in still allows partial loading
    AutoModelForCausalLM.from_pretrained(tiny_copy, allow_missing_weights=True)


def test_truncated_weights_name_the_file(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InternLM2CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tiny_copy)
    assert str(path) in str(err.value)


def test_absent_tokenizer_model_is_named(tiny_copy):
    (tiny_copy / "tokenizer.model").unlink()
    with pytest.raises(OSError) as err:
        AutoTokenizer.from_pretrained(tiny_copy)
    assert "tokenizer.model" in str(err.value)


def test_absent_weights_are_named(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(OSError) as err:
        AutoModelForCausalLM.from_pretrained(tiny_copy)
    assert "model.safetensors" in str(err.value)
