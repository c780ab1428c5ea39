"""Generation from soft-prompt embeddings without per-token work that grows with batch x beams.

:func:`generate_tokens` is ``llm.generate(inputs_embeds=..., attention_mask=..., **kwargs)`` with a
switch, ``implementation``:

* ``"transformers"``: ``llm.generate`` as it is (a ``DynamicCache``, transformers' eager loop);
* ``"static"`` (InternLM2, greedy, sampling and beam search): transformers still prepares the call
  (generation config, logits processors, stopping criteria, the per-beam expansion) and hands the
  decoding loop to :func:`decode_loop` through ``generate``'s ``custom_generate`` hook.  The loop is
  transformers' own ``_sample`` / ``_beam_search`` loop, token selection and bookkeeping done by the
  same ``GenerationMixin`` helpers, processors and stopping criteria, around a different model call:

  - the prefix (query embeddings and prompt) runs once per image, batch B, not once per beam
    (B x beams rows of identical work), and its keys/values stay shared by the image's beams: a
    beam reorder never copies them;
  - each generated token's keys/values go into a pre-allocated buffer of ``max_new_tokens`` slots,
    written in place; a beam reorder moves only this buffer;
  - in a step's attention the beams of one image are the query rows of one matmul against their
    shared prefix, plus a batched matmul against each beam's own slots, and one softmax (fp32) over
    both; no mask is built per step (the slot mask is a row of a table made once per call);
  - the step (token embedding to logits) has the same shapes at every step of a call, so
    ``compile`` runs it through ``torch.compile`` (by default on CUDA only);
  - on a CPU with bf16 weights, ``prepack`` reorders the LLM's linear weights once for oneDNN
    (:class:`PackedLinears`): the same products bit for bit, faster at decoding shapes;
  - transformers' min-length processors, which copy the whole (rows, vocabulary) scores at every
    step, are replaced by :class:`EosBan`, which sets the same scores in place.

Greedy and beam search give the tokens ``llm.generate`` gives (``tests/models/test_decode.py``: fp32,
left-padded prompts of different lengths, min/max lengths, two eos ids, several returned sequences).
The arithmetic of a step is the model's own modules in the same order; only the attention's
reductions are grouped differently (shared prefix and own slots), so in bf16 a near-tie between two
candidates can rarely resolve the other way.  Whatever the loop does not cover (another LLM class,
constrained or grouped beam search, beam sampling, ``return_dict_in_generate``, a cache passed in,
``synced_gpus``) runs transformers' own loop, with a one-time log line saying why.  docs/generation.md
has the measurements.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.utils import GENERATION_MODES_MAPPING

from blip2_internlm.hardware import onednn_runs
from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM, apply_rotary_pos_emb
from blip2_internlm.models.config import DECODE_IMPLEMENTATIONS

logger = logging.getLogger(__name__)


#: model kwargs ``generate`` hands a decoding method for an ``inputs_embeds`` call; any other means
#: a feature the static loop does not implement.
_HANDLED_MODEL_KWARGS = {"inputs_embeds", "attention_mask", "past_key_values", "use_cache", "logits_to_keep"}
_fallback_reasons_logged: set[str] = set()


def generate_tokens(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    implementation: str = "static",
    compile: bool | None = None,
    prepack: bool | None = None,
    **generate_kwargs,
) -> torch.LongTensor:
    """``llm.generate(inputs_embeds=..., attention_mask=..., **generate_kwargs)``: the new tokens, (rows x
    ``num_return_sequences``, longest), padded as ``generate`` pads them.

    ``implementation``: ``"static"`` (the loop of this module where it applies, see the module
    docstring) or ``"transformers"`` (``llm.generate`` as it is).  ``compile``: run the static loop's
    decoding step through ``torch.compile`` (a one-off compilation per shape family, slow to start);
    None compiles on CUDA only, where it pays (on the CPUs measured it does not: docs/generation.md).
    ``prepack``: the step's linear layers read weights reordered once for oneDNN (:class:`PackedLinears`;
    bf16 weights on a CPU only, identical results; a second copy of those weights while the model
    generates); None: wherever that applies.  Both are ignored by ``"transformers"``.
    """
    if implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"decode implementation {implementation!r}; expected one of {list(DECODE_IMPLEMENTATIONS)}")
    if "custom_generate" in generate_kwargs:
        raise ValueError("generate_tokens chooses the decoding loop itself; pass implementation=, not custom_generate=")
    if implementation == "static":
        compile, prepack, _ = resolve_step_options(llm, inputs_embeds.device, compile, prepack)
        generate_kwargs["custom_generate"] = functools.partial(decode_loop, compile_step=compile, prepack=prepack)
    return llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)


def resolve_step_options(llm: nn.Module, device, compile: bool | None, prepack: bool | None):
    """(compile, prepack, why not prepacked) of the static loop's step on ``device``: ``compile`` None
    compiles on CUDA only; ``prepack`` None packs wherever :class:`PackedLinears` applies and the step is
    not compiled; ``prepack=True`` where it cannot apply is an error saying why."""
    device = torch.device(device)
    if compile is None:
        compile = device.type == "cuda"
    why_not = PackedLinears.unavailable(llm, device)
    if prepack and why_not:
        raise ValueError(f"prepack=True: {why_not}")
    if prepack is None:
        prepack = why_not is None and not compile
    return bool(compile), bool(prepack), why_not


# --- the loop --------------------------------------------------------------------------------------


def decode_loop(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    *,
    compile_step: bool = False,
    prepack: bool = False,
    **model_kwargs,
) -> torch.LongTensor:
    """A ``custom_generate`` callable for ``GenerationMixin.generate``: transformers' greedy/sampling or
    beam-search loop over :class:`PrefixSharedDecoder` steps; transformers' own loop for what it does not cover."""
    mode = generation_config.get_generation_mode()
    reason = _unsupported(model, input_ids, generation_config, synced_gpus, model_kwargs, mode)
    if reason is not None:
        method_name = GENERATION_MODES_MAPPING.get(mode, "")
        if not method_name.startswith("_"):
            raise ValueError(
                f"generation mode {mode.value} is no longer in transformers' generate ({method_name or 'none'}); "
                "the static decoding loop cannot hand it over: use implementation='transformers'"
            )
        if reason not in _fallback_reasons_logged:
            _fallback_reasons_logged.add(reason)
            logger.info("static decoding does not apply (%s); transformers' %s runs", reason, method_name)
        # as generate looks its methods up: on the model's class, so that a model's override runs
        method = getattr(type(model), method_name)
        return method(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            **model_kwargs,
        )
    expanded = max(generation_config.num_beams, generation_config.num_return_sequences)
    steps = generation_config.max_length - input_ids.shape[1] - 1
    decoder = PrefixSharedDecoder(
        model,
        model_kwargs["inputs_embeds"],
        model_kwargs["attention_mask"],
        copies=expanded,
        max_steps=steps,
        compile_step=compile_step,
        prepack=prepack,
    )
    logits_processor = LogitsProcessorList(
        EosBan(processor) if isinstance(processor, EosBan.REPLACES) else processor for processor in logits_processor
    )
    if mode == GenerationMode.BEAM_SEARCH:
        return _beam_search(model, decoder, input_ids, logits_processor, stopping_criteria, generation_config)
    return _sample(decoder, input_ids, logits_processor, stopping_criteria, generation_config)


