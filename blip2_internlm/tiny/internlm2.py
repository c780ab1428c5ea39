"""A tiny, deterministic InternLM2 checkpoint directory for tests and examples (the ``tiny`` LLM
before its text pretraining, :mod:`blip2_internlm.tiny.llm`).

``build_tiny_internlm2(out_dir)`` writes what an official checkpoint ships (minus the
remote-code ``.py`` files): ``config.json`` with the official ``auto_map``,
``model.safetensors`` (random weights, same architecture, GQA on), and a
SentencePiece ``tokenizer.model`` trained here with the settings we read for the
official InternLM2 tokenizer (see ``SPM_TRAINER_OPTIONS``), plus
``tokenizer_config.json`` / ``special_tokens_map.json`` shaped like the official ones.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import sentencepiece as spm
import torch

from blip2_internlm.internlm2.configuration import OFFICIAL_AUTO_MAP, InternLM2Config
from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM

TINY_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}

# The official file's chat tokens (ids 92538-92543 there, ids 3-8 here).
CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]

# Our reading of the official tokenizer.model's trainer/normalizer spec: a BPE model
# (the official fast converter refuses anything else), byte fallback, digits split,
# text kept as is (identity normalisation, no dummy "▁" prefix, whitespace not
# collapsed), <unk>/<s>/</s> at 0/1/2 and no pad piece.
SPM_TRAINER_OPTIONS = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "split_by_whitespace": True,
    "character_coverage": 1.0,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
    "max_sentencepiece_length": 16,
}

BUILTIN_CORPUS = [
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "Two dogs are running across a green field under a blue sky.",
    "A man in a red jacket rides a bicycle down a busy city street.",
    "The kitchen has white cabinets, a black stove and a large window.",
    "A group of people stand on the beach watching the sunset.",
    "An airplane is flying over snowy mountains in the morning.",
    "Question: what color is the bus? Answer: the bus is yellow.",
    "Question: how many apples are on the plate? Answer: there are 3 apples.",
    "The train leaves at 10:45 and arrives at 13:20, about 2.5 hours later.",
    "In 2024 the museum had 1,250,000 visitors, up 12% from 2023.",
    "Describe the image in detail. The image shows a small boat on a calm lake.",
    "A little girl holds a balloon while her father takes a picture.",
    "Please write a short caption for this picture of a red car.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):    return a + b  # four spaces of indentation",
    "Tabs\tand  double  spaces   are kept as they are.",
    "一只猫坐在木桌上，旁边放着一杯咖啡。",
    "两只狗在蓝天下的绿色草地上奔跑。",
    "一个穿红色夹克的男人在繁忙的城市街道上骑自行车。",
    "厨房里有白色的橱柜、黑色的炉子和一扇大窗户。",
    "一群人站在海滩上看日落。",
    "一架飞机在早晨飞过雪山。",
    "问题：公共汽车是什么颜色的？回答：公共汽车是黄色的。",
    "问题：盘子里有几个苹果？回答：盘子里有3个苹果。",
    "火车10点45分出发，13点20分到达，大约需要2.5小时。",
    "2024年博物馆接待了1250000名游客，比2023年增长12%。",
    "请详细描述这张图片。图片中有一条小船停在平静的湖面上。",
    "一个小女孩拿着气球，她的父亲在拍照。",
    "请为这张红色汽车的图片写一个简短的描述。",
    "书生浦语是上海人工智能实验室发布的大语言模型。",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "这是一张图片，图片里有一只小狗和一个红色的球。",
    "Hello world! 你好，世界！ Mixed 中文 and English 文本 with 123 numbers.",
    "图像描述：A cat 和 a dog 在沙发上睡觉。",
    "Digits 0 1 2 3 4 5 6 7 8 9 and 数字 ０ 零 一 二 三 四 五 六 七 八 九 十 百 千 万",
]


def train_tokenizer_model(corpus: list[str], vocab_size: int = 800, seed: int = 0) -> bytes:
    """Train the tiny SentencePiece model in memory; returns the serialized ``tokenizer.model``."""
    # The trainer reads one sentence per line; newlines inside texts would start new
    # sentences anyway, and "\n" itself is meant to go to the <0x0A> byte piece.
    sentences = [line for text in corpus for line in text.split("\n") if line.strip()]
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        user_defined_symbols=CHAT_TOKENS,
        num_threads=1,
        minloglevel=2,
        **SPM_TRAINER_OPTIONS,
    )
    return model.getvalue()


def tokenizer_config(added_ids: dict[str, int]) -> dict:
    """tokenizer_config.json in the official layout (auto_map included)."""

    def entry(content):
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): entry(tok) for tok, i in sorted(added_ids.items(), key=lambda kv: kv[1])},
        "additional_special_tokens": [
            "<|im_start|>",
            "<|im_end|>",
            "<|action_start|>",
            "<|action_end|>",
            "<|interpreter|>",
            "<|plugin|>",
        ],
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "chat_template": (
            "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_internlm2(
    out_dir: str | os.PathLike,
    corpus: list[str] | None = None,
    seed: int = 0,
    vocab_size: int = 800,
    **config_overrides,
) -> Path:
    """Write a tiny InternLM2 checkpoint directory to ``out_dir`` and return its path.

    ``corpus`` texts are added to the built-in Chinese/English corpus for the
    tokenizer. ``config_overrides`` replace entries of :data:`TINY_CONFIG` (e.g.
    ``num_key_value_heads=4``). The same arguments give byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    proto = train_tokenizer_model(BUILTIN_CORPUS + list(corpus or []), vocab_size=vocab_size, seed=seed)
    (out / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    added = {sp.id_to_piece(i): i for i in range(3)}
    added.update({tok: sp.piece_to_id(tok) for tok in CHAT_TOKENS})
    _write_json(out / "tokenizer_config.json", tokenizer_config(added))
    _write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": tokenizer_config(added)["additional_special_tokens"],
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
        },
    )

    values = {**TINY_CONFIG, "vocab_size": sp.get_piece_size(), **config_overrides}
    config = InternLM2Config(architectures=["InternLM2ForCausalLM"], auto_map=dict(OFFICIAL_AUTO_MAP), **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternLM2ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    # save_pretrained adds generation_config.json; the official repos ship one too.
    config_path = out / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    # The official config.json names its attention backend; transformers ignores the key.
    data.setdefault("attn_implementation", "eager")
    _write_json(config_path, data)
    return out


__all__ = ["build_tiny_internlm2", "train_tokenizer_model", "TINY_CONFIG", "BUILTIN_CORPUS", "CHAT_TOKENS"]
