"""``blip2_internlm.load_model_and_preprocess``: LAVIS's one call, plus your own checkpoint, model
options and a config file instead of a model type.  The model comes from
``blip2_internlm.factory`` (tests/test_factory.py specifies its weights, options and errors); these
specs are what the call adds: the processors, and a loaded checkpoint that generates as the
model it was saved from."""

import numpy as np
import pytest
import torch
from PIL import Image
from spec_helpers import REPO


@pytest.fixture(scope="module")
def trained(tiny_trained_checkpoint):
    """The trained tiny model, its checkpoint and state (conftest), and three pictures as its eval
    processor makes them."""
    from blip2_internlm.inference import load_model_and_preprocess

    model, path, state = tiny_trained_checkpoint
    _, vis_processors, _ = load_model_and_preprocess("blip2_internlm", "tiny", checkpoint=path)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)) for _ in range(3)]
    images = torch.stack([vis_processors["eval"](picture) for picture in pictures])
    return model, path, state, images


def test_a_checkpoint_loads_in_one_call_and_generates_what_the_model_in_memory_generates(trained):
    from blip2_internlm.inference import load_model_and_preprocess

    model, path, state, images = trained
    loaded, _, _ = load_model_and_preprocess("blip2_internlm", "tiny", checkpoint=path)
    fresh, _, _ = load_model_and_preprocess("blip2_internlm", "tiny")

    assert not loaded.training
    assert sorted(loaded.checkpoint_report.loaded) == sorted(state)
    with torch.no_grad():
        assert torch.equal(loaded.query_embeds(images), model.query_embeds(images))
        # a fresh build differs: the equality above comes from the checkpoint
        assert not torch.allclose(fresh.query_embeds(images), model.query_embeds(images))
    settings = {"num_beams": 3, "max_length": 8}
    assert loaded.generate({"image": images}, **settings) == model.generate({"image": images}, **settings)


def test_model_options_are_keyword_arguments(lavis_ready):
    from blip2_internlm.inference import ModelOptionError, load_model_and_preprocess

    model, _, _ = load_model_and_preprocess("blip2_internlm", "tiny", num_query_token=4, prompt="图片描述：")
    assert model.query_tokens.shape[1] == 4
    assert model.prompt == "图片描述："
    with pytest.raises(ModelOptionError, match="'llm_modle'.*did you mean 'llm_model'"):
        load_model_and_preprocess("blip2_internlm", "tiny", llm_modle="/models/internlm2-1_8b")


def test_a_config_file_gives_its_model_section_and_its_datasets_eval_processors(trained):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from blip2_internlm.inference import load_model_and_preprocess
    from blip2_internlm.processors.chinese_text import ChineseCaptionProcessor

    _, path, _, images = trained
    cfg_path = REPO / "configs/tiny/caption_eval.yaml"
    model, vis_processors, txt_processors = load_model_and_preprocess(cfg_path=cfg_path, checkpoint=path)
    assert isinstance(vis_processors["eval"], BlipImageEvalProcessor)
    assert isinstance(txt_processors["eval"], ChineseCaptionProcessor)  # the dataset's, not the model type's
    assert torch.equal(model.query_embeds(images), trained[0].query_embeds(images))


def test_a_config_file_without_the_checkpoint_it_needs_names_the_key(lavis_ready):
    from blip2_internlm.assets import AssetMissingError
    from blip2_internlm.inference import load_model_and_preprocess

    with pytest.raises(AssetMissingError, match="model.finetuned"):
        load_model_and_preprocess(cfg_path=REPO / "configs/tiny/caption_eval.yaml")


def test_the_call_is_exported_from_the_package(lavis_ready):
    import blip2_internlm
    from blip2_internlm.inference import load_model_and_preprocess

    assert blip2_internlm.load_model_and_preprocess is load_model_and_preprocess
