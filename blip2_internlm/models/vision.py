"""Vision encoders in LAVIS's EVA ViT architecture, built from local weights.

LAVIS's ``create_eva_vit_g`` downloads ``eva_vit_g.pth`` inside the constructor.  Here the
architecture is a table entry and the weights a config value (``vit_weights``), so the
real model and the ``tiny`` test model are built by the same code.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

#: Architectures by ``vit_model`` name.  ``eva_clip_g`` is LAVIS's EVA ViT-g/14.
VIT_ARCHS = {
    "eva_clip_g": dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637),
    "tiny": dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
    # ViT-S/16 shape (12 x 384, 6 heads): the benchmark's ``small`` size (blip2_internlm.bench),
    # big enough on 2 CPU cores for the ViT/LLM cost split to resemble the real model's
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
}


def eva_vit(vit_model: str, img_size: int, drop_path_rate: float = 0.0, use_checkpoint: bool = False):
    from lavis.models.eva_vit import VisionTransformer

    if vit_model not in VIT_ARCHS:
        raise ValueError(f"model.vit_model = {vit_model!r} is not one of {sorted(VIT_ARCHS)}")
    return VisionTransformer(
        img_size=img_size,
        use_mean_pooling=False,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_checkpoint=use_checkpoint,
        **VIT_ARCHS[vit_model],
    )


def load_vit_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into the ViT; every parameter must be present (after position resizing)."""
    from lavis.models.eva_vit import interpolate_pos_embed

    from blip2_internlm.checkpoint import CheckpointError, load_checkpoint_file, load_weights, state_dict_of

    state = dict(state_dict_of(load_checkpoint_file(path), path))
    interpolate_pos_embed(model, state)
    report = load_weights(model, path, state_dict=state)
    if report.missing:
        raise CheckpointError(f"{path} lacks ViT weights {report.missing[:5]} (of {len(report.missing)})")


def build_vision_encoder(vit_model, img_size, drop_path_rate, use_grad_checkpoint, precision, vit_weights):
    from lavis.models.eva_vit import convert_weights_to_fp16

    from blip2_internlm.assets import resolve_vit_weights

    weights = resolve_vit_weights(vit_model, vit_weights, img_size)
    model = eva_vit(vit_model, img_size, drop_path_rate, use_grad_checkpoint)
    load_vit_weights(model, weights)
    if precision == "fp16":
        convert_weights_to_fp16(model)
    return model


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