class EosBan(LogitsProcessor):
    """transformers' ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor`` with the same
    result: the eos columns at -inf while the sequence is shorter than the minimum.  Those copy the whole
    (rows, vocab) scores and build a vocabulary mask at every step, active or not, which at 40 rows x 32k
    costs more than the rest of the beam bookkeeping; this fills the eos columns in place (the loops here
    own the scores tensor)."""

    REPLACES = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)

    def __init__(self, processor: LogitsProcessor):
        if isinstance(processor, MinNewTokensLengthLogitsProcessor):
            self.shortest = processor.prompt_length_to_skip + processor.min_new_tokens
        else:
            self.shortest = processor.min_length
        self.eos_token_id = processor.eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.shortest:
            eos = self.eos_token_id.to(scores.device)
            # the originals match the ids against the vocabulary: an id outside it bans nothing
            eos = eos[(eos >= 0) & (eos < scores.shape[-1])]
            scores.index_fill_(-1, eos, float("-inf"))
        return scores


def _unsupported(model, input_ids, generation_config, synced_gpus, model_kwargs, mode) -> str | None:
    """Why the static loop cannot run this call, or None."""
    if not isinstance(model, InternLM2ForCausalLM):
        return f"{type(model).__name__} is not InternLM2ForCausalLM"
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH):
        return f"generation mode {mode.value}"
    if synced_gpus:
        return "synced_gpus"
    if generation_config.return_dict_in_generate:
        return "return_dict_in_generate"
    if generation_config.prefill_chunk_size is not None:
        return "prefill_chunk_size"
    if model_kwargs.get("inputs_embeds") is None or input_ids.shape[1] != 0:
        return "input_ids instead of inputs_embeds"
    extra = sorted(key for key, value in model_kwargs.items() if value is not None and key not in _HANDLED_MODEL_KWARGS)
    if extra:
        return f"model kwargs {extra}"
    cache = model_kwargs.get("past_key_values")
    if cache is not None and (not isinstance(cache, DynamicCache) or cache.get_seq_length() > 0):
        return "a cache passed in"
    if generation_config.max_length - input_ids.shape[1] < 1:
        return "no new tokens"
    return None


