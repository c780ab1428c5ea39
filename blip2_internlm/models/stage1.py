"""Stage-1 BLIP-2 loss (ITC + ITM + ITG) with image-id-aware contrastive targets.

LAVIS 1.0.2's ``Blip2Qformer.forward`` treats sample *i* as the only positive of text *i*.
With several captions per image (COCO has five, Visual Genome dozens) the same image often
appears twice in a global batch, and 1.0.2 then pushes apart an image and its own caption
and may pick it as a "hard negative" for ITM.  This forward takes ``samples["image_id"]``
(any hashable ids, mapped by :mod:`blip2_internlm.ids` to integers equal on every rank),
makes every same-image pair a positive, and never samples one as a negative.  Without
``image_id`` it is 1.0.2's diagonal target.  Installed as ``Blip2Qformer.forward`` by
``blip2_internlm.compat.blip2.itc_positives_from_image_ids``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blip2_internlm.ids import image_ids_to_tensor


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather(tensor):
    from lavis.models.base_model import concat_all_gather

    return concat_all_gather(tensor)


def _gather_with_grad(tensor):
    from lavis.models.base_model import all_gather_with_grad

    return all_gather_with_grad(tensor) if dist.is_available() and dist.is_initialized() else tensor


def same_image_mask(samples, batch_size: int, device) -> torch.Tensor:
    """(B, B*world) bool: True where local sample i and global sample j show the same image."""
    if "image_id" in samples:
        ids = image_ids_to_tensor(samples["image_id"], device=device).view(-1, 1)
    else:  # no ids: every sample is its own image, as in LAVIS 1.0.2
        offset = _rank() * batch_size
        ids = torch.arange(offset, offset + batch_size, device=device).view(-1, 1)
    return ids == _gather(ids).t()


def contrastive_targets(same_image: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Soft targets spreading the mass over all positives, with label smoothing."""
    positives = same_image.float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    return (1 - smoothing) * targets + smoothing / targets.size(1)


def stage1_forward(self, samples):
    from lavis.models.blip_models.blip_outputs import BlipOutput

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
        samples["text_input"], padding="max_length", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
    ).to(image.device)
    text_output = self.Qformer.bert(text_tokens.input_ids, attention_mask=text_tokens.attention_mask, return_dict=True)
    text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

    # --- image-text contrastive: the best-matching query decides the similarity
    bs = image.size(0)
    same_image = same_image_mask(samples, bs, image.device)
    sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, _gather(text_feat)).max(-1).values / self.temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, _gather(image_feats)).max(-1).values / self.temp
    targets = contrastive_targets(same_image)
    loss_itc = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2

    # --- image-text matching with hard negatives that never show the same image
    text_ids_world = _gather(text_tokens.input_ids)
    text_atts_world = _gather(text_tokens.attention_mask)
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
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(image.device)
    loss_itm = F.cross_entropy(logits, itm_labels)

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
