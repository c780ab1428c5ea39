"""Fused attention (``torch.nn.functional.scaled_dot_product_attention``) in LAVIS's EVA ViT
and Q-Former, switchable per module.

LAVIS 1.0.2 computes attention by hand (``q @ k^T``, softmax, ``@ v``) in
``lavis.models.eva_vit.Attention`` and ``lavis.models.blip2_models.Qformer.BertSelfAttention``,
materialising every (batch, heads, queries, keys) score and probability tensor for the
backward pass.  The compat fix ``fused_attention_in_eva_vit_and_qformer`` (``blip2_internlm.compat.attention``)
replaces both forwards with one that calls SDPA, which
computes the same softmax attention, additive masks and biases included, in a fused kernel.
Where SDPA cannot reproduce what the hand-written forward exposes, the module runs LAVIS's
original forward (kept in :data:`EAGER_FORWARDS`):

* ``head_mask`` given, ``output_attentions=True`` (both need the probabilities);
* ``save_attention`` on (Grad-CAM reads the probabilities and hooks their gradient);
* ``relative_key`` / ``relative_key_query`` position embeddings in the Q-Former.

Attention dropout is SDPA's ``dropout_p`` (same probability; a different random stream, so
training with dropout matches eager in distribution, not bitwise).

Which implementation a module uses, first match wins:

1. its own ``attn_implementation`` attribute, ``"sdpa"`` or ``"eager"``, set by
   :func:`set_attn_implementation` (``arch: blip2_internlm`` / ``blip2_opt_baseline`` set it
   from the model config key ``attn_implementation``, and also switch the frozen LLM);
2. the environment variable ``BLIP2_INTERNLM_ATTN`` (``sdpa`` | ``eager``), read at every
   forward, which is the switch for models without the config key, e.g. LAVIS's stage-1
   ``Blip2Qformer`` (``arch: blip2``/``pretrain``): ``BLIP2_INTERNLM_ATTN=eager python -m
   blip2_internlm.train ...``;
3. ``"sdpa"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blip2_internlm.models.config import ATTN_IMPLEMENTATIONS

#: The implementations a module can be switched to (a model config's null means "not given").
NAMED_ATTN_IMPLEMENTATIONS = tuple(name for name in ATTN_IMPLEMENTATIONS if name)
ENV_VAR = "BLIP2_INTERNLM_ATTN"

#: LAVIS's own forwards, by class name, used for ``eager`` and for the fallbacks.
EAGER_FORWARDS: dict[str, Callable] = {}


def check_implementation(name, where: str = "attn_implementation") -> str:
    if name not in NAMED_ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{where} = {name!r}; expected one of {list(NAMED_ATTN_IMPLEMENTATIONS)}")
    return name


def default_implementation() -> str:
    """``$BLIP2_INTERNLM_ATTN`` if set, else ``sdpa``."""
    return check_implementation(os.environ.get(ENV_VAR) or "sdpa", f"${ENV_VAR}")


def resolve_attn_implementation(name=None) -> str:
    """A model config's ``attn_implementation`` (``None``: not given) as a concrete name."""
    return default_implementation() if name is None else check_implementation(name, "model.attn_implementation")


def uses_sdpa(module) -> bool:
    name = module.attn_implementation or default_implementation()
    if name == "sdpa":
        return True
    check_implementation(name, f"{type(module).__name__}.attn_implementation")
    return False


def _dropout_p(dropout: nn.Dropout) -> float:
    # the Dropout module's own flag, exactly what the eager path's self.dropout(...) obeys
    return dropout.p if dropout.training else 0.0


def eva_attention_forward(self, x, rel_pos_bias=None):
    if not uses_sdpa(self):
        return EAGER_FORWARDS["Attention"](self, x, rel_pos_bias)
    batch, tokens, _ = x.shape
    qkv_bias = None
    if self.q_bias is not None:
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
    qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    bias = None
    if self.relative_position_bias_table is not None:
        side = self.window_size[0] * self.window_size[1] + 1
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0)
    if rel_pos_bias is not None:
        bias = rel_pos_bias if bias is None else bias + rel_pos_bias
    if bias is not None:
        bias = bias.to(q.dtype)

    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=_dropout_p(self.attn_drop), scale=self.scale)
    x = x.transpose(1, 2).reshape(batch, tokens, -1)
    return self.proj_drop(self.proj(x))


def qformer_self_attention_forward(
    self,
    hidden_states,
    attention_mask=None,
    head_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    past_key_value=None,
    output_attentions=False,
):
    if (
        head_mask is not None
        or output_attentions
        or self.save_attention
        or self.position_embedding_type != "absolute"
        or not uses_sdpa(self)
    ):
        return EAGER_FORWARDS["BertSelfAttention"](
            self,
            hidden_states,
            attention_mask,
            head_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            past_key_value,
            output_attentions,
        )
    if encoder_hidden_states is not None:
        key = self.transpose_for_scores(self.key(encoder_hidden_states))
        value = self.transpose_for_scores(self.value(encoder_hidden_states))
        attention_mask = encoder_attention_mask
    else:
        key = self.transpose_for_scores(self.key(hidden_states))
        value = self.transpose_for_scores(self.value(hidden_states))
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
    query = self.transpose_for_scores(self.query(hidden_states))
    if attention_mask is not None:
        # LAVIS's masks are additive (0 / -10000 or the dtype's min) and broadcast over heads
        attention_mask = attention_mask.to(query.dtype)

    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=_dropout_p(self.dropout)
    )
    context = context.permute(0, 2, 1, 3).reshape(hidden_states.shape[0], hidden_states.shape[1], self.all_head_size)
    return context, (key, value)


def attention_modules(model: nn.Module):
    """The EVA ViT and Q-Former attention modules inside ``model`` (or ``model`` itself)."""
    from lavis.models.blip2_models.Qformer import BertSelfAttention
    from lavis.models.eva_vit import Attention

    return [m for m in model.modules() if isinstance(m, (Attention, BertSelfAttention))]


def frozen_llms(model: nn.Module):
    """transformers models inside ``model`` other than LAVIS's own Q-Former BERT."""
    from transformers import PreTrainedModel

    return [
        m for m in model.modules() if isinstance(m, PreTrainedModel) and not type(m).__module__.startswith("lavis.")
    ]


def set_attn_implementation(model: nn.Module, name: str, llm: bool = True) -> nn.Module:
    """Switch every EVA ViT / Q-Former attention in ``model`` to ``name`` (``sdpa`` | ``eager``).

    With ``llm`` also the frozen LLM (InternLM2, OPT), whose attention reads
    ``config._attn_implementation`` at every forward.  Takes effect at the next forward.
    """
    check_implementation(name)
    for module in attention_modules(model):
        module.attn_implementation = name
    if llm:
        for module in frozen_llms(model):
            module.config._attn_implementation = name
    return model


def install(cls, forward) -> None:
    """Make ``forward`` the forward of LAVIS's attention class ``cls``, its own kept for eager."""
    EAGER_FORWARDS[cls.__name__] = cls.forward
    cls.forward = forward
    # None: follow $BLIP2_INTERNLM_ATTN (default sdpa) until set_attn_implementation says otherwise
    cls.attn_implementation = None
