"""LAVIS's stage-1 BLIP-2 builds offline, trains every parameter, generates, and counts same-image
captions as positives."""

import pytest
import torch
from omegaconf import OmegaConf

from blip2_internlm.assets import AssetMissingError


def test_the_tiny_stage1_model_builds_from_generated_assets(tiny_stage1_model):
    model = tiny_stage1_model
    assert model.query_tokens.shape == (1, 8, 64)
    assert model.visual_encoder.num_features == 64
    assert model.tokenizer.bos_token == "[DEC]"


def test_a_missing_qformer_text_model_names_its_config_key(lavis_ready, tmp_path):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.qformer_text_model = str(tmp_path / "missing-bert")
    with pytest.raises(AssetMissingError, match="model.qformer_text_model"):
        Blip2Qformer.from_config(cfg)


def test_pretrained_urls_are_not_downloaded_behind_the_users_back(lavis_ready, monkeypatch):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    monkeypatch.delenv("BLIP2_INTERNLM_ALLOW_DOWNLOADS", raising=False)
    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.load_pretrained = True
    cfg.pretrained = "https://example.invalid/blip2_pretrained.pth"
    with pytest.raises(AssetMissingError, match="model.pretrained.*downloads are disabled"):
        Blip2Qformer.from_config(cfg)


def test_load_pretrained_false_really_skips_loading(lavis_ready):
    # LAVIS 1.0.2 ignores it and downloads blip2_pretrained.pth for stage 1 "from scratch"
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.pretrained = "https://example.invalid/never-fetched.pth"
    assert Blip2Qformer.from_config(cfg) is not None


def batch(image_ids=None, size=4):
    torch.manual_seed(1)
    samples = {
        "image": torch.randn(size, 3, 64, 64),
        "text_input": ["a red circle on the left", "a blue square", "左边有一个红色的圆形", "x"][:size],
    }
    if image_ids is not None:
        samples["image_id"] = image_ids
    return samples


def test_every_trainable_parameter_gets_a_gradient(fresh_tiny_stage1_model):
    # an unused parameter (LAVIS's split-off LM-head bias) makes DDP fail at the second step
    model = fresh_tiny_stage1_model
    model(batch(["a", "b", "c", "d"])).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    head = model.Qformer.cls.predictions
    assert head.bias is head.decoder.bias


def test_lm_head_bias_starts_at_zero(fresh_tiny_stage1_model):
    assert torch.count_nonzero(fresh_tiny_stage1_model.Qformer.cls.predictions.bias) == 0


def test_string_image_ids_are_accepted_and_distinct_ids_match_lavis_diagonal_targets(fresh_tiny_stage1_model):
    model = fresh_tiny_stage1_model.eval()
    with torch.no_grad():  # a freshly initialised Q-Former barely looks at its inputs; make it
        for param in model.Qformer.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    without_ids = model(batch()).loss_itc
    with_distinct_ids = model(batch(["coco_1", "coco_2", "vg_3", "shapes_train_00001"])).loss_itc
    with_shared_id = model(batch(["coco_1", "coco_2", "coco_1", "vg_3"])).loss_itc
    assert torch.allclose(without_ids, with_distinct_ids)
    assert not torch.allclose(with_distinct_ids, with_shared_id)


def test_the_image_id_aware_loss_is_the_stage1_class_s_own_forward_and_lavis_s_is_untouched(
    fresh_tiny_stage1_model,
):
    from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm.models.blip2_stage1 import Blip2Stage1, Blip2Stage1ITM

    assert type(fresh_tiny_stage1_model) is Blip2Stage1  # what Blip2Qformer.from_pretrained builds
    assert "forward" in vars(Blip2Stage1)
    assert Blip2Qformer.forward.__module__ == "lavis.models.blip2_models.blip2_qformer"  # LAVIS 1.0.2's own
    assert Blip2Stage1ITM.forward is Blip2ITM.forward  # image-text matching scores, not the loss


def test_the_image_text_matching_model_scores_pairs_with_lavis_s_itm_and_itc_heads(lavis_ready):
    from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm.models.blip2_stage1 import Blip2Stage1ITM

    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    model = Blip2ITM.from_config(cfg).eval()
    assert type(model) is Blip2Stage1ITM
    # LAVIS's ITM forward tokenizes without padding: the captions of one call have one length
    samples = {"image": torch.randn(2, 3, 64, 64), "text_input": ["a red circle on the left"] * 2}
    with torch.no_grad():
        assert model(samples, match_head="itm").shape == (2, 2)
        assert model(samples, match_head="itc").shape == (2, 1)


def test_contrastive_targets_spread_mass_over_all_captions_of_an_image():
    from blip2_internlm.models.blip2_stage1 import contrastive_targets, same_image_mask

    same = same_image_mask({"image_id": ["a", "b", "a"]}, 3, "cpu")
    assert same.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    targets = contrastive_targets(same, smoothing=0.1)
    assert torch.allclose(targets[0], torch.tensor([0.45 + 0.1 / 3, 0.1 / 3, 0.45 + 0.1 / 3]))
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_qformer_generates_with_beam_search_and_sampling(tiny_stage1_model):
    model = tiny_stage1_model.eval()
    images = {"image": torch.randn(2, 3, 64, 64)}
    assert len(model.generate(images, num_beams=3, max_length=8, min_length=2)) == 2
    assert len(model.generate(images, use_nucleus_sampling=True, max_length=8, min_length=2)) == 2


def test_qformer_captions_join_chinese_characters_without_spaces(lavis_ready, monkeypatch):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.qformer_text_model = "tiny-zh"
    model = Blip2Qformer.from_config(cfg).eval()
    caption = "左边有一个红色的圆形，中间有 2 个 blue 三角形"
    ids = model.tokenizer([caption], return_tensors="pt").input_ids
    ids[:, 0] = model.tokenizer.bos_token_id  # what generation starts from
    monkeypatch.setattr(model.Qformer, "generate", lambda **kwargs: ids)
    samples = {"image": torch.randn(1, 3, 64, 64)}
    assert Blip2Qformer.generate.__wrapped__(model, samples) == [
        "左 边 有 一 个 红 色 的 圆 形 ， 中 间 有 2 个 blue 三 角 形"
    ]
    assert model.generate(samples) == [caption]  # spaces next to digits and Latin words stay


def test_vit_gradient_checkpointing_runs_without_torch_s_use_reentrant_warning(lavis_ready):
    import warnings

    import torch.utils.checkpoint

    from blip2_internlm.models.vision import eva_vit

    vit = eva_vit("tiny", 32, use_checkpoint=True).train()
    image = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit(image).sum().backward()
    assert not [w for w in caught if "use_reentrant" in str(w.message)]
    assert all(p.grad is not None for p in vit.blocks.parameters())
    # what LAVIS's call did before the fix
    with pytest.warns(UserWarning, match="use_reentrant"):
        torch.utils.checkpoint.checkpoint(vit.blocks[0], vit.patch_embed(image), None)
