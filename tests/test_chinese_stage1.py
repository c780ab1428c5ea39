"""Stage 1 with a Chinese Q-Former text model: the bert-base-chinese-style ``tiny-zh`` asset
tokenizes the shapes data without [UNK], [DEC] gets a new, initialised embedding row while every
other row is the checkpoint's, stage 1 trains on Chinese captions and generates them without
spaces between characters, and the 2-rank tiny config writes a checkpoint."""

import json
import math
import re
import shutil

import pytest
import torch
from conftest import torchrun
from omegaconf import OmegaConf
from spec_helpers import REPO

from blip2_internlm import assets
from blip2_internlm.tiny.bert import tiny_zh_vocab

SHAPES_CAPTION_ZH = re.compile("(左边|中间|右边)有一个(红|绿|蓝|黄)色的(圆形|正方形|三角形)")


def stage1_model(text_model="tiny-zh", seed=0):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    cfg = OmegaConf.load(Blip2Qformer.default_config_path("tiny")).model
    cfg.qformer_text_model = text_model
    torch.manual_seed(seed)
    return Blip2Qformer.from_config(cfg)


@pytest.fixture(scope="module")
def zh_model(lavis_ready):
    return stage1_model()


@pytest.fixture(scope="module")
def checkpoint():
    from safetensors.torch import load_file

    return load_file(assets.resolve_text_model("tiny-zh") / "model.safetensors")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """Every colour, up to three objects per image: all the caption and question forms."""
    from blip2_internlm.datasets import shapes

    root = tmp_path_factory.mktemp("shapes")
    shapes.generate_shapes(root, splits={"train": 24, "val": 8}, max_objects=3, colors=tuple(shapes.PALETTE))
    return root


def shapes_texts(root, lang):
    texts = []
    for path in sorted((root / "annotations").glob(f"*_{lang}_*.json")):
        records = json.loads(path.read_text())
        if isinstance(records, list):
            for r in records:
                caption = r.get("caption", r.get("question"))
                texts += caption if isinstance(caption, list) else [caption]
                texts += r.get("answer", [])[:1]
    return texts


