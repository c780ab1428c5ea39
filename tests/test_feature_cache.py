"""The frozen-ViT feature cache (run.feature_cache): training and inference from the store
give what the images give; a store is reused only for the setup that built it; a crashed
build is rebuilt; ranks write one shard each and all read every image.

Tolerances: an fp32 store holds the ViT's fp32 output bit for bit, but the ViT runs on
batches of a different size when building, and CPU matmul blocking may differ in the last
bits by batch size, hence 1e-6 absolute on losses and gradients; an fp16 store rounds each
feature to 11 significant bits, 2e-3 relative on the loss."""

import json
import logging
import shutil

import pytest
import torch
from conftest import SMALL_SHAPES, torchrun
from spec_helpers import REPO

# the ViT on batches of other sizes (module docstring): features 1e-6 apart, and tokens from them equal
# while the tiny model's decisions are made by larger gaps
pytestmark = pytest.mark.kernel_sensitive

GENERATOR = SMALL_SHAPES


@pytest.fixture(scope="module")
def model(tiny_eval_model):
    return tiny_eval_model


@pytest.fixture(scope="module")
def data_root(small_shapes_root):
    return small_shapes_root


def caption_train(root, processor=None, split="train"):
    """The shapes caption dataset of ``split`` (train records, or val/test evaluation records)."""
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

    from blip2_internlm.datasets.builders import ShapesCaptionDataset, ShapesCaptionEvalDataset

    cls = ShapesCaptionDataset if split == "train" else ShapesCaptionEvalDataset
    files = [f"{root}/annotations/caption_zh_{split}.json", f"{root}/annotations/caption_zh_{split}_gt.json"]
    return cls(processor or BlipImageEvalProcessor(64), BlipCaptionProcessor(), root, files)


def vit_calls(model):
    """A list that grows by one per ViT forward."""
    calls = []
    model.visual_encoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def batches(cached, plain, indices):
    return cached.collater([cached[i] for i in indices]), plain.collater([plain[i] for i in indices])


def test_training_loss_from_the_cache_equals_the_loss_from_images(model, data_root, tmp_path):
    from blip2_internlm.feature_cache import CachedFeatures, FeatureStore

    dataset = caption_train(data_root)
    exact = CachedFeatures(dataset, FeatureStore.build(model, dataset, tmp_path / "fp32", dtype="fp32", batch_size=5))
    rounded = CachedFeatures(dataset, FeatureStore.build(model, dataset, tmp_path / "fp16", dtype="fp16", batch_size=5))
    cached, from_images = batches(exact, dataset, [0, 3, 7, 11])
    assert "image" not in cached and cached["vit_embeds"].shape[0] == 4
    assert cached["text_input"] == from_images["text_input"] and cached["image_id"] == from_images["image_id"]
    with torch.no_grad():
        reference = model(from_images)["loss"]
        assert torch.allclose(model(cached)["loss"], reference, rtol=0, atol=1e-6)
        fp16_loss = model(batches(rounded, dataset, [0, 3, 7, 11])[0])["loss"]
    assert torch.allclose(fp16_loss, reference, rtol=2e-3, atol=0)


def test_one_training_step_gives_the_same_gradients_on_qformer_queries_projection_and_ln_vision(
    model, data_root, tmp_path
):
    from blip2_internlm.feature_cache import CachedFeatures, FeatureStore

    dataset = caption_train(data_root)
    cached, from_images = batches(
        CachedFeatures(dataset, FeatureStore.build(model, dataset, tmp_path, dtype="fp32")), dataset, [1, 2, 5]
    )

    def gradients(samples):
        model.zero_grad()
        model(samples)["loss"].backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    expected, got = gradients(from_images), gradients(cached)
    model.zero_grad()
    assert {name.split(".")[0] for name in expected} == {"Qformer", "query_tokens", "llm_proj", "ln_vision"}
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-6), name


