"""Stage 1 (LAVIS's ``Blip2Qformer``: ITC + ITM + ITG), built from its config, with image-id-aware ITC.

LAVIS's ``Blip2Qformer`` and ``Blip2ITM`` download bert-base-uncased and eva_vit_g.pth inside their
constructors.  These subclasses take the two as config keys (``qformer_text_model``, ``vit_weights``;
see ``blip2_internlm.assets``) through :class:`~blip2_internlm.models.config.Stage1Config` and build
through ``blip2_internlm.models.builders`` with any weight source; LAVIS's registry names ``blip2``,
``blip2_feature_extractor`` and ``blip2_image_text_matching``, and ``Blip2Qformer.from_config`` /
``from_pretrained``, resolve to them (``blip2_internlm.compat.blip2.stage1_models_built_from_config``).

The Q-Former, ``extract_features``, ``generate`` and the ITM scores are LAVIS's.  The loss is
:meth:`Blip2Stage1.forward`: LAVIS 1.0.2's ``Blip2Qformer.forward`` treats sample *i* as the only
positive of text *i*.  With several captions per image (COCO has five, Visual Genome dozens) the same
image often appears twice in a global batch, and 1.0.2 then pushes apart an image and its own caption
and may pick it as a "hard negative" for ITM.  This forward takes ``samples["image_id"]`` (any hashable
ids, mapped by :mod:`blip2_internlm.ids` to integers equal on every rank), makes every same-image pair a
positive, and never samples one as a negative.  Without ``image_id`` it is 1.0.2's diagonal target.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lavis.models.base_model import all_gather_with_grad, concat_all_gather
from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip_models.blip_outputs import BlipOutput

from blip2_internlm.ids import image_ids_to_tensor
from blip2_internlm.models.builders import FILES, AssetsFromConfig, WeightSource
from blip2_internlm.models.config import Stage1Config


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _gather_with_grad(tensor):
    # LAVIS's all_gather_with_grad asks for the world size even in a single process
    return all_gather_with_grad(tensor) if _distributed() else tensor


def same_image_mask(samples, batch_size: int, device) -> torch.Tensor:
    """(B, B*world) bool: True where local sample i and global sample j show the same image."""
    if "image_id" in samples:
        ids = image_ids_to_tensor(samples["image_id"], device=device).view(-1, 1)
    else:  # no ids: every sample is its own image, as in LAVIS 1.0.2
        offset = _rank() * batch_size
        ids = torch.arange(offset, offset + batch_size, device=device).view(-1, 1)
    return ids == concat_all_gather(ids).t()


def contrastive_targets(same_image: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Soft targets spreading the mass over all positives, with label smoothing."""
    positives = same_image.float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    return (1 - smoothing) * targets + smoothing / targets.size(1)


class _BuiltFromStage1Config(AssetsFromConfig):
    """The constructor and ``from_config`` of both stage-1 classes: a :class:`Stage1Config` and a weight source."""

    def __init__(self, config: Stage1Config, weights: WeightSource = FILES):
        with weights.building():
            super().__init__(
                **config.lavis_kwargs(),
                qformer_text_model=config.qformer_text_model,
                vit_weights=config.vit_weights,
                weights=weights,
            )

    @classmethod
    def from_config(cls, cfg, weights: WeightSource = FILES):
        model = cls(Stage1Config.from_lavis(cfg), weights)
        if weights.loads_files:
            model.load_checkpoint_from_config(cfg)
        return model


class Blip2Stage1(_BuiltFromStage1Config, Blip2Qformer):
    """``arch: blip2`` / ``blip2_feature_extractor``: the stage-1 loss (ITC + ITM + ITG) with image-id-aware ITC."""

    def forward(self, samples):
        """ITC + ITM + ITG losses of a batch (``image``, ``text_input``; ``image_id`` optional, any hashable ids):
        captions whose ids match are each other's ITC positives and never ITM negatives, on every rank."""
        image = samples["image"]
        image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            use_cache=True,
            return_dict=True,
        )
        image_feats = F.normalize(self.vision_proj(query_output.last_hidden_state), dim=-1)

        text_tokens = self.tokenizer(
            samples["text_input"],
            padding="max_length",
            truncation=True,
            max_length=self.max_txt_len,
            return_tensors="pt",
        ).to(image.device)
        text_output = self.Qformer.bert(
            text_tokens.input_ids, attention_mask=text_tokens.attention_mask, return_dict=True
        )
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

        # --- image-text contrastive: the best-matching query decides the similarity
        bs = image.size(0)
        same_image = same_image_mask(samples, bs, image.device)
        sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, concat_all_gather(text_feat)).max(-1).values / self.temp
        sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, concat_all_gather(image_feats)).max(-1).values / self.temp
        targets = contrastive_targets(same_image)
        loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2

        # --- image-text matching with hard negatives that never show the same image
        text_ids_world = concat_all_gather(text_tokens.input_ids)
        text_atts_world = concat_all_gather(text_tokens.attention_mask)
        image_embeds_world = _gather_with_grad(image_embeds)
        with torch.no_grad():
            weights_t2i = (F.softmax(sim_t2i, dim=1) + 1e-4).masked_fill(same_image, 0)
            weights_i2t = (F.softmax(sim_i2t, dim=1) + 1e-4).masked_fill(same_image, 0)
        # a batch where every sample shows one image has no negative: fall back to uniform
        weights_t2i[weights_t2i.sum(1) == 0] = 1.0
        weights_i2t[weights_i2t.sum(1) == 0] = 1.0
        image_embeds_neg = image_embeds_world[torch.multinomial(weights_t2i, 1).squeeze(1)]
        text_neg = torch.multinomial(weights_i2t, 1).squeeze(1)

        text_ids_all = torch.cat([text_tokens.input_ids, text_tokens.input_ids, text_ids_world[text_neg]])
        text_atts_all = torch.cat([text_tokens.attention_mask, text_tokens.attention_mask, text_atts_world[text_neg]])
        image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds])  # pos, neg, pos
        query_tokens_itm = self.query_tokens.expand(text_ids_all.shape[0], -1, -1)
        query_atts_itm = torch.ones(query_tokens_itm.shape[:-1], dtype=torch.long, device=image.device)
        output_itm = self.Qformer.bert(
            text_ids_all,
            query_embeds=query_tokens_itm,
            attention_mask=torch.cat([query_atts_itm, text_atts_all], dim=1),
            encoder_hidden_states=image_embeds_all,
            encoder_attention_mask=torch.ones(image_embeds_all.shape[:-1], dtype=torch.long, device=image.device),
            return_dict=True,
        )
        logits = self.itm_head(output_itm.last_hidden_state[:, : query_tokens_itm.size(1), :]).mean(dim=1)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)])
        loss_itm = F.cross_entropy(logits, itm_labels.to(image.device))

        # --- image-grounded text generation, reading the queries' cached keys and values
        decoder_input_ids = text_tokens.input_ids.clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id
        labels = decoder_input_ids.masked_fill(decoder_input_ids == self.tokenizer.pad_token_id, -100)
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image.device)
        lm_output = self.Qformer(
            decoder_input_ids,
            attention_mask=torch.cat([query_atts, text_tokens.attention_mask], dim=1),
            past_key_values=query_output.past_key_values,
            return_dict=True,
            labels=labels,
        )
        loss_lm = lm_output.loss
        return BlipOutput(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm)


class Blip2Stage1ITM(_BuiltFromStage1Config, Blip2ITM):
    """``arch: blip2_image_text_matching``: LAVIS's ``Blip2ITM.forward``, ITM or ITC scores of image-text pairs."""
