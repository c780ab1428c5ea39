"""Weights for the tiny EVA ViT (``vit_model: tiny``, ``vit_weights: tiny``)."""

from __future__ import annotations

from pathlib import Path

import torch

from blip2_internlm.assets import GeneratedAsset
from blip2_internlm.models.vision import VIT_ARCHS, eva_vit


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, (grid*grid, dim)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def build_tiny_vit_weights(out: Path, image_size: int) -> None:
    """Deterministic weights for the tiny ViT.

    Random transformer weights carry no spatial information unless the position embedding
    does, so the tiny ViT gets fixed 2-D sin-cos position embeddings: its frozen features
    then tell where a shape is, as a pretrained ViT's would.
    """
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = eva_vit("tiny", image_size)
    grid = image_size // VIT_ARCHS["tiny"]["patch_size"]
    dim = VIT_ARCHS["tiny"]["embed_dim"]
    with torch.no_grad():
        model.pos_embed[0, 1:] = sincos_2d(grid, dim)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "vit.safetensors"))


TINY_VIT_WEIGHTS = GeneratedAsset(
    dirname=lambda image_size: f"tiny-vit-{image_size}px", build=build_tiny_vit_weights, file="vit.safetensors"
)
