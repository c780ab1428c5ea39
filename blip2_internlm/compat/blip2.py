"""LAVIS's BLIP-2 models: offline assets, stage 1 built from its config (image-id-aware loss), Q-Former caption generation."""

import functools
import os
import re

import torch

from blip2_internlm.compat.fixes import fix

#: Where LAVIS's own BLIP-2 models (blip2_opt, blip2_t5, ...) find their assets: they read no config
#: key for them, so the values come from these variables, as the project's real-size configs do.
LAVIS_QFORMER_TEXT_MODEL_ENV = "BERT_BASE_UNCASED"
LAVIS_VIT_WEIGHTS_ENV = "EVA_VIT_G"


def init_tokenizer(cls, truncation_side="right", text_model=None):
    from blip2_internlm.models.builders import build_qformer_tokenizer

    return build_qformer_tokenizer(text_model or _lavis_text_model(), truncation_side)


def init_qformer(cls, num_query_token, vision_width, cross_attention_freq=2, text_model=None):
    from blip2_internlm.models.builders import build_qformer

    return build_qformer(text_model or _lavis_text_model(), num_query_token, vision_width, cross_attention_freq)


def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision, vit_weights=None):
    from blip2_internlm.models.builders import build_vision_encoder

    vit_weights = vit_weights or os.environ.get(LAVIS_VIT_WEIGHTS_ENV, "eva_vit_g.pth")
    return build_vision_encoder(model_name, img_size, drop_path_rate, use_grad_checkpoint, precision, vit_weights)


def _lavis_text_model() -> str:
    return os.environ.get(LAVIS_QFORMER_TEXT_MODEL_ENV, "bert-base-uncased")


@fix
def offline_blip2_assets():
    """Blip2Base downloads bert-base-uncased and eva_vit_g.pth in its constructors; LAVIS's BLIP-2 models read local copies ($BERT_BASE_UNCASED or the chosen hub's local cache, docs/downloads.md, $EVA_VIT_G) instead."""
    from lavis.models.blip2_models.blip2 import Blip2Base

    Blip2Base.init_tokenizer = classmethod(init_tokenizer)
    Blip2Base.init_Qformer = classmethod(init_qformer)
    Blip2Base.init_vision_encoder = classmethod(init_vision_encoder)


@fix
def stage1_models_built_from_config():
    """LAVIS's stage-1 models take no key for their BERT and ViT weights and count only sample i as text i's ITC positive; blip2, blip2_feature_extractor and blip2_image_text_matching (registry names, and Blip2Qformer/Blip2ITM.from_config) build Blip2Stage1(ITM), whose config names the weights (qformer_text_model, vit_weights) and whose loss makes every caption of an image its positive.

    Blip2Stage1.forward is the stage-1 loss with image-id-aware contrastive targets
    (blip2_internlm.models.blip2_stage1); LAVIS's Blip2Qformer.forward is left as it is, so a
    Blip2Qformer built by its own constructor (not from_config, from_pretrained or the registry)
    has LAVIS 1.0.2's forward: diagonal targets, same-image captions repel each other.
    """
    from lavis.common.registry import registry
    from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from blip2_internlm.models.blip2_stage1 import Blip2Stage1, Blip2Stage1ITM

    models = registry.mapping["model_name_mapping"]
    models["blip2"] = models["blip2_feature_extractor"] = Blip2Stage1
    models["blip2_image_text_matching"] = Blip2Stage1ITM
    built_as = {Blip2Qformer: Blip2Stage1, Blip2ITM: Blip2Stage1ITM}
    lavis_from_config = Blip2Qformer.from_config.__func__

    def from_config(cls, cfg):
        # Blip2Qformer.from_pretrained("tiny") and LAVIS's own callers of the class, not the registry
        return built_as[cls].from_config(cfg) if cls in built_as else lavis_from_config(cls, cfg)

    Blip2Qformer.from_config = classmethod(from_config)


