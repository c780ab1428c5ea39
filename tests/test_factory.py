"""``blip2_internlm.factory.build_model``: the one call every tool builds a model with.

A model type or a config file, model options and a checkpoint give the model, its numbers from
files, random or nothing at all (``meta``); whatever cannot be built as asked is one error type,
``ModelBuildError``, naming the key or the file.
"""

import os
import sys

import pytest
import torch
from spec_helpers import REPO


def parameter_tree(model) -> list:
    return [(name, tuple(param.shape), param.dtype, param.requires_grad) for name, param in model.named_parameters()]


def files_opened_while(build):
    """``(build(), paths)``: every file Python opened meanwhile (the ``open`` audit event of open() and os.open())."""
    opened, recording = [], [True]

    def hook(event, args):
        if recording[0] and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # hooks stay for the process: this one stops recording when the build returns
    try:
        return build(), opened
    finally:
        recording[0] = False


# --- weight sources ----------------------------------------------------------------------------------


def test_files_a_model_type_and_a_checkpoint_give_the_saved_weights_in_eval_mode(tiny_trained_checkpoint):
    from blip2_internlm.factory import build_model

    saved, path, state = tiny_trained_checkpoint
    model = build_model("blip2_internlm", "tiny", checkpoint=path)

    assert not model.training
    assert sorted(model.checkpoint_report.loaded) == sorted(state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items())
    # and the frozen parts are the model type's files, as in the saved model: the whole model is the saved one
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.state_dict().items())
    fresh = build_model("blip2_internlm", "tiny")
    assert not torch.equal(fresh.llm_proj.weight, model.llm_proj.weight), "the weights above are the checkpoint's"


def test_random_weights_build_the_same_architecture_with_other_numbers(lavis_ready):
    from blip2_internlm.factory import build_model

    from_files = build_model("blip2_internlm", "tiny")
    random = build_model("blip2_internlm", "tiny", weights="random", is_eval=False)

    assert parameter_tree(random) == parameter_tree(from_files)
    assert random.training and not from_files.training
    assert {p.device.type for p in random.parameters()} == {"cpu"}
    # the generated ViT has sin-cos position embeddings; a random one has not
    assert not torch.equal(random.visual_encoder.pos_embed, from_files.visual_encoder.pos_embed)


@pytest.mark.parametrize("model_type", ["tiny", "pretrain_internlm2_1.8b"])
def test_meta_builds_shapes_without_data_and_opens_no_file_but_its_model_type(lavis_ready, model_type):
    from blip2_internlm.factory import build_model

    build_model("blip2_internlm", model_type, weights="meta")  # imports done: what is opened below is the build's
    model, opened = files_opened_while(lambda: build_model("blip2_internlm", model_type, weights="meta"))

    assert all(param.is_meta for param in model.parameters())
    assert opened == [str(REPO / "blip2_internlm" / "configs" / "models" / f"blip2_internlm_{model_type}.yaml")]
    if model_type == "tiny":
        assert parameter_tree(model) == parameter_tree(build_model("blip2_internlm", "tiny"))


def test_a_config_file_builds_on_meta_as_the_planner_does(lavis_ready):
    from blip2_internlm.factory import build_model

    stage1 = build_model(cfg_path=REPO / "configs/blip2_internlm/pretrain_stage1.yaml", weights="meta")
    assert type(stage1).__name__ == "Blip2Stage1" and all(param.is_meta for param in stage1.parameters())


# --- options and config files ------------------------------------------------------------------------


def test_options_override_the_model_types_keys(lavis_ready):
    from blip2_internlm.factory import build_model

    model = build_model(
        "blip2_internlm", "tiny", options={"num_query_token": 4, "prompt": "图片描述：", "llm_precision": "bf16"}
    )
    assert model.query_tokens.shape[1] == 4
    assert model.prompt == "图片描述："
    # unlike LAVIS's load_model_and_preprocess, the CPU does not cast the LLM to fp32
    assert model.llm_model.dtype == torch.bfloat16


def test_command_line_options_are_model_keys_typed_as_lavis_types_them(lavis_ready):
    from blip2_internlm.factory import parse_model_options

    pairs = ["model.num_query_token=4", "prompt=图片描述：", "model.drop_path_rate=1e-3", "run.num_beams=3"]
    assert parse_model_options(pairs[:3]) == {"num_query_token": 4, "prompt": "图片描述：", "drop_path_rate": 1e-3}
    # a whole run's --options (the planner's, the export's): the run's keys are not the model's
    assert parse_model_options(pairs, run_sections=True) == parse_model_options(pairs[:3])


def test_on_the_cpu_an_fp16_vit_is_built_in_fp32_and_generates(lavis_ready, tmp_path):
    from blip2_internlm.factory import build_model

    cfg = tmp_path / "fp16_vit.yaml"
    cfg.write_text("model:\n  arch: blip2_internlm\n  model_type: tiny\n  vit_precision: fp16\n")
    model = build_model(cfg_path=cfg)
    assert {p.dtype for p in model.visual_encoder.parameters()} == {torch.float32}
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert len(model.generate({"image": images}, num_beams=1, max_length=3)) == len(images)
    # asked for as an option, or planned for a GPU (meta), the ViT stays fp16
    asked = build_model("blip2_internlm", "tiny", options={"vit_precision": "fp16"})
    planned = build_model(cfg_path=cfg, weights="meta")
    for kept in (asked, planned):
        assert kept.visual_encoder.blocks[0].attn.qkv.weight.dtype == torch.float16


