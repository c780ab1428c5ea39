"""build_tiny_internlm2 writes a deterministic, loadable, official-shaped checkpoint."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blip2_internlm.tiny.internlm2 import build_tiny_internlm2

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
}


def test_same_seed_gives_identical_files_and_other_seed_does_not(tiny_dir, tmp_path):
    again = build_tiny_internlm2(tmp_path / "again")
    other = build_tiny_internlm2(tmp_path / "other", seed=1)
    assert {p.name for p in tiny_dir.iterdir()} == FILES
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_tiny_checkpoint_is_small_gqa_and_generates(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "internlm2" and "auto_map" in config
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert 100_000 < model.num_parameters() < 1_000_000
    assert model.config.vocab_size == tokenizer.vocab_size == len(tokenizer)
    batch = tokenizer(["一只猫", "A photo of a dog"], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch.input_ids.shape[1] + 4)


def test_extra_corpus_and_config_overrides(tmp_path):
    path = build_tiny_internlm2(
        tmp_path, corpus=["Zebra quagga okapi.", "斑马 霍加狓"], num_key_value_heads=4, vocab_size=900
    )
    tok = AutoTokenizer.from_pretrained(path)
    assert "霍" in tok.get_vocab()
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and config["vocab_size"] == 900
    assert torch.isfinite(AutoModelForCausalLM.from_pretrained(path)(torch.tensor([[1, 5, 9]])).logits).all()
