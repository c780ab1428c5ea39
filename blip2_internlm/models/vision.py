"""Vision encoders in LAVIS's EVA ViT architecture, built from local weights.

LAVIS's ``create_eva_vit_g`` downloads ``eva_vit_g.pth`` inside the constructor.  Here the
architecture is a table entry and the weights a config value (``vit_weights``), so the
real model and the ``tiny`` test model are built by the same code
(``blip2_internlm.models.builders.build_vision_encoder``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch import nn

#: Architectures by ``vit_model`` name.  ``eva_clip_g`` is LAVIS's EVA ViT-g/14.
VIT_ARCHS = {
    "eva_clip_g": dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637),
    "tiny": dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0),
    # ViT-S/16 shape (12 x 384, 6 heads): the benchmark's ``small`` size (blip2_internlm.tools.bench),
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
