"""PyTorch InternLM2, loading the official checkpoints' weights as they are.

Numerics follow the official ``modeling_internlm2.py`` (RMSNorm in fp32, rotary
tables in fp32 cast to the activation dtype, softmax in fp32); the structure follows
transformers' Llama. Parameter names are the official ones (``tok_embeddings``,
``attention.wqkv``, ``feed_forward.w1/w2/w3``, ``output``...).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration import InternLM2Config
from .errors import InternLM2CheckpointError, describe_load_failure


class InternLM2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        # Cast back before the weight multiply, as the official model does.
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _inv_freq(base: float | torch.Tensor, dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin tables for all layers, computed once per forward.

    ``linear`` divides positions by the factor. ``dynamic`` (NTK) enlarges the base
    once the largest position in the call exceeds ``max_position_embeddings``, with
    the official formula evaluated in float32 tensors as the official code does. The
    official module also keeps the enlarged ``inv_freq`` for later, shorter calls;
    here every call is computed from its own positions (same result whenever
    positions only grow, as in generation).
    """

    inv_freq: torch.Tensor

    def __init__(self, config: InternLM2Config, device=None):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_position_embeddings = config.max_position_embeddings
        self.scaling_type = config.rope_scaling_type
        self.scaling_factor = config.rope_scaling_factor
        self.register_buffer("inv_freq", _inv_freq(self.base, self.dim, device), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(x.device)
        positions = position_ids.float()
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        elif self.scaling_type == "dynamic":
            seq_len = torch.max(position_ids) + 1
            factor = self.scaling_factor
            base = self.base * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
            # A select, not a Python branch on a tensor, so that torch.compile traces one graph; the
            # unselected (possibly NaN) table is discarded.
            inv_freq = torch.where(
                seq_len > self.max_position_embeddings, _inv_freq(base, self.dim, x.device), inv_freq
            )
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        # bf16 positions lose precision at long context, so the tables stay fp32 until the end.
        with torch.autocast(device_type=device_type, enabled=False):
            freqs = positions[..., None] * inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), kv head i serving heads i*n_rep.."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(module.head_dim)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, :kv_len]
    elif q_len > 1 and q_len != kv_len:
        # SDPA's is_causal aligns top-left; a chunk after a cache needs bottom-right.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    attn_output = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=attention_mask is None and q_len > 1,
    )
    return attn_output.transpose(1, 2).contiguous(), None


ATTENTION_FUNCTIONS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention}