def expand_text_inputs_for_generation(expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
    """transformers < 4.26's expansion per beam: ``input_ids`` and ``attention_mask`` only.

    LAVIS's BLIP-2 models repeat their image states and queries per beam themselves, as that
    transformers required; today's ``generate`` would expand every tensor argument again.
    """
    if input_ids is not None:
        input_ids = input_ids.repeat_interleave(expand_size, dim=0)
    if model_kwargs.get("attention_mask") is not None:
        model_kwargs["attention_mask"] = model_kwargs["attention_mask"].repeat_interleave(expand_size, dim=0)
    return input_ids, model_kwargs


@fix
def qformer_lm_head_generation():
    """The Q-Former's BertLMHeadModel lost generate() (transformers >= 4.50) and LAVIS pre-expands encoder states per beam."""
    from lavis.models.blip2_models.Qformer import BertLMHeadModel
    from transformers import GenerationMixin

    if GenerationMixin not in BertLMHeadModel.__mro__:
        BertLMHeadModel.__bases__ = BertLMHeadModel.__bases__ + (GenerationMixin,)

    def prepare_inputs_for_generation(self, input_ids, query_embeds=None, attention_mask=None, **model_kwargs):
        # No KV cache: LAVIS's legacy tuple cache predates transformers' Cache classes, and
        # recomputing a 30-token caption over 32 queries is cheap.
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        query_mask = input_ids.new_ones(query_embeds.shape[:-1])
        return {
            "input_ids": input_ids,
            "query_embeds": query_embeds,
            "attention_mask": torch.cat([query_mask, attention_mask], dim=-1),
            "encoder_hidden_states": model_kwargs.get("encoder_hidden_states"),
            "encoder_attention_mask": model_kwargs.get("encoder_attention_mask"),
            "use_cache": False,
            "is_decoder": True,
        }

    BertLMHeadModel.prepare_inputs_for_generation = prepare_inputs_for_generation
    # Blip2Qformer.generate already repeats image states and queries per beam
    BertLMHeadModel._expand_inputs_for_generation = staticmethod(expand_text_inputs_for_generation)
    BertLMHeadModel.can_generate = classmethod(lambda cls: True)
    # the cache is never read back (see above), so beam reordering has nothing to do
    BertLMHeadModel._reorder_cache = lambda self, past_key_values, beam_idx: past_key_values


@fix
def qformer_lm_head_bias_tied():
    """transformers >= 4.4x loads into meta-initialised modules: LAVIS's shared cls.predictions.bias gets split off, never trains, and starts as uninitialised memory."""
    from lavis.models.blip2_models.Qformer import BertLMPredictionHead, BertPreTrainedModel

    def _tie_weights(self):
        # called by PreTrainedModel.tie_weights() after loading and after resizing, as for transformers' own BERT
        self.decoder.bias = self.bias

    init_weights = BertPreTrainedModel._init_weights

    def _init_weights(self, module):
        init_weights(self, module)
        if isinstance(module, BertLMPredictionHead):
            module.bias.data.zero_()

    BertLMPredictionHead._tie_weights = _tie_weights
    BertPreTrainedModel._init_weights = _init_weights


# CJK ideographs, CJK symbols and full-width forms: Chinese text puts no spaces between
# them, and BERT's BasicTokenizer makes each ideograph and punctuation mark its own token.
_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK}]) +(?=[{_CJK}])")


def join_cjk(text: str) -> str:
    """``"左 边 有 一 个 red 圆"`` -> ``"左边有一个 red 圆"``: spaces next to Latin words or digits stay."""
    return _SPACE_BETWEEN_CJK.sub("", text)


@fix
def qformer_captions_without_cjk_spaces():
    """Blip2Qformer.generate decodes with BertTokenizer, which joins every token with a space: Chinese captions come out as '红 色 的 圆'."""
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    generate = Blip2Qformer.generate

    @functools.wraps(generate)
    def generate_joined(self, *args, **kwargs):
        return [join_cjk(caption) for caption in generate(self, *args, **kwargs)]

    Blip2Qformer.generate = generate_joined


@fix
def eva_vit_checkpoint_non_reentrant():
    """LAVIS's EVA ViT calls torch.utils.checkpoint without use_reentrant, which torch warns about on every block (and plans to refuse); non-reentrant is torch's recommended mode, and the one whose recomputation can use the forward's fp32 linear kernel (models/cpu_linear.py)."""
    import types

    import torch.utils.checkpoint
    from lavis.models import eva_vit

    from blip2_internlm.models.cpu_linear import same_linear_kernel_on_recompute

    def checkpoint(function, *args, **kwargs):
        kwargs.setdefault("use_reentrant", False)
        if not kwargs["use_reentrant"]:
            kwargs.setdefault("context_fn", same_linear_kernel_on_recompute)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    eva_vit.checkpoint = types.SimpleNamespace(checkpoint=checkpoint)