def test_view_k_is_the_frozen_vit_on_the_crop_seeded_for_image_and_view_and_training_draws_views(
    model, data_root, tmp_path
):
    from lavis.processors.blip_processors import BlipImageTrainProcessor

    from blip2_internlm.feature_cache import CachedFeatures, FeatureStore, seeded, view_seed, vit_features

    dataset = caption_train(data_root, BlipImageTrainProcessor(64, min_scale=0.5))
    store = FeatureStore.build(model, dataset, tmp_path, views=2, dtype="fp32", seed=7, batch_size=3)
    for image in (0, 5):
        for view in (0, 1):
            with seeded(view_seed(7, image, view)):
                crop = dataset[image]["image"]
            on_the_fly = vit_features(model, crop[None])[0]
            assert torch.allclose(store.features(image, view), on_the_fly, rtol=0, atol=1e-6)
        assert not torch.equal(store.features(image, 0), store.features(image, 1))  # two different crops

    cached = CachedFeatures(dataset, store, train=True)

    def views_drawn(epoch_seed):
        torch.manual_seed(epoch_seed)  # what the runner does before each epoch
        drawn = [cached[i]["vit_embeds"] for i in range(len(cached))]
        return [next(v for v in (0, 1) if torch.equal(row, store.features(i, v))) for i, row in enumerate(drawn)]

    assert views_drawn(1) == views_drawn(1)  # reproducible per epoch seed ...
    assert views_drawn(1) != views_drawn(2) and set(views_drawn(1)) == {0, 1}  # ... and epochs differ
    assert {tuple(CachedFeatures(dataset, store, train=False)[3]["vit_embeds"].shape)} == {tuple(store.header["shape"])}


def test_an_unchanged_setup_reuses_the_store_and_any_change_rebuilds_it_saying_why(model, data_root, tmp_path, caplog):
    from lavis.models import load_model_and_preprocess
    from lavis.processors.blip_processors import BlipImageEvalProcessor
    from omegaconf import OmegaConf
    from torchvision import transforms

    from blip2_internlm.feature_cache import FeatureStore
    from blip2_internlm.models.blip2_internlm import Blip2InternLM

    caplog.set_level(logging.INFO, logger="blip2_internlm.feature_cache")
    store = tmp_path / "store"
    dataset = caption_train(data_root)
    FeatureStore.build(model, dataset, store, dtype="fp32")
    calls = vit_calls(model)

    def rebuilt(field, *args, **kwargs):
        """Whether the build recomputed the store, logging ``field`` among the changes."""
        caplog.clear()
        before = len(calls)
        FeatureStore.build(*args, **kwargs)
        logged = " ".join(r.getMessage() for r in caplog.records)
        changed = logged.split("changed: ")[-1].rstrip(")").split(", ") if "changed: " in logged else []
        return (len(calls) > before or "building" in logged) and field in changed

    FeatureStore.build(model, dataset, store, dtype="fp32")
    assert len(calls) == 0 and "reusing" in caplog.text  # no ViT forward

    # another preprocessing (same size, other interpolation)
    other = BlipImageEvalProcessor(64)
    other.transform.transforms[0] = transforms.Resize((64, 64), interpolation=transforms.InterpolationMode.BILINEAR)
    assert rebuilt("processor", model, caption_train(data_root, other), store, dtype="fp32")
    # another dataset (the val records)
    assert rebuilt("dataset", model, caption_train(data_root, split="val"), store, dtype="fp32")
    # other storage dtype
    assert rebuilt("dtype", model, caption_train(data_root, split="val"), store, dtype="fp16")
    # other ViT weights
    torch.manual_seed(1)
    changed = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]
    with torch.no_grad():
        changed.visual_encoder.blocks[0].mlp.fc1.weight.mul_(1.01)
    assert rebuilt("vit", changed, dataset, store, dtype="fp32")
    # another image size (its model and processor)
    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.image_size = 32
    small = Blip2InternLM.from_config(cfg).eval()
    assert rebuilt("image_shape", small, caption_train(data_root, BlipImageEvalProcessor(32)), store, dtype="fp32")
    # and back: the 64 px setup rebuilds again, never silently reusing the 32 px features
    assert rebuilt("image_shape", model, dataset, store, dtype="fp32")


