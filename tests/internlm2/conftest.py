"""Shared tiny InternLM2 fixtures (fp32, seeded, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# --import-mode=importlib does not put the repository root on sys.path.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from blip2_internlm.internlm2 import (  # noqa: E402
    InternLM2Config,
    InternLM2ForCausalLM,
    register_auto_classes,
)
from blip2_internlm.tiny.internlm2 import build_tiny_internlm2  # noqa: E402

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bias=False,
    pad_token_id=2,
    bos_token_id=1,
    eos_token_id=2,
)


def small_config(**overrides) -> InternLM2Config:
    """A ~20k-parameter config with GQA (4 query heads sharing 2 key/value heads)."""
    return InternLM2Config(**{**SMALL, **overrides})


def small_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> InternLM2ForCausalLM:
    torch.manual_seed(seed)
    model = InternLM2ForCausalLM(small_config(attn_implementation=attn_implementation, **overrides))
    # The default init (std 0.02) makes near-uniform logits; larger weights make
    # greedy/beam choices, and any layout mistake, visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture
def make_model():
    return small_model


@pytest.fixture
def make_config():
    return small_config


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny official-layout checkpoint directory (built once; treat as read-only)."""
    register_auto_classes()
    return build_tiny_internlm2(tmp_path_factory.mktemp("tiny-internlm2"))


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


@pytest.fixture
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)
