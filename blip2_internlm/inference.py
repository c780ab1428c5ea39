"""Your own weights in one call: a LAVIS-style ``load_model_and_preprocess`` that also takes a checkpoint.

    from blip2_internlm import load_model_and_preprocess

    model, vis_processors, txt_processors = load_model_and_preprocess(
        "blip2_internlm", "pretrain_internlm2_1.8b", device="cuda",
        checkpoint="output/stage2/<job>/checkpoint_best.pth",
        llm_model="/models/internlm2-1_8b", vit_weights="/models/eva_vit_g.pth")

    # or the model section and eval processors of a training/evaluation YAML
    model, vis_processors, txt_processors = load_model_and_preprocess(
        cfg_path="configs/tiny/caption_eval.yaml", checkpoint="output/tiny/stage2/<job>/checkpoint_0.pth")

It is LAVIS's ``lavis.models.load_model_and_preprocess`` (the model type's ``model:`` config
through the model's own ``from_config``, its ``preprocess:`` through ``load_preprocess``) with
three additions: ``checkpoint`` (a stage-2 or fine-tuned ``.pth`` or ``.safetensors``),
``model_options`` (keys of the model config, as ``--options model.<key>=...`` in training), and
``cfg_path`` (a training or evaluation YAML instead of a model type: its ``model:`` section over
its model type, the eval processors of its first dataset).  The model is built where every tool
builds one, ``blip2_internlm.factory``; this function adds the processors.

Two deliberate differences from LAVIS's function: on the CPU the model keeps its configured
precisions except an fp16 ViT, which becomes fp32 (LAVIS casts the whole model, a bf16 LLM
included, to fp32; an fp16 ViT runs only under autocast, which the CPU does not get); and
``is_eval`` defaults to True.
"""

from __future__ import annotations

from lavis.models import load_preprocess

from blip2_internlm.factory import ModelBuildError, ModelOptionError, merged_model_config

__all__ = ["load_model_and_preprocess", "ModelBuildError", "ModelOptionError"]


def load_model_and_preprocess(
    name: str | None = None,
    model_type: str | None = None,
    is_eval: bool = True,
    device="cpu",
    checkpoint=None,
    *,
    cfg_path=None,
    **model_options,
):
    """``(model, vis_processors, txt_processors)`` as LAVIS's function of the same name returns them.

    The model is ``blip2_internlm.factory.build_model``'s, with weights from files; a model that
    cannot be built as asked is a ``ModelBuildError`` naming the key or file.

    Args:
        name: the registered architecture (``blip2_internlm``, ``blip2_opt_baseline``, ...);
            with ``cfg_path`` it defaults to the config's ``model.arch``.
        model_type: a model type of ``name`` (``tiny``, ``pretrain_internlm2_1.8b``, ...); with
            ``cfg_path`` it overrides the config's ``model.model_type``.
        is_eval: put the model in eval mode.
        device: where the model goes (``"cpu"``, ``"cuda"``, a ``torch.device``).
        checkpoint: a stage-2 or fine-tuned checkpoint.  Read without unpickling code
            (``blip2_internlm.checkpoint``); it must provide every trainable weight of the model
            (Q-Former, ``query_tokens``, ``llm_proj``, ...), else it is an error naming the file
            (a ``CheckpointError``).  It replaces the config's ``pretrained`` / ``finetuned``.  What
            was loaded is logged and kept as ``model.checkpoint_report`` (a ``LoadReport``).
        cfg_path: a LAVIS training/evaluation YAML to take the model and processors from.
        **model_options: model-config keys overriding the model type's, e.g.
            ``llm_model="/path/to/internlm2-1_8b"``, ``vit_weights=...``, ``qformer_text_model=...``,
            ``prompt=...``.  A key the model's config does not have is a ``ModelOptionError``.
    """
    config = merged_model_config(name, model_type, cfg_path=cfg_path, options=model_options)
    model = config.build(checkpoint=checkpoint, device=device, is_eval=is_eval)
    vis_processors, txt_processors = load_preprocess(config.preprocess)
    return model, vis_processors, txt_processors
