"""``blip2_internlm.load_model_and_preprocess``: LAVIS's one call, plus your own checkpoint, model
options and a config file instead of a model type."""

import numpy as np
import pytest
import torch
from PIL import Image
from spec_helpers import REPO


@pytest.fixture(scope="module")
def trained(lavis_ready, tmp_path_factory):
    """A tiny model whose trainable weights moved away from any fresh build, saved as a LAVIS
    runner saves a checkpoint (trainable weights only, under "model")."""
    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.inference import load_model_and_preprocess

    model, vis_processors, _ = load_model_and_preprocess("blip2_internlm", "tiny")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if name not in frozen}
    path = tmp_path_factory.mktemp("weights") / "checkpoint_best.pth"
    save_checkpoint_file({"model": state, "epoch": 3}, path)
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


@pytest.mark.parametrize("dropped", ["Qformer.", "query_tokens", "llm_proj."])
def test_a_checkpoint_lacking_trainable_weights_is_an_error_naming_the_file(trained, tmp_path, dropped):
    from blip2_internlm.checkpoint import CheckpointError, save_checkpoint_file
    from blip2_internlm.inference import load_model_and_preprocess

    _, _, state, _ = trained
    kept = {name: tensor for name, tensor in state.items() if not name.startswith(dropped)}
    path = save_checkpoint_file({"model": kept}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as error:
        load_model_and_preprocess("blip2_internlm", "tiny", checkpoint=path)
    assert str(path) in str(error.value) and dropped in str(error.value)


def test_a_missing_checkpoint_file_is_an_error_naming_it(lavis_ready, tmp_path):
    from blip2_internlm.checkpoint import CheckpointError
    from blip2_internlm.inference import load_model_and_preprocess

    with pytest.raises(CheckpointError, match="nowhere.pth"):
        load_model_and_preprocess("blip2_internlm", "tiny", checkpoint=tmp_path / "nowhere.pth")


def test_an_unknown_model_option_is_an_error_naming_the_key(lavis_ready):
    from blip2_internlm.inference import ModelOptionError, load_model_and_preprocess

    with pytest.raises(ModelOptionError, match="'llm_modle'.*did you mean 'llm_model'"):
        load_model_and_preprocess("blip2_internlm", "tiny", llm_modle="/models/internlm2-1_8b")


def test_an_unknown_model_type_lists_the_model_types(lavis_ready):
    from blip2_internlm.inference import load_model_and_preprocess

    with pytest.raises(ValueError, match="no model type 'tiny2'.*'pretrain_internlm2_1.8b'"):
        load_model_and_preprocess("blip2_internlm", "tiny2")


def test_model_options_override_the_model_types_keys(lavis_ready):
    from blip2_internlm.inference import load_model_and_preprocess

    model, _, _ = load_model_and_preprocess(
        "blip2_internlm", "tiny", num_query_token=4, prompt="图片描述：", llm_precision="bf16"
    )
    assert model.query_tokens.shape[1] == 4
    assert model.prompt == "图片描述："
    # unlike LAVIS's function, the CPU does not cast the LLM to fp32
    assert model.llm_model.dtype == torch.bfloat16


def test_on_the_cpu_an_fp16_vit_is_built_in_fp32_and_generates(lavis_ready, tmp_path, trained):
    from blip2_internlm.inference import load_model_and_preprocess

    cfg = tmp_path / "fp16_vit.yaml"
    cfg.write_text("model:\n  arch: blip2_internlm\n  model_type: tiny\n  vit_precision: fp16\n")
    model, _, _ = load_model_and_preprocess(cfg_path=cfg)
    assert {p.dtype for p in model.visual_encoder.parameters()} == {torch.float32}
    _, _, _, images = trained
    assert len(model.generate({"image": images}, num_beams=1, max_length=3)) == len(images)


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
