"""Every asset is a config value; a missing one fails fast with the key, the path and a remedy."""

import pytest

from blip2_internlm import assets
from blip2_internlm.assets import AssetMissingError


def test_tiny_assets_are_generated_once_and_deterministically(tmp_path, monkeypatch):
    import hashlib

    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / run))
        bert = assets.resolve_text_model("tiny")
        vit = assets.resolve_vit_weights("tiny", "tiny", 64)
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in (bert / "vocab.txt", bert / "model.safetensors", vit)]
        )
        assert assets.resolve_text_model("tiny") == bert  # second call reuses
    assert digests[0] == digests[1]


def test_tiny_vocab_covers_the_synthetic_captions():
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(assets.resolve_text_model("tiny"))
    for caption in ("左边有一个红色的圆形", "a red circle on the left", "is there a blue square?"):
        assert tokenizer.unk_token not in tokenizer.tokenize(caption)


def test_a_missing_local_text_model_names_the_key_and_path(tmp_path):
    with pytest.raises(AssetMissingError) as err:
        assets.resolve_text_model(str(tmp_path / "bert-base-chinese"))
    message = str(err.value)
    assert "model.qformer_text_model" in message and str(tmp_path / "bert-base-chinese") in message
    assert "huggingface-cli download" in message


def test_an_uncached_hub_name_fails_without_touching_the_network(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(assets.DOWNLOADS_ENV, raising=False)
    with pytest.raises(AssetMissingError, match="not in the Hugging Face cache"):
        assets.resolve_text_model("bert-base-uncased")


@pytest.mark.parametrize("hub_name", ["huggingface", "modelscope"])
def test_neither_hub_is_asked_over_the_network_with_the_default_switch(tmp_path, monkeypatch, hub_name):
    import socket

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this spec")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # a host lookup is the first step out
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("BLIP2_INTERNLM_HUB", hub_name)
    monkeypatch.delenv(assets.DOWNLOADS_ENV, raising=False)
    where = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}[hub_name]
    with pytest.raises(AssetMissingError, match=f"not in the {where} cache"):
        assets.resolve_llm("internlm/internlm2-1_8b")
    assert attempts == []


def test_a_directory_without_a_vocab_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AssetMissingError, match="lacks \\['vocab.txt'\\]"):
        assets.resolve_text_model(str(tmp_path))


def test_vit_weights_are_required_for_the_real_vit(lavis_ready):
    with pytest.raises(AssetMissingError, match="model.vit_weights.*eva_vit_g.pth"):
        assets.resolve_vit_weights("eva_clip_g", None, 224)
    with pytest.raises(AssetMissingError, match="only for vit_model 'tiny'"):
        assets.resolve_vit_weights("eva_clip_g", "tiny", 224)


# --- generated assets, reached by name ------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """The generated-asset registry, restored after the test."""
    monkeypatch.setattr(assets, "_GENERATED", dict(assets._GENERATED))
    return assets


def test_the_package_registers_every_tiny_asset_a_config_can_name():
    assert assets.generated_names(assets.TEXT_MODEL) == ["tiny", "tiny-zh"]
    assert assets.generated_names(assets.VIT_WEIGHTS) == ["tiny"]
    assert assets.generated_names(assets.LLM) == ["tiny", "tiny-opt"]


def test_a_registered_asset_is_built_once_under_its_name_with_the_resolvers_parameters(registry, tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    builds = []

    def build(out, image_size):
        builds.append(image_size)
        (out / "w.bin").write_bytes(bytes([image_size]))

    asset = assets.GeneratedAsset(dirname=lambda image_size: f"fake-vit-{image_size}", build=build, file="w.bin")
    registry.register_generated(assets.VIT_WEIGHTS, "fake", asset)
    first = assets.resolve_vit_weights("fake", "fake", 32)
    assert first == tmp_path / "fake-vit-32" / "w.bin" and first.read_bytes() == bytes([32])
    assert assets.resolve_vit_weights("fake", "fake", 32) == first and builds == [32]
    with pytest.raises(AssetMissingError, match="only for vit_model 'fake', not 'tiny'"):
        assets.resolve_vit_weights("tiny", "fake", 32)


def test_an_unregistered_tiny_name_fails_as_any_unknown_model_does(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(assets.DOWNLOADS_ENV, raising=False)
    with pytest.raises(AssetMissingError, match="config key 'model.llm_model' = 'tiny-llama'.*Hugging Face cache"):
        assets.resolve_llm("tiny-llama")
    assert assets.generated_config(assets.LLM, "tiny-llama") is None


def test_an_unknown_kind_of_asset_is_refused(registry):
    asset = assets.GeneratedAsset(dirname=lambda: "x", build=lambda out: None)
    with pytest.raises(ValueError, match="unknown asset kind 'tokenizer'"):
        registry.register_generated("tokenizer", "tiny", asset)


@pytest.mark.parametrize(
    "kind,value",
    [("text_model", "tiny"), ("text_model", "tiny-zh"), ("llm", "tiny"), ("llm", "tiny-opt")],
)
def test_the_architecture_a_generated_model_announces_is_the_one_it_builds(kind, value):
    import json

    from transformers import AutoConfig

    announced = assets.generated_config(kind, value)
    resolve = assets.resolve_text_model if kind == "text_model" else assets.resolve_llm
    built = json.loads((resolve(value) / "config.json").read_text(encoding="utf-8"))
    assert {key: built[key] for key in announced} == announced
    # what a meta-device build makes of it
    config = AutoConfig.for_model(**announced)
    assert (config.model_type, config.vocab_size) == (built["model_type"], built["vocab_size"])
