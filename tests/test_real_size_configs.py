"""The real-size project configs (configs/blip2_internlm, configs/blip2_opt) and their run scripts.

Every config is merged with its model type's defaults as LAVIS's ``Config`` does and built on the
``meta`` device (blip2_internlm.factory, weights="meta": no weights, no files), then checked against the published
architecture sizes; the expected trainable parameter count is computed here from those sizes.
"""

import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from spec_helpers import REPO

CONFIGS = sorted((REPO / "configs" / "blip2_internlm").glob("*.yaml")) + sorted(
    (REPO / "configs" / "blip2_opt").glob("*.yaml")
)
LAUNCHER = REPO / "run_scripts" / "torchrun.sh"
SCRIPTS = sorted(path for path in (REPO / "run_scripts").rglob("*.sh") if path != LAUNCHER)
CONFIG_IDS = [f"{path.parent.name}/{path.name}" for path in CONFIGS]

# Published sizes, written independently of the code under test.
VIT_G = dict(depth=39, width=1408, mlp=6144)  # EVA ViT-g/14: mlp_ratio 4.3637 -> 6144
BERT = dict(hidden=768, layers=12, intermediate=3072, vocab=30522, positions=512)
BERT_CHINESE_VOCAB = 21128  # bert-base-chinese's vocab.txt; otherwise the same architecture
LLMS = {  # llm_model -> (layers, hidden)
    "internlm/internlm2-1_8b": (24, 2048),
    "internlm/internlm2-chat-1_8b": (24, 2048),
    "internlm/internlm2-7b": (32, 4096),
    "facebook/opt-2.7b": (32, 2560),
}
PATH_ENV = (
    "DATA_ROOT",
    "COCO_ROOT",
    "VG_ROOT",
    "VQAV2_ROOT",
    "OKVQA_ROOT",
    "GQA_ROOT",
    "EVA_VIT_G",
    "BERT_BASE_UNCASED",
    "BERT_BASE_CHINESE",
    "INTERNLM2_1_8B",
    "INTERNLM2_7B",
    "INTERNLM2_CHAT_1_8B",
    "LLAVA_ROOT",
    "OPT_2_7B",
    "STAGE1_CHECKPOINT",
    "STAGE2_CHECKPOINT",
    "STAGE2_OPT_CHECKPOINT",
    "CAPTION_CHECKPOINT",
    "CAPTION_OPT_CHECKPOINT",
)


@pytest.fixture(autouse=True)
def _default_paths(monkeypatch):
    """The configs' defaults, whatever the machine's environment says."""
    for name in PATH_ENV:
        monkeypatch.delenv(name, raising=False)


def lavis_config(path, options=()):
    from types import SimpleNamespace

    from lavis.common.config import Config

    return Config(SimpleNamespace(cfg_path=str(path), options=list(options) or None)).config


def linear(n_in, n_out):
    return n_in * n_out + n_out


def layernorm(width):
    return 2 * width


def qformer_layer(h, inter, vision, cross, text_path):
    n = 4 * linear(h, h) + layernorm(h)  # q, k, v, output dense + LayerNorm
    if cross:
        n += linear(h, h) + 2 * linear(vision, h) + linear(h, h) + layernorm(h)
    ffn = linear(h, inter) + linear(inter, h) + layernorm(h)
    return n + ffn * (2 if text_path else 1)  # query FFN (+ text FFN)


# InternLM2-1.8B's published shapes (config.json): 16 heads of 128, 8 key/value heads, MLP 8192
INTERNLM2_1_8B = dict(heads=16, kv_heads=8, head_dim=128, intermediate=8192)