def test_auto_autocast_resolving_otherwise_on_another_cpu_rebuilds_the_store(
    model, data_root, tmp_path, caplog, monkeypatch
):
    from blip2_internlm import hardware
    from blip2_internlm.feature_cache import FeatureStore

    caplog.set_level(logging.INFO, logger="blip2_internlm.feature_cache")
    store, dataset = tmp_path / "store", caption_train(data_root)
    monkeypatch.setattr(model, "autocast_dtype", "auto")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)  # auto: no autocast
    FeatureStore.build(model, dataset, store, dtype="fp32")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)  # the same setting, bf16 here
    caplog.clear()
    FeatureStore.build(model, dataset, store, dtype="fp32")
    assert "changed: autocast" in caplog.text


def test_features_from_the_other_fp32_linear_kernel_are_not_reused(model, data_root, tmp_path, caplog, monkeypatch):
    """The kernel sets the features' last bits: a store built under the other one is rebuilt, not reused."""
    import dataclasses

    from blip2_internlm.feature_cache import FeatureStore, vit_features

    caplog.set_level(logging.INFO, logger="blip2_internlm.feature_cache")
    store, dataset = tmp_path / "store", caption_train(data_root)
    monkeypatch.setattr(model, "model_config", dataclasses.replace(model.model_config, cpu_fp32_linear="onednn"))
    FeatureStore.build(model, dataset, store, dtype="fp32")
    monkeypatch.setattr(model, "model_config", dataclasses.replace(model.model_config, cpu_fp32_linear="torch"))
    caplog.clear()
    rebuilt = FeatureStore.build(model, dataset, store, dtype="fp32")
    assert "changed: cpu_fp32_linear" in caplog.text
    assert torch.allclose(rebuilt.features(3), vit_features(model, dataset[3]["image"][None])[0], atol=1e-6)


def test_a_half_written_or_truncated_store_is_rebuilt(model, data_root, tmp_path, caplog):
    from blip2_internlm.feature_cache import CachedFeatures, FeatureStore, vit_features

    caplog.set_level(logging.INFO, logger="blip2_internlm.feature_cache")
    dataset, store = caption_train(data_root), tmp_path / "store"
    FeatureStore.build(model, dataset, store, dtype="fp32")
    (shard,) = store.glob("shard-*.npy")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # crash while the shard was copied
    caplog.clear()
    rebuilt = FeatureStore.build(model, dataset, store, dtype="fp32")
    assert "truncated" in caplog.text and "building" in caplog.text
    assert torch.allclose(rebuilt.features(4), vit_features(model, dataset[4]["image"][None])[0], atol=1e-6)

    # a crash before the header (the completion marker): only the .partial directory is left
    shutil.move(store, tmp_path / "store.partial")
    (tmp_path / "store.partial" / "header.json").unlink()
    caplog.clear()
    FeatureStore.build(model, dataset, store, dtype="fp32")
    assert "no store" in caplog.text and not (tmp_path / "store.partial").exists()
    assert len(CachedFeatures(dataset, FeatureStore.open(store))) == len(dataset)