def _sample(decoder, input_ids, logits_processor, stopping_criteria, generation_config) -> torch.LongTensor:
    """``GenerationMixin._sample`` without outputs, streamer or synced GPUs, over the decoder's steps."""
    pad_token_id = generation_config._pad_token_tensor
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    next_token_logits = decoder.prefill()
    while True:
        next_token_scores = logits_processor(input_ids, next_token_logits)
        if generation_config.do_sample:
            probs = nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, None)
        if unfinished_sequences.max() == 0:
            return input_ids
        next_token_logits = decoder.step(next_tokens)


def _beam_search(model, decoder, input_ids, logits_processor, stopping_criteria, generation_config):
    """``GenerationMixin._beam_search`` without outputs or synced GPUs, over the decoder's steps: the same
    helpers choose the continuations, keep the finished beams and decide when to stop."""
    pad_token_id = generation_config._pad_token_tensor
    eos_token_id = generation_config._eos_token_tensor
    early_stopping = generation_config.early_stopping
    length_penalty = generation_config.length_penalty
    max_length = generation_config.max_length
    num_beams = generation_config.num_beams
    num_return_sequences = generation_config.num_return_sequences
    device = input_ids.device

    batch_size_unflattened, cur_len = input_ids.shape[:2]
    batch_size = batch_size_unflattened // num_beams
    vocab_size = model.config.get_text_config().vocab_size
    decoder_prompt_len = cur_len
    n_eos_tokens = eos_token_id.shape[0] if eos_token_id is not None else 0
    beams_to_keep = max(2, 1 + n_eos_tokens) * num_beams
    top_num_beam_mask = torch.cat(
        (torch.ones((num_beams), dtype=torch.bool), torch.zeros((beams_to_keep - num_beams), dtype=torch.bool)),
        dim=0,
    ).to(device)

    # transformers' fill value, its operator precedence included (a pad id of 0 falls back to the eos id)
    output_fill_value = pad_token_id or eos_token_id[0] if eos_token_id is not None else -1
    running_sequences = torch.full(
        (batch_size, num_beams, max_length), fill_value=output_fill_value, dtype=torch.int64, device=device
    )
    running_sequences[:, :, :cur_len] = model._unflatten_beam_dim(input_ids, batch_size, num_beams)
    sequences = running_sequences.detach().clone()
    running_beam_scores = torch.zeros((batch_size, num_beams), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch_size, num_beams), fill_value=-1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    is_early_stop_heuristic_unsatisfied = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    running_beam_indices = torch.full(
        (batch_size, num_beams, max_length - cur_len), fill_value=-1, dtype=torch.int32, device=device
    )
    beam_indices = running_beam_indices.detach().clone()

    logits = decoder.prefill()
    while True:
        flat_running_sequences = model._flatten_beam_dim(running_sequences[:, :, :cur_len])
        log_probs = nn.functional.log_softmax(logits, dim=-1)
        log_probs = logits_processor(flat_running_sequences, log_probs)
        log_probs = model._unflatten_beam_dim(log_probs, batch_size, num_beams)
        log_probs.add_(running_beam_scores[:, :, None])  # in place: the loop owns these scores
        log_probs = torch.reshape(log_probs, (batch_size, num_beams * vocab_size))

        topk_log_probs, topk_running_sequences, topk_running_beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs,
            running_sequences=running_sequences,
            running_beam_indices=running_beam_indices,
            cur_len=cur_len,
            decoder_prompt_len=decoder_prompt_len,
            do_sample=False,
            beams_to_keep=beams_to_keep,
            num_beams=num_beams,
            vocab_size=vocab_size,
            batch_size=batch_size,
        )
        next_token_hits_stopping_criteria = stopping_criteria(
            model._flatten_beam_dim(topk_running_sequences[:, :, : cur_len + 1]), None
        )
        next_token_hits_stopping_criteria = model._unflatten_beam_dim(
            next_token_hits_stopping_criteria, batch_size, beams_to_keep
        )
        running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs,
            topk_running_sequences=topk_running_sequences,
            topk_running_beam_indices=topk_running_beam_indices,
            next_token_hits_stopping_criteria=next_token_hits_stopping_criteria,
            num_beams=num_beams,
        )
        sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
            sequences=sequences,
            topk_running_sequences=topk_running_sequences,
            beam_scores=beam_scores,
            topk_log_probs=topk_log_probs,
            beam_indices=beam_indices,
            topk_running_beam_indices=topk_running_beam_indices,
            is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
            is_sent_finished=is_sent_finished,
            next_token_hits_stopping_criteria=next_token_hits_stopping_criteria,
            top_num_beam_mask=top_num_beam_mask,
            num_beams=num_beams,
            cur_len=cur_len,
            decoder_prompt_len=decoder_prompt_len,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        beam_idx = model._flatten_beam_dim(running_beam_indices[..., cur_len - decoder_prompt_len])
        cur_len = cur_len + 1
        is_early_stop_heuristic_unsatisfied = model._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=is_early_stop_heuristic_unsatisfied,
            running_beam_scores=running_beam_scores,
            beam_scores=beam_scores,
            is_sent_finished=is_sent_finished,
            cur_len=cur_len,
            max_length=max_length,
            decoder_prompt_len=decoder_prompt_len,
            early_stopping=early_stopping,
            length_penalty=length_penalty,
        )
        unfinished = model._beam_search_has_unfinished_sequences(
            is_early_stop_heuristic_unsatisfied, is_sent_finished, next_token_hits_stopping_criteria, early_stopping
        )
        if not unfinished:
            break
        # each beam feeds the token it chose last; the buffer follows the beams it came from
        logits = decoder.step(model._flatten_beam_dim(running_sequences[:, :, cur_len - 1]), reorder=beam_idx)

    sequences = model._flatten_beam_dim(sequences[:, :num_return_sequences, :])
    beam_indices = model._flatten_beam_dim(beam_indices[:, :num_return_sequences, :])
    max_generated_length = ((beam_indices + 1).bool()).sum(dim=1).max()
    return sequences[:, : decoder_prompt_len + max_generated_length]