def lora_numel(r, layers, hidden, heads, kv_heads, head_dim, intermediate):
    """Adapters on wqkv, wo, w1, w2, w3: r x (in + out) each, per layer."""
    shapes = [(hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden)]
    shapes += [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return layers * sum(r * (n_in + n_out) for n_in, n_out in shapes)


def expected_trainable(stage, llm_hidden=None, queries=32, text_vocab=BERT["vocab"]):
    h, inter, vocab = BERT["hidden"], BERT["intermediate"], text_vocab + 1  # + [DEC]
    cross = [i % 2 == 0 for i in range(BERT["layers"])]
    ln_vision = layernorm(VIT_G["width"])
    query_tokens = queries * h
    if stage == "stage2":  # Q-Former query path only: no word/position embeddings, no text FFN, no LM head
        qformer = layernorm(h) + sum(qformer_layer(h, inter, VIT_G["width"], c, False) for c in cross)
        return qformer + query_tokens + linear(h, llm_hidden) + ln_vision
    embeddings = vocab * h + BERT["positions"] * h + layernorm(h)
    layers = sum(qformer_layer(h, inter, VIT_G["width"], c, True) for c in cross)
    if stage == "instruct":  # the instruction path too (embeddings, text FFN), no LM head
        return embeddings + layers + query_tokens + linear(h, llm_hidden) + ln_vision
    lm_head = linear(h, h) + layernorm(h) + vocab  # transform + bias; decoder weight tied to word embeddings
    heads = 2 * linear(h, 256) + linear(h, 2) + 1  # vision_proj, text_proj, itm_head, temp
    return embeddings + layers + lm_head + heads + query_tokens + ln_vision


@pytest.fixture(scope="module")
def built(lavis_ready):
    """(config, meta model) per config file, built once."""
    from blip2_internlm.factory import build_model

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = (lavis_config(path), build_model(cfg_path=path, weights="meta", is_eval=False))
        return cache[path]

    return get


def test_the_config_set_is_complete():
    names = {f"{p.parent.name}/{p.stem}" for p in CONFIGS}
    for llm, directory in (("internlm2_1.8b", "blip2_internlm"), ("opt2.7b", "blip2_opt")):
        for kind in ("caption_coco_ft", "caption_coco_eval"):
            assert f"{directory}/{kind}_{llm}" in names
        for task in ("vqav2", "okvqa", "gqa"):
            assert f"{directory}/{task}_zeroshot_{llm}_eval" in names
        assert f"{directory}/pretrain_stage2_{llm}" in names
    assert {"blip2_internlm/pretrain_stage1", "blip2_internlm/pretrain_stage2_internlm2_7b"} <= names
    assert {
        "blip2_internlm/instruct_llava_internlm2_1.8b",
        "blip2_internlm/instruct_llava_internlm2_chat_1.8b",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_real_size_model_on_meta(built, path):
    import torch

    cfg, model = built(path)
    assert all(p.device == torch.device("meta") for p in model.parameters())
    vit = model.visual_encoder
    assert len(vit.blocks) == VIT_G["depth"] and vit.num_features == VIT_G["width"]
    assert vit.blocks[0].mlp.fc1.out_features == VIT_G["mlp"]
    assert not any(p.requires_grad for p in vit.parameters()), "the ViT is frozen in every project config"
    # LAVIS's convert_weights_to_fp16: Linear/Conv weights fp16, LayerNorms and embeddings fp32
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.float16 and vit.blocks[0].norm1.weight.dtype == torch.float32
    qformer = model.Qformer.config
    assert (qformer.num_hidden_layers, qformer.hidden_size) == (BERT["layers"], BERT["hidden"])
    assert model.query_tokens.shape[1] == 32
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.model.arch == "blip2":
        assert cfg.model.model_type == "pretrain" and not cfg.model.load_pretrained
        chinese = "chinese" in str(cfg.model.qformer_text_model)
        assert trainable == expected_trainable("stage1", text_vocab=BERT_CHINESE_VOCAB if chinese else BERT["vocab"])
        return
    layers, hidden = LLMS[cfg.model.llm_model]
    llm = model.llm_model.config
    assert (llm.num_hidden_layers, llm.hidden_size) == (layers, hidden)
    llm_trainable = {name for name, p in model.llm_model.named_parameters() if p.requires_grad}
    if cfg.model.arch == "blip2_internlm_instruct":
        assert llm_trainable and all(".lora_A." in name or ".lora_B." in name for name in llm_trainable)
        adapters = lora_numel(cfg.model.llm_lora.r, layers, hidden, **INTERNLM2_1_8B)
        assert trainable == expected_trainable("instruct", hidden) + adapters
        return
    assert not llm_trainable
    assert trainable == expected_trainable("stage2", hidden)


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_IDS)
def test_datasets_tasks_and_run_settings(lavis_ready, path):
    import lavis.tasks  # noqa: F401  (registers the tasks)
    from lavis.common.registry import registry

    cfg = lavis_config(path)
    for name in cfg.datasets:
        assert registry.get_builder_class(name) is not None, f"{name} is not a registered LAVIS builder"
    assert registry.get_task_class(cfg.run.task) is not None, f"{cfg.run.task} is not a registered LAVIS task"
    run = cfg.run
    assert (run.device, run.amp, run.dist_url, run.distributed) == ("cuda", True, "env://", True)
    if run.evaluate:
        assert run.get("num_beams") == 5 and run.get("test_splits")
        if run.task in ("vqa", "gqa"):
            assert run.inference_method == "generate" and run.prompt == "Question: {} Short answer:"
    else:
        assert run.lr_sched == "linear_warmup_cosine_lr" and run.train_splits == ["train"]
        expected_batch = {
            "image_text_pretrain": {"blip2": 60, "blip2_internlm_instruct": 8}.get(cfg.model.arch, 32),
            "captioning": 16,
            "captioning_offline": 16,
        }[run.task]
        assert run.batch_size_train == expected_batch
    if cfg.model.arch != "blip2":
        # every checkpoint is an env var; none is a URL (the offline loader would refuse it anyway)
        key = "finetuned" if cfg.model.load_finetuned else "pretrained"
        assert cfg.model[key] is None
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(OmegaConf.load(path).model, resolve=False)
        assert raw[key].startswith("${oc.env:") and raw[key].endswith(",null}"), raw[key]


def test_paths_follow_environment_variables_and_options(lavis_ready, monkeypatch):
    from omegaconf import OmegaConf

    path = REPO / "configs" / "blip2_internlm" / "pretrain_stage2_internlm2_1.8b.yaml"
    cfg = OmegaConf.to_container(lavis_config(path), resolve=True)
    coco = cfg["datasets"]["coco_caption"]["build_info"]
    assert coco["images"]["storage"] == "./coco/images/"  # LAVIS's layout under its cache_root
    assert cfg["model"]["vit_weights"] == "eva_vit_g.pth" and cfg["model"]["qformer_text_model"] == "bert-base-uncased"
    monkeypatch.setenv("DATA_ROOT", "/data")
    monkeypatch.setenv("VG_ROOT", "/vg")
    monkeypatch.setenv("EVA_VIT_G", "/w/eva_vit_g.pth")
    monkeypatch.setenv("INTERNLM2_1_8B", "/w/internlm2-1_8b")
    monkeypatch.setenv("STAGE1_CHECKPOINT", "/ckpt/stage1.pth")
    cfg = OmegaConf.to_container(
        lavis_config(path, ["datasets.coco_caption.build_info.images.storage=/fast/coco/"]), resolve=True
    )
    build = cfg["datasets"]["coco_caption"]["build_info"]
    assert build["annotations"]["train"]["storage"] == "/data/coco/annotations/coco_karpathy_train.json"
    assert build["images"]["storage"] == "/fast/coco/"
    assert cfg["datasets"]["vg_caption"]["build_info"]["images"]["storage"] == "/vg/images/"
    assert cfg["model"]["vit_weights"] == "/w/eva_vit_g.pth" and cfg["model"]["llm_model"] == "/w/internlm2-1_8b"
    assert cfg["model"]["pretrained"] == "/ckpt/stage1.pth"
    # VQAv2 annotations default to the COCO root (LAVIS's layout) unless VQAV2_ROOT says otherwise
    vqa = OmegaConf.to_container(
        lavis_config(REPO / "configs/blip2_opt/vqav2_zeroshot_opt2.7b_eval.yaml"), resolve=True
    )
    assert (
        vqa["datasets"]["coco_vqa"]["build_info"]["annotations"]["val"]["storage"][0]
        == "/data/coco/annotations/vqa_val_eval.json"
    )


def test_meta_build_sizes_the_llm_from_a_local_config_json(lavis_ready, tmp_path):
    from transformers import OPTConfig

    from blip2_internlm.models.architectures import llm_config

    OPTConfig(
        hidden_size=96, num_hidden_layers=3, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=96
    ).save_pretrained(tmp_path)
    assert llm_config(str(tmp_path)).num_hidden_layers == 3
    assert llm_config("/no/such/dir/internlm2-7b").hidden_size == 4096  # a path's name picks the preset
    with pytest.raises(ValueError, match="cannot size it"):
        llm_config("some/unknown-llm")


def launched(script, *args, gpus="2"):
    """The torchrun command line a run script executes, with python replaced by an echo."""
    fake = Path(tempfile.mkdtemp()) / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPUS": gpus}
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, check=True).stdout.splitlines()