def test_a_config_file_merges_as_lavis_config_does_and_options_come_last(lavis_ready):
    from types import SimpleNamespace

    from lavis.common.config import Config

    from blip2_internlm.factory import merged_model_config

    cfg_path = REPO / "configs/tiny/caption_eval.yaml"
    config = merged_model_config(cfg_path=cfg_path, options={"max_txt_len": 16})
    lavis = Config(SimpleNamespace(cfg_path=str(cfg_path), options=["model.max_txt_len=16"])).config
    assert config.model == lavis.model
    assert config.model.max_txt_len == 16 and config.model.llm_model == "tiny"  # from the tiny model type
    # the eval processors are those of the config's dataset, not the model type's
    assert config.preprocess.text_processor.eval.name == "chinese_caption"
    assert config.preprocess.vis_processor.eval.name == "blip_image_eval"


def test_an_option_may_name_the_model_type_as_a_run_does(lavis_ready):
    from blip2_internlm.factory import ModelOptionError, merged_model_config

    config = merged_model_config("blip2_opt_baseline", options={"model_type": "tiny"})
    assert config.model.model_type == "tiny" and config.model.llm_model == "tiny-opt"
    with pytest.raises(ModelOptionError, match="'tiny'.*'pretrain_opt2.7b'.*disagree"):
        merged_model_config("blip2_opt_baseline", "tiny", options={"model_type": "pretrain_opt2.7b"})


# --- one error type ----------------------------------------------------------------------------------


def test_an_unknown_arch_is_a_build_error_with_the_closest_name(lavis_ready):
    from blip2_internlm.factory import ModelBuildError, build_model

    with pytest.raises(
        ModelBuildError, match="'blip2_internlmm' is not a registered model; did you mean 'blip2_internlm'"
    ):
        build_model("blip2_internlmm", "tiny")


def test_an_unknown_model_type_lists_the_model_types(lavis_ready):
    from blip2_internlm.factory import ModelBuildError, build_model

    with pytest.raises(ModelBuildError, match="no model type 'tiny2'.*'pretrain_internlm2_1.8b'"):
        build_model("blip2_internlm", "tiny2")
    with pytest.raises(ModelBuildError, match="name a model type of blip2_internlm"):
        build_model("blip2_internlm")


def test_a_misspelt_option_is_a_build_error_with_the_closest_key(lavis_ready):
    from blip2_internlm.factory import ModelBuildError, ModelOptionError, build_model, parse_model_options
    from blip2_internlm.inference import ModelOptionError as documented

    with pytest.raises(ModelOptionError, match="'llm_modle'.*did you mean 'llm_model'") as error:
        build_model("blip2_internlm", "tiny", options={"llm_modle": "/models/internlm2-1_8b"})
    assert isinstance(error.value, ModelBuildError) and documented is ModelOptionError
    with pytest.raises(ModelOptionError, match="'llm_model': expected KEY=VALUE"):
        parse_model_options(["llm_model"])


def test_a_missing_checkpoint_file_is_a_build_error_naming_it(lavis_ready, tmp_path):
    from blip2_internlm.checkpoint import CheckpointError
    from blip2_internlm.factory import ModelBuildError, build_model

    with pytest.raises(ModelBuildError, match="nowhere.pth") as error:
        build_model("blip2_internlm", "tiny", checkpoint=tmp_path / "nowhere.pth")
    assert isinstance(error.value, CheckpointError)  # as blip2_internlm.checkpoint reports a file it cannot use


@pytest.mark.parametrize("dropped", ["Qformer.", "query_tokens", "llm_proj."])
def test_a_checkpoint_lacking_trainable_weights_is_a_build_error_naming_the_file(
    tiny_trained_checkpoint, tmp_path, dropped
):
    from blip2_internlm.checkpoint import CheckpointError, save_checkpoint_file
    from blip2_internlm.factory import ModelBuildError, build_model

    _, _, state = tiny_trained_checkpoint
    kept = {name: tensor for name, tensor in state.items() if not name.startswith(dropped)}
    path = save_checkpoint_file({"model": kept}, tmp_path / "partial.pth")
    with pytest.raises(ModelBuildError) as error:
        build_model("blip2_internlm", "tiny", checkpoint=path)
    assert str(path) in str(error.value) and dropped in str(error.value)
    assert isinstance(error.value, CheckpointError)


def test_a_checkpoint_of_another_model_is_a_build_error_naming_the_file(lavis_ready, tmp_path):
    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import ModelBuildError, build_model

    def trained_weights(model):
        return {k: v for k, v in model.state_dict().items() if not k.startswith(("visual_encoder.", "llm_model."))}

    stage1 = save_checkpoint_file({"model": trained_weights(build_model("blip2", "tiny"))}, tmp_path / "stage1.pth")
    with pytest.raises(ModelBuildError, match=r"stage1.pth does not initialise 2 trainable weights.*llm_proj"):
        build_model("blip2_internlm", "tiny", checkpoint=stage1)
    other_size = build_model("blip2_internlm", "tiny", options={"num_query_token": 4})
    smaller = save_checkpoint_file({"model": trained_weights(other_size)}, tmp_path / "four_queries.pth")
    with pytest.raises(ModelBuildError, match="(?s)four_queries.pth does not fit the model.*query_tokens"):
        build_model("blip2_internlm", "tiny", checkpoint=smaller)


def test_a_meta_build_takes_no_checkpoint(tiny_trained_checkpoint):
    from blip2_internlm.factory import ModelBuildError, build_model

    _, path, _ = tiny_trained_checkpoint
    with pytest.raises(ModelBuildError, match="checkpoint_best.pth: a meta build has no data"):
        build_model("blip2_internlm", "tiny", weights="meta", checkpoint=path)
    with pytest.raises(ModelBuildError, match="weight source 'fake'"):
        build_model("blip2_internlm", "tiny", weights="fake")