# --- the model step ---------------------------------------------------------------------------------


class PrefixSharedDecoder:
    """One ``generate`` call's model state: the prefix's keys/values once per image, a slot buffer per row.

    ``inputs_embeds`` / ``attention_mask``: as ``generate`` expanded them, each image's row repeated
    ``copies`` times in a row (beams, or returned samples).  :meth:`prefill` runs the prefix at one row
    per image and gives the first logits for every row; :meth:`step` feeds one token per row.
    """

    def __init__(
        self,
        llm: InternLM2ForCausalLM,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        copies: int,
        max_steps: int,
        compile_step: bool = False,
        prepack: bool = False,
    ):
        if compile_step and prepack:
            raise ValueError("a compiled step cannot call oneDNN's packed linear; choose compile or prepack")
        self.llm, self.copies = llm, copies
        self.embeds = inputs_embeds[::copies].contiguous()
        self.mask = attention_mask[::copies].contiguous()
        self.rows = inputs_embeds.shape[0]
        self.slots = max(max_steps, 1)
        self.done = 0  # tokens fed so far
        self.step_fn = _compiled_step() if compile_step else decode_step
        self.linear = PackedLinears.of(llm) if prepack else call_linear

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Float32 logits (rows, vocab) of the token after the prefix; keeps the prefix's keys/values."""
        llm, mask, embeds = self.llm, self.mask, self.embeds
        images, length = mask.shape
        device = embeds.device
        # as GenerationMixin.prepare_inputs_for_generation derives them
        position_ids = mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        cache = DynamicCache(config=llm.config)
        out = llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.arange(length, device=device),
            logits_to_keep=1,
            return_dict=True,
        )
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        # float32 once here rather than at every step: the step's attention runs in float32
        self.prefix_keys = torch.stack([layer.keys for layer in cache.layers]).float()  # (layers, images, kv, L, D)
        self.prefix_values = torch.stack([layer.values for layer in cache.layers]).float()
        del out, cache

        config = llm.config
        layers, kv_heads, head_dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        # the k and v of every layer in one float32 tensor (written once per token, read at every step), so
        # that a beam reorder is one index_select, from this buffer into its twin: no allocation per step,
        # and only the slots written so far move (the others are hidden by the slot mask)
        shape = (2 * layers, self.rows, kv_heads, self.slots, head_dim)
        self.buffer = torch.zeros(shape, dtype=torch.float32, device=device)
        self.spare = torch.zeros(shape, dtype=torch.float32, device=device)
        prefix_bias = torch.zeros(images, 1, 1, length, dtype=torch.float32, device=device)
        self.prefix_bias = prefix_bias.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        slot = torch.arange(self.slots, device=device)
        self.slot_bias = torch.zeros(self.slots, self.slots, dtype=torch.float32, device=device).masked_fill(
            slot[None, :] > slot[:, None], float("-inf")
        )
        # a generated token's position continues its row's count of attended prefix tokens
        self.cos, self.sin = self._rotary_tables(mask.long().sum(-1), embeds)
        return logits.repeat_interleave(self.copies, dim=0)

    def _rotary_tables(self, first_position: torch.Tensor, like: torch.Tensor):
        """cos/sin (images, slots, head_dim) of the generated tokens' positions, computed as the model
        computes them in a step: a dynamic-NTK rope rescales by the largest position in the call, so
        when the steps would cross its threshold each step's table is its own call."""
        rotary = self.llm.model.rotary_emb
        positions = first_position[:, None] + torch.arange(self.slots, device=like.device)[None, :]
        if rotary.scaling_type == "dynamic" and int(positions.max()) + 1 > rotary.max_position_embeddings:
            tables = [rotary(like, positions[:, s : s + 1]) for s in range(self.slots)]
            return torch.cat([c for c, _ in tables], dim=1), torch.cat([s for _, s in tables], dim=1)
        return rotary(like, positions)

    @torch.no_grad()
    def step(self, tokens: torch.LongTensor, reorder: torch.LongTensor | None = None) -> torch.Tensor:
        """Float32 logits (rows, vocab) after feeding ``tokens`` (rows,); ``reorder``: the row each row's
        history comes from (a beam search's choice), applied to the slot buffer first."""
        if self.done >= self.slots:
            raise RuntimeError(f"decoder was sized for {self.slots} steps")
        if reorder is not None and self.done:
            written = self.done
            torch.index_select(self.buffer[..., :written, :], 1, reorder, out=self.spare[..., :written, :])
            self.buffer, self.spare = self.spare, self.buffer
        slot = torch.tensor([self.done], device=tokens.device)
        logits = self.step_fn(
            self.llm,
            tokens,
            slot,
            self.cos,
            self.sin,
            self.prefix_keys,
            self.prefix_values,
            self.prefix_bias,
            self.buffer,
            self.slot_bias,
            self.copies,
            self.linear,
        )
        self.done += 1
        return logits