def test_every_config_has_a_run_script_that_launches_its_entry_point():
    assert SCRIPTS, "no run scripts"
    referenced = set()
    for script in SCRIPTS:
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
        out = launched(script)
        config = Path(out[out.index("--cfg-path") + 1])
        assert config.is_file() and config.parent.parent == REPO / "configs", (script, config)
        referenced.add(config)
        entry = "evaluate" if "evaluate: True" in config.read_text() else "train"
        assert out[:2] == ["-m", "torch.distributed.run"] and f"blip2_internlm.{entry}" in out, (script, out)
    assert referenced == set(CONFIGS), set(CONFIGS) - referenced


def test_the_launcher_refuses_a_missing_config_naming_it():
    result = subprocess.run([str(LAUNCHER), "no/such.yaml"], capture_output=True, text=True)
    assert result.returncode == 2 and "no/such.yaml" in result.stderr


def test_run_script_passes_options_through():
    script = REPO / "run_scripts" / "blip2_internlm" / "pretrain_stage2_internlm2_1.8b.sh"
    out = launched(script, "--options", "run.batch_size_train=16", "a b", gpus="1")
    assert out[:2] == ["-m", "torch.distributed.run"] and "--nproc_per_node=1" in out
    assert out[-3:] == ["--options", "run.batch_size_train=16", "a b"]
    assert str(REPO / "configs/blip2_internlm/pretrain_stage2_internlm2_1.8b.yaml") in out


def test_every_environment_variable_is_documented():
    names = set()
    for path in CONFIGS + sorted((REPO / "blip2_internlm" / "configs" / "models").glob("*.yaml")):
        names |= set(re.findall(r"oc\.env:(\w+)", path.read_text()))
    doc = (REPO / "docs" / "plan.md").read_text()
    section = doc.split("## Real-size configs", 1)[1].split("\n## ", 1)[0]
    assert {
        "DATA_ROOT",
        "COCO_ROOT",
        "VG_ROOT",
        "EVA_VIT_G",
        "BERT_BASE_UNCASED",
        "BERT_BASE_CHINESE",
        "INTERNLM2_1_8B",
        "INTERNLM2_7B",
        "OPT_2_7B",
        "STAGE1_CHECKPOINT",
        "STAGE2_CHECKPOINT",
    } <= names
    assert not {name for name in names if f"`{name}`" not in section}