def test_tiny_zh_has_bert_base_chinese_layout_and_tokenizer_settings():
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(assets.resolve_text_model("tiny-zh"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert ids == {"[PAD]": 0, "[unused1]": 1, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    assert tokenizer.do_lower_case is False and tokenizer.basic_tokenizer.tokenize_chinese_chars
    vocab = tiny_zh_vocab()
    assert vocab.index("红") < vocab.index("##红")  # single characters, then "##" continuations


def test_the_shapes_data_and_prompts_tokenize_without_unk_one_token_per_character(zh_model, shapes_root):
    from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS

    tokenizer = zh_model.tokenizer
    zh, en = shapes_texts(shapes_root, "zh"), shapes_texts(shapes_root, "en")
    assert any("，" in t for t in zh) and any(" and " in t for t in en)  # multi-object captions are in
    texts = zh + en + list(CAPTION_PROMPTS.values()) + list(VQA_PROMPTS.values())
    unknown = [t for t in texts if tokenizer.unk_token_id in tokenizer(t).input_ids]
    assert unknown == []
    caption = "左边有一个红色的圆形，中间有一个蓝色的三角形"
    assert tokenizer.tokenize(caption) == list(caption)


def test_truncation_counts_tokens_and_keeps_whole_characters(zh_model):
    tokens = zh_model.tokenizer(
        ["左边有一个红色的圆形"], padding="max_length", truncation=True, max_length=6, return_tensors="pt"
    )
    assert tokens.input_ids.shape == (1, 6)
    assert zh_model.tokenizer.decode(tokens.input_ids[0], skip_special_tokens=True).replace(" ", "") == "左边有一"


def test_dec_gets_the_next_id_and_an_initialised_row_while_other_rows_are_the_checkpoints(zh_model, checkpoint):
    tokenizer, qformer = zh_model.tokenizer, zh_model.Qformer
    vocab_size = len(tiny_zh_vocab())
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == vocab_size
    words = qformer.bert.embeddings.word_embeddings.weight
    saved = checkpoint["bert.embeddings.word_embeddings.weight"]
    assert words.shape == (vocab_size + 1, 64)
    assert torch.equal(words[:vocab_size], saved)
    # transformers' mean resizing: the new row is the checkpoint rows' mean, not leftover memory
    assert torch.isfinite(words[vocab_size]).all()
    assert torch.allclose(words[vocab_size], saved.mean(0), atol=1e-4)
    head = qformer.cls.predictions
    assert head.decoder.weight is words  # tied LM head grew with the embeddings
    assert head.bias is head.decoder.bias and head.bias.shape == (vocab_size + 1,)
    assert torch.equal(head.bias[:vocab_size], checkpoint["cls.predictions.bias"]) and head.bias[vocab_size] == 0
    assert torch.equal(head.transform.dense.weight, checkpoint["cls.predictions.transform.dense.weight"])


def test_a_legacy_bert_base_chinese_checkpoint_loads_into_the_qformer(lavis_ready, tmp_path):
    # bert-base-chinese on the hub: pytorch_model.bin of BertForPreTraining, LayerNorm gamma/beta
    from transformers import BertConfig, BertForPreTraining

    source = assets.resolve_text_model("tiny-zh")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    torch.manual_seed(1)
    legacy = BertForPreTraining(BertConfig.from_pretrained(source))
    with torch.no_grad():
        legacy.bert.embeddings.LayerNorm.weight.uniform_(0.5, 1.5)
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
        for k, v in legacy.state_dict().items()
        if k != "cls.predictions.decoder.weight"
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = stage1_model(str(tmp_path))
    embeddings = model.Qformer.bert.embeddings
    assert torch.equal(embeddings.LayerNorm.weight, state["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(embeddings.word_embeddings.weight[:-1], state["bert.embeddings.word_embeddings.weight"])


@pytest.fixture(scope="module")
def zh_batch(tmp_path_factory):
    from lavis.processors.blip_processors import BlipImageEvalProcessor
    from PIL import Image

    from blip2_internlm.datasets import shapes

    root = tmp_path_factory.mktemp("shapes1")
    shapes.generate_shapes(root, splits={"train": 8}, max_objects=1)
    records = json.loads((root / "annotations" / "caption_zh_train.json").read_text())
    process = BlipImageEvalProcessor(image_size=64)
    images = torch.stack([process(Image.open(root / r["image"]).convert("RGB")) for r in records])
    return {
        "image": images,
        "text_input": [r["caption"] for r in records],
        "image_id": [r["image_id"] for r in records],
    }


@pytest.fixture
def one_thread():
    # two threads per process on a shared 2-core machine are several times slower, not faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_stage1_trains_on_chinese_captions_and_generates_them_without_spaces(lavis_ready, zh_batch, one_thread):
    model = stage1_model(seed=0).train()
    first = model(zh_batch)
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(getattr(first, name)), name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(30):
        output = model(zh_batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        captions = model.generate({"image": zh_batch["image"]}, num_beams=1, max_length=24, min_length=4)
    assert len(captions) == 8
    # a caption of the shapes data's form, written as the data writes it
    assert all(SHAPES_CAPTION_ZH.fullmatch(c) for c in captions), captions


def test_two_ranks_run_the_tiny_chinese_stage1_config_and_save_a_checkpoint(tmp_path):
    result = torchrun(
        "-m",
        "blip2_internlm.train",
        "--cfg-path",
        str(REPO / "configs/tiny/pretrain_stage1_zh.yaml"),
        "--options",
        f"run.output_dir={tmp_path}",
        "run.max_epoch=1",
        "datasets.shapes_caption.generator.train=64",
        "datasets.shapes_caption.generator.val=8",
        "datasets.shapes_caption.generator.test=8",
    )
    assert "distributed init (rank 1, world 2, gloo)" in result.stdout + result.stderr
    (job_dir,) = tmp_path.iterdir()
    (epoch,) = [
        json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')
    ]
    assert math.isfinite(float(epoch["train_loss"]))
    saved = torch.load(job_dir / "checkpoint_0.pth", weights_only=True)["model"]
    assert saved["Qformer.bert.embeddings.word_embeddings.weight"].shape[0] == len(tiny_zh_vocab()) + 1


def test_the_planner_sizes_the_tiny_chinese_stage1_like_the_built_model(zh_model):
    from blip2_internlm.factory import build_model

    on_meta = build_model(cfg_path=REPO / "configs" / "tiny" / "pretrain_stage1_zh.yaml", weights="meta")
    assert (
        on_meta.Qformer.bert.embeddings.word_embeddings.weight.shape
        == zh_model.Qformer.bert.embeddings.word_embeddings.weight.shape
    )
    assert sum(p.numel() for p in on_meta.parameters()) == sum(p.numel() for p in zh_model.parameters())