def decode_step(
    llm: InternLM2ForCausalLM,
    tokens: torch.LongTensor,
    slot: torch.LongTensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_bias: torch.Tensor,
    buffer: torch.Tensor,
    slot_bias: torch.Tensor,
    copies: int,
    linear=None,
) -> torch.Tensor:
    """One token per row through the InternLM2 layers: float32 logits (rows, vocab).

    ``tokens`` (rows,) go into ``slot`` (1,) of ``buffer`` (2 x layers, rows, kv heads, slots, dim;
    float32), in place; rows ``i * copies ...`` share image ``i``'s prefix keys/values (layers, images,
    kv heads, L, dim; float32) and ``prefix_bias`` (images, 1, 1, L: 0 or -inf); ``slot_bias`` row ``s``
    opens slots ``<= s``.  ``linear(module, x)`` applies each linear layer (default: the module itself;
    :class:`PackedLinears` reads packed weights).
    The modules are the model's own, called in its order.
    """
    linear = linear or call_linear
    model = llm.model
    hidden = model.tok_embeddings(tokens[:, None])
    cos = cos_table.index_select(1, slot).repeat_interleave(copies, dim=0)
    sin = sin_table.index_select(1, slot).repeat_interleave(copies, dim=0)
    images = prefix_bias.shape[0]
    bias = torch.cat([prefix_bias, slot_bias.index_select(0, slot)[None, None].expand(images, 1, 1, -1)], dim=-1)
    for index, layer in enumerate(model.layers):
        attention = layer.attention
        query, key, value = attention.split_qkv(linear(attention.wqkv, layer.attention_norm(hidden)))
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        buffer[2 * index].index_copy_(2, slot, key.float())
        buffer[2 * index + 1].index_copy_(2, slot, value.float())
        attn_output = shared_prefix_attention(
            query, prefix_keys[index], prefix_values[index], buffer[2 * index], buffer[2 * index + 1], bias, copies
        )
        hidden = hidden + linear(attention.wo, attn_output)
        mlp, normed = layer.feed_forward, layer.ffn_norm(hidden)  # InternLM2MLP.forward, linear by linear
        hidden = hidden + linear(mlp.w2, mlp.act_fn(linear(mlp.w1, normed)) * linear(mlp.w3, normed))
    hidden = model.norm(hidden)
    return linear(llm.output, hidden)[:, -1, :].float()