def build_causal_mask(
    implementation: str,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    cache_position: torch.LongTensor,
    kv_length: int,
    fixed_length: bool = False,
) -> torch.Tensor | None:
    """4D mask (batch, 1, q_len, kv_len): bool "may attend" for sdpa, additive float for eager.

    transformers' vmap-based ``create_causal_mask`` was measured slower per decoding step on
    a CPU than the tiny model's whole step (docs/internlm2.md), hence this direct construction.
    Returns None for sdpa when causality alone suffices (no padding, and the query is
    a single token or the whole sequence). A 4D mask passed in is used as it is.

    ``fixed_length``: the keys are a pre-allocated cache (``StaticCache``) of ``kv_length``
    slots, of which only those up to ``cache_position`` are written. The mask is then always
    built (unwritten slots must be hidden) and built without reading the mask's values on the
    host, so that a compiled step is one graph; a 2D mask shorter than the cache is extended
    (the causal condition hides the slots it does not cover).
    """
    dtype, device = inputs_embeds.dtype, inputs_embeds.device
    batch, q_len = inputs_embeds.shape[:2]
    if attention_mask is not None and attention_mask.dim() == 4:
        if implementation == "eager" and attention_mask.dtype == torch.bool:
            return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        return attention_mask
    if fixed_length:
        padded = attention_mask is not None
        if padded and attention_mask.shape[-1] < kv_length:
            attention_mask = F.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]), value=1)
    else:
        padded = attention_mask is not None and not bool(attention_mask[:, :kv_length].all())
        if implementation == "sdpa" and not padded and (q_len == 1 or q_len == kv_length):
            return None
    allowed = torch.arange(kv_length, device=device)[None, :] <= cache_position[:, None]
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_length)
    if padded:
        allowed = allowed & attention_mask[:, None, None, :kv_length].bool()
    if implementation == "sdpa":
        # Rows of left-padding queries would be all False and turn into NaN; their
        # outputs are never read, so let them attend anywhere.
        return allowed | ~allowed.any(dim=-1, keepdim=True)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class InternLM2Attention(nn.Module):
    """Grouped-query attention with the official fused ``wqkv`` projection.

    ``wqkv`` rows come in ``num_key_value_heads`` groups; each group holds the
    ``num_attention_heads // num_key_value_heads`` query heads that share a key/value
    head, then that key head, then that value head, each ``head_dim`` rows.
    """

    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, seq, wqkv rows) -> q (batch, heads, seq, dim), k and v (batch, kv_heads, seq, dim)."""
        batch, seq_len, _ = qkv.shape
        qkv = qkv.view(batch, seq_len, self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        query = qkv[..., : self.num_key_value_groups, :].reshape(batch, seq_len, self.num_heads, self.head_dim)
        return query.transpose(1, 2), qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        query, key, value = self.split_qkv(self.wqkv(hidden_states))
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)

        if past_key_values is not None:
            key, value = past_key_values.update(
                key, value, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position}
            )

        implementation = self.config._attn_implementation or "eager"
        if implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(f"InternLM2 supports attn_implementation 'eager' or 'sdpa', not {implementation!r}")
        attn_output, attn_weights = ATTENTION_FUNCTIONS[implementation](self, query, key, value, attention_mask)
        attn_output = attn_output.reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.wo(attn_output), attn_weights


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # down
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, attn_weights = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache_position=cache_position,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
        return hidden_states, attn_weights


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # A decoding step with a StaticCache (generate(cache_implementation="static")) traces as one graph.
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, InternLM2RMSNorm):
            module.weight.data.fill_(1.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, failing loudly (naming the files) when a local
        checkpoint does not fit: wrong shapes, a missing shard, unreadable files, or
        parameters the checkpoint lacks (which transformers would silently random-init).
        Pass ``allow_missing_weights=True`` to accept the latter.
        """
        allow_missing = kwargs.pop("allow_missing_weights", False)
        local_dir = (
            os.fspath(pretrained_model_name_or_path)
            if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path)
            else None
        )
        if local_dir is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except Exception as err:  # re-raised with the checkpoint's files named
            raise InternLM2CheckpointError(describe_load_failure(local_dir, err, model_cls=cls)) from err
        if info.get("missing_keys") and not allow_missing:
            raise InternLM2CheckpointError(describe_load_failure(local_dir, None, missing=sorted(info["missing_keys"])))
        return (model, info) if wants_info else model


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [InternLM2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputed layers would append to the cache twice
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError("output_attentions=True needs attn_implementation='eager'")

        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        if cache_position is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            cache_position = torch.arange(past_seen, past_seen + inputs_embeds.shape[1], device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)

        # A dynamic cache's keys end with this call's tokens; a static cache's keys are all its slots.
        if past_key_values is not None:
            kv_length = past_key_values.get_mask_sizes(cache_position, 0)[0]
        else:
            kv_length = inputs_embeds.shape[1]
        causal_mask = build_causal_mask(
            self.config._attn_implementation or "eager",
            attention_mask,
            inputs_embeds,
            cache_position,
            kv_length,
            fixed_length=past_key_values is not None and past_key_values.is_compileable,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            # hidden_states goes positionally so that reentrant checkpointing sees it.
            hidden_states, attn_weights = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                cache_position=cache_position,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["output.weight"]

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.output = new_embeddings

    def get_decoder(self) -> InternLM2Model:
        return self.model

    def set_decoder(self, decoder: InternLM2Model) -> None:
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        return_dict = self.config.use_return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        hidden_states = outputs.last_hidden_state
        # Generation needs only the last position; skipping the rest saves a vocab-sized matmul.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.output(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "InternLM2PreTrainedModel",
    "InternLM2Model",
    "InternLM2ForCausalLM",
    "InternLM2RMSNorm",
    "InternLM2RotaryEmbedding",
    "InternLM2Attention",
    "InternLM2MLP",
    "InternLM2DecoderLayer",
]
