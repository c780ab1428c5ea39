"""Batched construction of the frozen LLM's inputs and the precision and memory switches:
the helpers behind ``Blip2InternLM``'s hot path.

Tokenisation is one tokenizer call per batch; everything after it is tensor indexing, so
the cost no longer grows with a per-sample loop of small tensor ops.  Ids, masks, labels and
embeddings are bit-identical to the per-sample construction they replace (see
``tests/models/test_precision_and_throughput.py``, which keeps that construction as the
reference).

Precision (model config ``autocast_dtype``):

* ``fp16`` (default, LAVIS's ``maybe_autocast``): fp16 autocast on CUDA, none on the CPU.  With
  ``llm_precision: fp16`` this is the fp16 recipe; it needs loss scaling, which LAVIS's runner
  does with ``run.amp: True`` (``torch.amp.GradScaler`` on CUDA, see ``compat/runner_base.py``).
* ``bf16``: bf16 autocast on CUDA and on the CPU; no loss scaling (bf16 has fp32's range), so
  run it with ``run.amp: False`` -- ``run.amp`` would add LAVIS's fp16 autocast around the
  parts of the step outside the model's own autocast regions.
* ``auto``: bf16 where the device multiplies it natively (a GPU with bf16; a CPU with AVX512-BF16 or
  AMX), fp16 on an older GPU, none on other CPUs (``blip2_internlm.hardware.fast_half_dtype``).
* ``off``: no autocast anywhere in the model.

The frozen LLM's weights stay in ``llm_precision`` in every mode: autocast casts per op.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch

from blip2_internlm.hardware import fast_half_dtype, warn_if_slow_bf16
from blip2_internlm.models.config import AUTOCAST_DTYPES
from blip2_internlm.models.cpu_linear import same_linear_kernel_on_recompute

# --- precision --------------------------------------------------------------------------------


def resolve_autocast_dtype(setting: str, device: torch.device):
    """torch dtype of the autocast region, or None for no autocast."""
    if setting not in AUTOCAST_DTYPES:
        raise ValueError(f"model.autocast_dtype = {setting!r}; expected one of {list(AUTOCAST_DTYPES)}")
    if setting == "off":
        return None
    if device.type not in ("cuda", "cpu"):
        return None  # no autocast region elsewhere (a meta build plans for a GPU, but computes nothing)
    if setting == "auto":
        return fast_half_dtype(device)
    if device.type == "cuda":
        return torch.bfloat16 if setting == "bf16" else torch.float16
    # CPU: fp16 (LAVIS's default) never autocasts, fp16 matmuls on a CPU are no speed-up
    if setting == "bf16":
        warn_if_slow_bf16("model.autocast_dtype: bf16", device)
        return torch.bfloat16
    return None


def checkpoint_frozen_llm_layers(llm: torch.nn.Module) -> int:
    """Recompute each decoder layer of the frozen LLM in the backward pass; returns how many.

    transformers' ``gradient_checkpointing_enable`` only checkpoints layers in training mode,
    and the frozen LLM stays in eval mode (putting it in training mode would switch on OPT's
    dropout), so here the layers' ``forward`` goes through non-reentrant
    ``torch.utils.checkpoint`` whenever autograd records.  Non-reentrant: the layers' inputs
    (the Q-Former's soft prompt) carry the gradient, not the frozen weights, and keyword
    arguments must reach the layer.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in llm.modules():
        if isinstance(module, GradientCheckpointingLayer) and not getattr(module, "_frozen_checkpointing", False):
            forward = module.forward

            @functools.wraps(forward)
            def checkpointed(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(
                    _forward, *args, use_reentrant=False, context_fn=same_linear_kernel_on_recompute, **kwargs
                )

            module.forward = checkpointed
            module._frozen_checkpointing = True
            count += 1
    if not count:
        raise ValueError(
            f"model.llm_grad_checkpoint: {type(llm).__name__} has no transformers decoder layers to checkpoint"
        )
    return count


# --- token ids ------------------------------------------------------------------------------------


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids without special tokens, one tokenizer call for the batch; "" gives []."""
    nonempty = [i for i, text in enumerate(texts) if text]
    ids: list[list[int]] = [[] for _ in texts]
    if nonempty:
        encoded = tokenizer([texts[i] for i in nonempty], add_special_tokens=False).input_ids
        for i, row in zip(nonempty, encoded):
            ids[i] = row
    return ids


def ragged(rows: Sequence[Sequence[int]]):
    """(B, W) right-padded long tensor (padding 0) and the (B,) lengths of ragged id lists."""
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    out = torch.zeros((len(rows), width), dtype=torch.long)
    out[torch.arange(width) < lengths[:, None]] = torch.tensor(
        list(itertools.chain.from_iterable(rows)), dtype=torch.long
    )
    return out, lengths


def training_tokens(tokenizer, prompts: Sequence[str], texts: Sequence[str], max_txt_len: int):
    """Right-padded ``<s> prompt text </s>`` ids, attention mask and labels for a batch.

    Same rules as the per-sample construction: labels -100 on ``<s>``, the prompt and padding;
    the row is cut at ``max_txt_len`` and a cut text has no ``</s>``; an empty text, or a
    prompt that leaves fewer than two tokens, is a ValueError naming the first offending sample.
    """
    n = min(len(prompts), len(texts))  # zip's rule, as the per-sample loop had
    prompts, texts = list(prompts)[:n], list(texts)[:n]
    bad_text = next((i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()), None)
    prompt_ids = token_ids(tokenizer, prompts)
    head_len = torch.tensor([1 + len(ids) for ids in prompt_ids], dtype=torch.long)
    too_long = (max_txt_len - head_len < 2).nonzero().flatten().tolist()
    bad_prompt = too_long[0] if too_long else None
    if bad_text is not None and (bad_prompt is None or bad_text <= bad_prompt):
        raise ValueError(f"empty or non-string text_input {texts[bad_text]!r}: every sample needs a caption/answer")
    if bad_prompt is not None:
        raise ValueError(
            f"prompt {prompts[bad_prompt]!r} takes {int(head_len[bad_prompt])} of max_txt_len={max_txt_len} tokens; "
            "raise model.max_txt_len or shorten the prompt"
        )
    text_ids = token_ids(tokenizer, texts)
    prompt_mat, n_prompt = ragged(prompt_ids)
    text_mat, n_text = ragged(text_ids)
    batch = len(text_ids)
    # source row per sample: <s> | prompt (padded to P) | text (padded to T) | </s>
    source = torch.cat(
        [
            torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long),
            prompt_mat,
            text_mat,
            torch.full((batch, 1), tokenizer.eos_token_id, dtype=torch.long),
        ],
        dim=1,
    )
    P, T = prompt_mat.shape[1], text_mat.shape[1]
    length = torch.clamp(1 + n_prompt + n_text + 1, max=max_txt_len)
    width = int(length.max())
    j = torch.arange(width)[None, :]
    p, t = n_prompt[:, None], n_text[:, None]
    column = torch.where(j <= p, j, torch.where(j <= p + t, 1 + P + (j - 1 - p), torch.full_like(j, 1 + P + T)))
    valid = j < length[:, None]
    ids = torch.gather(source, 1, column.clamp(max=source.shape[1] - 1))
    input_ids = torch.where(valid, ids, torch.full_like(ids, tokenizer.pad_token_id))
    labels = torch.where(valid & (j > p), ids, torch.full_like(ids, -100))
    return input_ids, valid.long(), labels


# --- embeddings for generation --------------------------------------------------------------------


def generation_embeds(tokenizer, embed: torch.nn.Embedding, queries: torch.Tensor, prompts: Sequence[str]):
    """Left-padded ``[pad] [queries] <s> prompt`` embeddings (queries' dtype) and attention mask.

    One embedding lookup of the right-padded ``<s> prompt [pad]`` ids; each row is then rotated
    right by its padding, which brings its pad embeddings in front of the queries.
    """
    heads = [[tokenizer.bos_token_id] + ids for ids in token_ids(tokenizer, list(prompts))]
    return left_padded_embeds(embed, queries, heads, tokenizer.pad_token_id)


def left_padded_embeds(embed: torch.nn.Embedding, queries: torch.Tensor, heads: Sequence[Sequence[int]], pad_id: int):
    """Left-padded ``[pad] [queries] head`` embeddings (queries' dtype) and attention mask, for token-id ``heads``
    (one per row, ``<s>`` included)."""
    device = queries.device
    batch, n_query = queries.shape[:2]
    heads, head_len = ragged(heads)
    width = heads.shape[1]
    n_pad = width - head_len
    heads = torch.where(torch.arange(width) < head_len[:, None], heads, torch.full_like(heads, pad_id))
    source = torch.cat([queries, embed(heads.to(device)).to(queries.dtype)], dim=1)
    total = n_query + width
    j = torch.arange(total)[None, :]
    column = (j - n_pad[:, None]) % total
    rows = torch.gather(source, 1, column.to(device)[:, :, None].expand(-1, -1, source.shape[-1]))
    return rows, (j >= n_pad[:, None]).long().to(device)


# --- conversations --------------------------------------------------------------------------------


def segment_ids(tokenizer, rows) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids of rows of :class:`~blip2_internlm.models.chat_template.Segment` s, and per token whether it
    is trained; one tokenizer call for every segment text of the batch."""
    texts = [segment.text for row in rows for segment in row]
    encoded = iter(token_ids(tokenizer, texts))
    ids, trained = [], []
    for row in rows:
        row_ids, row_trained = [], []
        for segment in row:
            piece = next(encoded) + list(segment.ids)
            row_ids += piece
            row_trained += [segment.train] * len(piece)
        ids.append(row_ids)
        trained.append(row_trained)
    return ids, trained


def conversation_tokens(tokenizer, rows, max_len: int):
    """Right-padded ids, attention mask and labels of rows of segments (``ChatTemplate.training_segments``).

    Labels are the trained segments' tokens, -100 elsewhere (context turns, padding).  A row longer than
    ``max_len`` is cut there; a row whose cut leaves no trained token is a ValueError naming it."""
    ids, trained = segment_ids(tokenizer, rows)
    for i, row in enumerate(trained):
        if not any(row[:max_len]):
            raise ValueError(
                f"conversation {i}: nothing to learn within max_txt_len={max_len} tokens "
                f"({len(row)} tokens, the first answer starts at {row.index(True) if True in row else 'none'}); "
                "raise model.max_txt_len or shorten the conversation"
            )
    ids = [row[:max_len] for row in ids]
    mat, lengths = ragged(ids)
    train_mat, _ = ragged([[int(t) for t in row[:max_len]] for row in trained])
    valid = torch.arange(mat.shape[1])[None, :] < lengths[:, None]
    input_ids = torch.where(valid, mat, torch.full_like(mat, tokenizer.pad_token_id))
    labels = torch.where(valid & train_mat.bool(), mat, torch.full_like(mat, -100))
    return input_ids, valid.long(), labels