def call_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class PackedLinears:
    """``linear(module, x)`` for :func:`decode_step` over weights reordered once for oneDNN.

    ``F.linear`` on a CPU hands oneDNN a plain weight, which it reorders into its blocked layout at every
    call; at decoding shapes (tens of rows) that is a large part of the call.  Reordered once
    (``mkldnn._reorder_linear_weight``, what Inductor's weight freezing does) and applied by
    ``mkldnn._linear_pointwise``, the products are the same bit for bit in bf16 and measured faster
    (docs/generation.md, "Packed weights").  Only for bf16 weights: in fp32 oneDNN's kernel for the
    packed weight rounds differently from the unpacked one.

    The packed weights are kept on the model (one more copy of its linear weights) and rebuilt when a
    weight changes (its storage or version), e.g. after ``load_state_dict``.
    """

    ATTRIBUTE = "_decode_packed_linears"

    def __init__(self, llm: nn.Module):
        self.modules = [module for module in llm.modules() if isinstance(module, nn.Linear)]
        self.key = self.weights_key(self.modules)
        self.packed = {
            id(module): torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1) for module in self.modules
        }

    @staticmethod
    def weights_key(modules) -> tuple:
        return tuple((module.weight.data_ptr(), module.weight._version) for module in modules)

    @classmethod
    def of(cls, llm: nn.Module) -> PackedLinears:
        """The model's packed weights, packed now if they are missing or stale."""
        packed = llm.__dict__.get(cls.ATTRIBUTE)
        if packed is None or packed.key != cls.weights_key(packed.modules):
            packed = cls(llm)
            llm.__dict__[cls.ATTRIBUTE] = packed  # not a submodule or buffer: never saved, never moved
        return packed

    @staticmethod
    def unavailable(llm: nn.Module, device: torch.device) -> str | None:
        """Why packing does not apply to this model on this device, or None."""
        if torch.device(device).type != "cpu":
            return f"packed oneDNN weights are for the CPU, not {device}"
        if any(hasattr(module, "base_layer") for module in llm.modules()):
            return "adapters (LoRA) wrap the linear layers; merge them (models/lora.py) to pack the weights"
        dtypes = {module.weight.dtype for module in llm.modules() if isinstance(module, nn.Linear)}
        if dtypes != {torch.bfloat16}:
            return (
                f"the LLM's linear weights are {sorted(map(str, dtypes))}, packing keeps results identical in bf16 only"
            )
        if not onednn_runs(torch.bfloat16):
            return "this CPU or torch build runs no oneDNN bf16 matmul"
        return None

    def __call__(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[id(module)], module.bias, "none", [], "")

    def __reduce__(self):
        # oneDNN's opaque tensors can be neither copied nor pickled: a deep copy or a pickle of the model
        # carries no packed weights (the copy packs its own when it generates)
        return _no_packed_linears, ()


def _no_packed_linears() -> None:
    return None