def test_caption_generation_and_vqa_answers_from_the_cache_equal_those_from_images(model, data_root, tmp_path):
    from lavis.processors.blip_processors import BlipImageEvalProcessor, BlipQuestionProcessor

    from blip2_internlm.datasets.builders import ShapesVQAEvalDataset
    from blip2_internlm.feature_cache import CachedFeatures, FeatureStore

    captions = caption_train(data_root, split="val")
    cached, from_images = batches(
        CachedFeatures(captions, FeatureStore.build(model, captions, tmp_path / "c", dtype="fp32")), captions, range(4)
    )
    assert model.generate(cached, num_beams=2, max_length=8) == model.generate(from_images, num_beams=2, max_length=8)

    names = ["vqa_zh_test.json", "answer_list_zh.json", "vqa_zh_test_questions.json", "vqa_zh_test_annotations.json"]
    vqa = ShapesVQAEvalDataset(
        BlipImageEvalProcessor(64), BlipQuestionProcessor(), data_root, [f"{data_root}/annotations/{n}" for n in names]
    )
    store = FeatureStore.build(model, vqa, tmp_path / "v", dtype="fp32")
    assert store.num_images == 4 and len(vqa) > 4  # several questions per image, one cached image each
    wrapped = CachedFeatures(vqa, store)
    assert wrapped.answer_list == vqa.answer_list  # what VQATask reads from the dataset
    cached, from_images = batches(wrapped, vqa, range(6))
    assert torch.equal(cached["question_id"], from_images["question_id"])
    kwargs = {"num_beams": 2, "max_len": 5, "prompt": "问题：{} 简短回答："}
    assert model.predict_answers(cached, **kwargs) == model.predict_answers(from_images, **kwargs)


def test_a_trainable_vit_is_refused(lavis_ready, data_root, tmp_path):
    from lavis.models import load_model_and_preprocess

    from blip2_internlm.feature_cache import FeatureCacheError, FeatureStore

    trainable = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]
    trainable.visual_encoder.blocks[0].mlp.fc1.weight.requires_grad = True
    with pytest.raises(FeatureCacheError, match="freeze_vit"):
        FeatureStore.build(trainable, caption_train(data_root), tmp_path)


RANK_SCRIPT = """
import os, sys
from blip2_internlm.train import main
main(sys.argv[1:])
from blip2_internlm.feature_cache import FeatureStore
store = FeatureStore.open(os.environ["STORE"])
rows = [store.features(i) for i in range(store.num_images)]
# LAVIS silences print() on ranks other than 0
sys.stdout.write(f"rank {os.environ['RANK']} read {len(rows)} images of {len(store.shards)} shards\\n")
"""


def test_two_ranks_each_write_one_shard_and_both_train_from_every_image(model, data_root, tmp_path, monkeypatch):
    from blip2_internlm.feature_cache import FeatureStore, vit_features

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cache, output = tmp_path / "features", tmp_path / "out"
    monkeypatch.setenv("STORE", str(cache / "shapes_caption" / "train"))
    result = torchrun(
        str(script),
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage2.yaml"),
        "--options",
        "model.load_pretrained=False",
        f"run.output_dir={output}",
        "run.max_epoch=1",
        "run.batch_size_train=4",
        *(f"datasets.shapes_caption.generator.{key}={value}" for key, value in GENERATOR.items()),
        "run.feature_cache.enabled=True",
        f"run.feature_cache.dir={cache}",
        "run.feature_cache.dtype=fp32",
        timeout=120,
    )
    header = json.loads((cache / "shapes_caption" / "train" / "header.json").read_text())
    assert header["world_size"] == 2 and [s["rows"] for s in header["shards"]] == [6, 6]
    assert sorted(p.name for p in (cache / "shapes_caption" / "train").iterdir()) == [
        "header.json",
        "shard-00000-of-00002.npy",
        "shard-00001-of-00002.npy",
    ]
    assert not (cache / "shapes_caption" / "val").exists()  # the run reads no val split
    for rank in (0, 1):
        assert f"rank {rank} read 12 images of 2 shards" in result.stdout
    (job,) = output.iterdir()
    stats = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train_')]
    assert len(stats) == 1 and float(stats[0]["train_loss"]) > 0

    # the shards hold image i at rank i % 2, and this process reuses the store as it is
    dataset = caption_train(data_root)
    calls = vit_calls(model)
    store = FeatureStore.build(model, dataset, cache / "shapes_caption" / "train", dtype="fp32")
    assert len(calls) == 0
    for image in range(store.num_images):
        assert torch.allclose(store.features(image), vit_features(model, dataset[image]["image"][None])[0], atol=1e-6)
