"""One assembly path: a typed config holds every model key with its default and check, and the
files / random / meta weight sources build the same model from it."""

import pytest
import torch
from omegaconf import OmegaConf
from spec_helpers import REPO


def tiny_cfg():
    from blip2_internlm.models.blip2_internlm import Blip2InternLM

    return OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model


def test_an_unknown_key_is_an_error_that_suggests_the_closest_known_one(lavis_ready):
    from blip2_internlm.models.config import Blip2InternLMConfig

    cfg = tiny_cfg()
    cfg.llm_precison = "bf16"
    with pytest.raises(ValueError, match=r"'llm_precison' \(did you mean 'llm_precision'\?\)"):
        Blip2InternLMConfig.from_lavis(cfg)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_query_token", "32", r"model.num_query_token = '32' \(str\); expected int"),
        ("num_query_token", 0, r"model.num_query_token = 0; must be >= 1"),
        ("freeze_vit", 1, r"model.freeze_vit = 1 \(int\); expected bool"),
        ("autocast_dtype", "fp8", r"model.autocast_dtype = 'fp8'; expected one of"),
        ("llm_precision", "int8", r"model.llm_precision = 'int8'; expected one of"),
        ("attn_implementation", "flash", r"model.attn_implementation = 'flash'; expected one of"),
        ("llm_model", None, r"model.llm_model must be set"),
    ],
)
def test_a_bad_value_is_an_error_naming_its_key(lavis_ready, key, value, message):
    from blip2_internlm.models.config import Blip2InternLMConfig

    cfg = tiny_cfg()
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        Blip2InternLMConfig.from_lavis(cfg)


def test_autocast_off_with_an_fp16_vit_is_refused_before_anything_is_built(lavis_ready):
    from blip2_internlm.models.config import Blip2InternLMConfig

    cfg = tiny_cfg()
    cfg.autocast_dtype, cfg.vit_precision = "off", "fp16"
    with pytest.raises(ValueError, match="set vit_precision: fp32"):
        Blip2InternLMConfig.from_lavis(cfg)


def test_an_unquoted_off_in_yaml_or_options_means_off(lavis_ready):
    from blip2_internlm.models.config import Blip2InternLMConfig

    # LAVIS's Config reads `--options model.autocast_dtype=off` through OmegaConf.from_dotlist: YAML 1.1 makes it false
    options = OmegaConf.from_dotlist(["model.autocast_dtype=off"])
    cfg = OmegaConf.merge({"model": tiny_cfg()}, options).model
    assert cfg.autocast_dtype is False
    assert Blip2InternLMConfig.from_lavis(cfg).autocast_dtype == "off"
    cfg.freeze_vit = False  # a boolean key keeps its boolean
    assert Blip2InternLMConfig.from_lavis(cfg).freeze_vit is False


def test_a_key_the_yaml_leaves_out_takes_the_one_default_and_the_yaml_values_win(lavis_ready):
    from blip2_internlm.models.config import Blip2InternLMConfig

    cfg = tiny_cfg()
    assert "autocast_dtype" not in cfg
    config = Blip2InternLMConfig.from_lavis(cfg)
    assert config.autocast_dtype == Blip2InternLMConfig().autocast_dtype
    assert (config.num_query_token, config.image_size, config.llm_model) == (
        cfg.num_query_token,
        cfg.image_size,
        cfg.llm_model,
    )


def _tree(model):
    params = {n: (tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (tuple(b.shape), b.dtype) for n, b in model.named_buffers()}
    return params, buffers


@pytest.mark.parametrize("arch", ["blip2_internlm", "blip2"])
def test_files_random_and_meta_weight_sources_build_the_same_model(lavis_ready, arch):
    from lavis.common.registry import registry

    from blip2_internlm.models.builders import WeightSource

    model_cls = registry.get_model_class(arch)
    cfg = OmegaConf.load(model_cls.default_config_path("tiny")).model
    cfg.arch = arch
    from_files = model_cls.from_config(cfg)
    random = model_cls.from_config(cfg, weights=WeightSource("random"))
    meta = model_cls.from_config(cfg, weights=WeightSource("meta"))

    assert _tree(random) == _tree(from_files) == _tree(meta)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert {p.device.type for p in random.parameters()} == {"cpu"}
    # random weights are not the files' weights (the generated ViT has sin-cos position embeddings)
    assert not torch.equal(random.visual_encoder.pos_embed, from_files.visual_encoder.pos_embed)


def test_lavis_stage1_names_and_class_build_the_stage1_model_that_reads_its_asset_keys(lavis_ready):
    from lavis.common.registry import registry
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm.models.blip2_stage1 import Blip2Stage1, Blip2Stage1ITM

    assert registry.get_model_class("blip2") is Blip2Stage1
    assert registry.get_model_class("blip2_feature_extractor") is Blip2Stage1
    assert registry.get_model_class("blip2_image_text_matching") is Blip2Stage1ITM
    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.qformer_text_model = "/no/such/bert"
    with pytest.raises(FileNotFoundError, match="model.qformer_text_model.*/no/such/bert"):
        Blip2Qformer.from_config(cfg)  # LAVIS's class, called directly, reads the key too


def test_lavis_released_stage1_checkpoint_layout_initialises_the_real_size_stage2_model(lavis_ready):
    # LAVIS's blip2_pretrained.pth is a Blip2Qformer state dict under "model"; stage 1 here is a
    # Blip2Qformer subclass, so both have this layout.  Built on meta at real size: every key
    # stage 2 requires from a stage-1 checkpoint is there, with the same shape.
    from blip2_internlm.factory import build_model

    stage1 = build_model(cfg_path=REPO / "configs" / "blip2_internlm" / "pretrain_stage1.yaml", weights="meta")
    stage2 = build_model(
        cfg_path=REPO / "configs" / "blip2_internlm" / "pretrain_stage2_internlm2_1.8b.yaml", weights="meta"
    )
    released = {k: tuple(v.shape) for k, v in stage1.state_dict().items()}
    required = {
        k: tuple(v.shape)
        for k, v in stage2.state_dict().items()
        if k.startswith(type(stage2).checkpoint_required_prefixes) or k.startswith("ln_vision.")
    }
    assert required and {k: released.get(k) for k in required} == required
    assert any(k.startswith("Qformer.bert.encoder.layer.0.crossattention") for k in required)