def shared_prefix_attention(query, prefix_keys, prefix_values, own_keys, own_values, bias, copies: int):
    """Attention of one query token per row over its image's prefix and its own slots, in float32
    (also inside an autocast region, which would run the matmuls in its lower precision).

    query (rows, heads, 1, D); prefix_* (images, kv heads, L, D); own_* (rows, kv heads, slots, D);
    bias (images, 1, 1, L + slots).  Returns (rows, 1, heads * D) in the query's dtype.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        return _float32_attention(query, prefix_keys, prefix_values, own_keys, own_values, bias, copies)


def _float32_attention(query, prefix_keys, prefix_values, own_keys, own_values, bias, copies: int):
    rows, heads, _, dim = query.shape
    images, kv_heads, length, _ = prefix_keys.shape
    slots = own_keys.shape[2]
    groups = heads // kv_heads
    # head h = kv_head * groups + g (the wqkv layout); row r = image * copies + copy
    q = query.float().reshape(images, copies, kv_heads, groups, dim)
    q_by_image = q.permute(0, 2, 1, 3, 4).reshape(images, kv_heads, copies * groups, dim)
    own_k = own_keys.float().view(images, copies, kv_heads, slots, dim)
    own_v = own_values.float().view(images, copies, kv_heads, slots, dim)
    prefix_scores = torch.matmul(q_by_image, prefix_keys.float().transpose(-1, -2))
    own_scores = torch.matmul(q, own_k.transpose(-1, -2))  # (images, copies, kv heads, groups, slots)
    own_scores = own_scores.permute(0, 2, 1, 3, 4).reshape(images, kv_heads, copies * groups, slots)
    scores = torch.cat([prefix_scores, own_scores], dim=-1) / math.sqrt(dim) + bias
    probs = torch.softmax(scores, dim=-1)
    prefix_probs, own_probs = probs.split([length, slots], dim=-1)
    out = torch.matmul(prefix_probs, prefix_values.float()).view(images, kv_heads, copies, groups, dim)
    own_probs = own_probs.reshape(images, kv_heads, copies, groups, slots).permute(0, 2, 1, 3, 4)
    out = out.permute(0, 2, 1, 3, 4) + torch.matmul(own_probs, own_v)
    return out.reshape(rows, 1, heads * dim).to(query.dtype)


@functools.cache
def _compiled_step():
    # One compiled function for the process; dynamo guards (and recompiles) per model and shape family.
    # Inductor would otherwise keep a fused chain of bf16 ops in float32, which in bf16 changed some beams
    # against the eager step; rounding where eager rounds gives the eager step's tokens.
    return torch.compile(decode_step, fullgraph=True, options={"emulate_precision_casts": True})


# --- measuring --------------------------------------------------------------------------------------


def time_generation(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    variants: dict[str, dict],
    new_tokens: int,
    repeats: int = 3,
    **generate_kwargs,
) -> dict[str, dict]:
    """Median ms per ``generate_tokens`` call and per decoding step of each variant, measured interleaved.

    ``variants``: name -> ``generate_tokens`` options (``implementation``, ``compile``).  Every call
    generates exactly ``new_tokens`` (min = max); a step's time is (call with ``new_tokens`` - call with
    one token) / (``new_tokens`` - 1), so the prefill and the per-call set-up cancel out.  One warm-up
    call per variant and length first (it includes any compilation, reported as ``first_call_ms``).
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to separate the steps from the prefill")

    def call(options, tokens):
        start = time.perf_counter()
        generate_tokens(
            llm,
            inputs_embeds,
            attention_mask,
            **options,
            **{**generate_kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens},
        )
        if inputs_embeds.is_cuda:
            torch.cuda.synchronize(inputs_embeds.device)
        return (time.perf_counter() - start) * 1000

    first = {name: call(options, new_tokens) for name, options in variants.items()}
    for options in variants.values():
        call(options, 1)
    full = {name: [] for name in variants}
    single = {name: [] for name in variants}
    for _ in range(repeats):
        for name, options in variants.items():
            full[name].append(call(options, new_tokens))
            single[name].append(call(options, 1))
    results = {}
    for name in variants:
        call_ms, prefill_ms = statistics.median(full[name]), statistics.median(single[name])
        results[name] = dict(
            call_ms=round(call_ms, 2),
            one_token_call_ms=round(prefill_ms, 2),
            step_ms=round((call_ms - prefill_ms) / (new_tokens - 1), 2),
            first_call_ms=round(first[name], 1),
        )
    return results


__all__ = [
    "EosBan",
    "PackedLinears",
    "PrefixSharedDecoder",
    "decode_loop",
    "decode_step",
    "generate_tokens",
    "resolve_step_options",
    "shared_prefix_attention",
    "time_generation",
]
