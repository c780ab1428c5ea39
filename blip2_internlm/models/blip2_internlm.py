"""BLIP-2 with a frozen decoder-only LLM (InternLM2 by default): ``arch: blip2_internlm``.

image -> frozen ViT -> ``ln_vision`` -> Q-Former queries -> ``llm_proj`` -> soft prompt of
the frozen LLM.  The LLM sees, per sample::

    [query embeddings] <s> prompt text </s> [pad ...]          (training, right padding)
    [pad ...] [query embeddings] <s> prompt                    (generation, left padding)

What the original port got wrong, and how this file avoids it:

* InternLM2's pad token is ``</s>``, the end-of-text marker itself.  Labels are masked by
  the attention mask, never by ``input_ids == pad_token_id``, so ``</s>`` is learned and
  generation can stop on it.
* Generation stops on ``</s>`` and on the tokenizer's real newline token (a byte piece,
  not a ``▁`` piece), and the decoded text is cut at the first newline.
* Prompts of different lengths in one batch are left-padded *before* the queries, so every
  sample's text starts right after its own prompt.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base, disabled_train
from torch import nn

from blip2_internlm.compat.distributed import collective_device
from blip2_internlm.dtypes import dtype_name
from blip2_internlm.hardware import describe_machine, log_resolved_defaults, target_device
from blip2_internlm.models.attention import resolve_attn_implementation, set_attn_implementation
from blip2_internlm.models.builders import FILES, WeightSource, build_qformer, build_vision_encoder, load_frozen_llm
from blip2_internlm.models.config import Blip2InternLMConfig
from blip2_internlm.models.cpu_linear import cpu_fp32_linear_context, resolve_cpu_fp32_linear
from blip2_internlm.models.decode import generate_tokens, resolve_step_options
from blip2_internlm.models.llm_inputs import (
    checkpoint_frozen_llm_layers,
    generation_embeds,
    resolve_autocast_dtype,
    training_tokens,
)
from blip2_internlm.paths import MODEL_CONFIG_DIR

# Trailing punctuation (ASCII and full-width) that VQAEval would count against a bare answer.
_TRAILING_PUNCT = re.compile(r"[\s.,!?;:。，！？；：、]+$")


@registry.register_model("blip2_internlm")
class Blip2InternLM(Blip2Base):
    PRETRAINED_MODEL_CONFIG_DICT = {
        name: os.path.join(MODEL_CONFIG_DIR, f"blip2_internlm_{name}.yaml")
        for name in ("tiny", "pretrain_internlm2_1.8b", "caption_coco_internlm2_1.8b", "pretrain_internlm2_7b")
    }
    checkpoint_required_prefixes = ("Qformer.", "query_tokens")

    config_class = Blip2InternLMConfig

    def __init__(self, config: Blip2InternLMConfig, weights: WeightSource = FILES):
        """The model ``config`` describes; ``weights``: from the files its values name (default), random or meta."""
        super().__init__()
        self.model_config = config
        with weights.building():
            self._build(config, weights)

    def _build(self, config: Blip2InternLMConfig, weights: WeightSource) -> None:
        self.visual_encoder, self.ln_vision = build_vision_encoder(
            config.vit_model,
            config.image_size,
            config.drop_path_rate,
            config.use_grad_checkpoint,
            config.vit_precision,
            config.vit_weights,
            weights,
        )
        if config.freeze_vit:
            for param in self.visual_encoder.parameters():
                param.requires_grad = False
            self.visual_encoder = self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train

        self.Qformer, self.query_tokens = build_qformer(
            config.qformer_text_model,
            config.num_query_token,
            self.visual_encoder.num_features,
            config.cross_attention_freq,
            weights,
        )
        self._trim_qformer(weights)

        self.llm_tokenizer, self.llm_model = load_frozen_llm(
            config.llm_model, config.llm_precision, weights=weights, load_in_4bit=self._llm_in_4bit(config)
        )
        # ViT and Q-Former attention, and the LLM's (config key, else $BLIP2_INTERNLM_ATTN, else sdpa)
        set_attn_implementation(self, resolve_attn_implementation(config.attn_implementation))
        self.llm_proj = nn.Linear(self.Qformer.config.hidden_size, self.llm_model.get_input_embeddings().embedding_dim)

        self.prompt = config.prompt
        self.max_txt_len = config.max_txt_len
        self.stop_token_ids = stop_token_ids(self.llm_tokenizer)
        self._apply_lemmatizer = config.apply_lemmatizer
        self._lemmatizer = None
        self.autocast_dtype = config.autocast_dtype
        # None: the LLM config's default (transformers builds a KV cache the loss never reads);
        # checkpointed layers must not build one: their recomputation would append to it again
        self._train_use_cache = None if config.llm_train_kv_cache and not config.llm_grad_checkpoint else False
        if config.llm_grad_checkpoint:
            checkpoint_frozen_llm_layers(self.llm_model)
        self.lm_head_on_labels_only = config.lm_head_on_labels_only
        if weights.kind != "meta":
            log_resolved_defaults(self.resolved_defaults(weights.target_device if weights.device else target_device()))

    def _llm_in_4bit(self, config) -> bool:
        """Whether the frozen LLM's weights are loaded in 4 bits (QLoRA: the instruction model's ``llm_lora``)."""
        return False

    def _trim_qformer(self, weights: WeightSource) -> None:
        """Stage 2 uses the Q-Former's query path only: its text embeddings, text feed-forward and LM head go."""
        self.Qformer.cls = None
        self.Qformer.bert.embeddings.word_embeddings = None
        self.Qformer.bert.embeddings.position_embeddings = None
        for layer in self.Qformer.bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

    def resolved_defaults(self, device=None) -> dict:
        """What each ``auto`` (or null) key of the model config is on ``device`` (default: where the
        model is), with the machine it was decided on: printed once when the model is built, kept in the
        benchmark's JSON and in every checkpoint the runner saves."""
        device = torch.device(device if device is not None else self.query_tokens.device)
        config = self.model_config
        llm_dtype = next(self.llm_model.parameters()).dtype
        autocast = resolve_autocast_dtype(config.autocast_dtype, device)
        try:
            compile, prepack, why_not = resolve_step_options(
                self.llm_model, device, config.decode_compile, config.decode_prepack
            )
        except ValueError as err:  # decode_prepack: true where it cannot apply: generate() will say so
            compile, prepack, why_not = config.decode_compile, f"error: {err}", None
        linear = "under autocast" if autocast is not None else resolve_cpu_fp32_linear(config.cpu_fp32_linear, device)
        return dict(
            device=str(device),
            machine=describe_machine() if device.type == "cpu" else torch.cuda.get_device_name(device),
            llm_precision=dict(setting=config.llm_precision, resolved=dtype_name(llm_dtype)),
            autocast_dtype=dict(setting=config.autocast_dtype, resolved=dtype_name(autocast) if autocast else "off"),
            cpu_fp32_linear=dict(
                setting=config.cpu_fp32_linear, resolved=linear if device.type == "cpu" else "not a CPU"
            ),
            decode_prepack=dict(setting=config.decode_prepack, resolved=prepack, why_not=why_not),
            decode_compile=dict(setting=config.decode_compile, resolved=compile),
        )

    # --- shared front end ---------------------------------------------------------------

    def compute_region(self):
        """The compute region of ViT, Q-Former and LLM: ``model.autocast_dtype``'s autocast, and outside
        autocast on a CPU, ``model.cpu_fp32_linear``'s kernel for fp32 linears."""
        device = self.query_tokens.device
        dtype = resolve_autocast_dtype(self.autocast_dtype, device)
        region = contextlib.ExitStack()
        if dtype is not None:
            region.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        region.enter_context(cpu_fp32_linear_context(self.model_config.cpu_fp32_linear, device, dtype))
        return region

    def maybe_autocast(self, dtype=None):
        """LAVIS's name for the compute region, which code written for LAVIS's BLIP-2 models calls; the
        region is ``compute_region()``'s whatever ``dtype`` asks (the model config decides it)."""
        return self.compute_region()

    def image_embeds(self, samples) -> torch.Tensor:
        """``ln_vision`` of the frozen ViT's output: (B, N_tokens, vit_width).  The ViT output comes
        from ``samples["vit_embeds"]`` when present (``blip2_internlm.feature_cache``), else from
        ``samples["image"]``; ``ln_vision`` trains, so it always runs here."""
        with self.compute_region():
            vit_embeds = samples.get("vit_embeds")
            if vit_embeds is None:
                vit_embeds = self.visual_encoder(samples["image"])
            return self.ln_vision(vit_embeds.to(self.device))

    def query_embeds(self, image: torch.Tensor = None, image_embeds: torch.Tensor = None) -> torch.Tensor:
        """The LLM-space soft prompt for a batch of images (or their ``image_embeds``).

        Returns (B, num_query_token, llm_width)."""
        if image_embeds is None:
            image_embeds = self.image_embeds({"image": image})
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        with self.compute_region():
            query_output = self.Qformer.bert(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
        return self.llm_proj(query_output.last_hidden_state).to(self.llm_model.dtype)

    def prompts_for(self, samples, batch_size: int, prompt=None) -> list[str]:
        prompts = samples.get("prompt", prompt if prompt is not None else self.prompt)
        prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch_size:
            raise ValueError(f"samples['prompt'] has {len(prompts)} prompts for {batch_size} images")
        return prompts

    # --- training ------------------------------------------------------------------------

    def text_tokens(self, prompts: Sequence[str], texts: Sequence[str]):
        """Right-padded ``<s> prompt text </s>`` ids, attention mask and labels.

        Labels are -100 on ``<s>``, the prompt and padding.  A text longer than what
        ``max_txt_len`` leaves after the prompt is cut and gets no ``</s>``, so the model is
        never taught to stop mid-sentence; a prompt that leaves no room is an error.
        """
        return training_tokens(self.llm_tokenizer, prompts, texts, self.max_txt_len)

    def forward(self, samples):
        """``{"loss": ..., "loss_tokens": ...}``: the next-token loss of the captions and how many
        label tokens this process holds (a 0-d long tensor).

        Alone, or without gradients (evaluation), ``loss`` is the mean over this batch's label
        tokens.  In distributed training (gradients enabled, world size > 1) each rank returns
        ``sum of its token losses * world_size / global label tokens``, so DDP's gradient average
        is the gradient of the mean over every label token of the global batch, however the
        tokens are spread over the ranks.  That per-rank ``loss`` is then not the global mean:
        its average over the ranks is.  Without gradients, the global mean is
        ``sum(loss * loss_tokens) / sum(loss_tokens)`` over the ranks.
        """
        image_embeds = self.image_embeds(samples)
        texts = samples["text_input"]
        if len(texts) != image_embeds.size(0):
            raise ValueError(f"batch has {image_embeds.size(0)} images but {len(texts)} texts")
        queries = self.query_embeds(image_embeds=image_embeds)
        input_ids, text_atts, text_targets = (
            t.to(queries.device) for t in self.text_tokens(self.prompts_for(samples, len(texts)), texts)
        )

        return self.language_model_loss(queries, input_ids, text_atts, text_targets)

    def language_model_loss(self, queries, input_ids, text_atts, text_targets) -> dict:
        """``forward``'s result for the soft prompt ``queries`` followed by right-padded text tokens and labels."""
        query_atts = torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device)
        query_targets = torch.full(query_atts.shape, -100, dtype=torch.long, device=queries.device)
        inputs_embeds = torch.cat([queries, self.llm_model.get_input_embeddings()(input_ids)], dim=1)
        attention_mask = torch.cat([query_atts, text_atts], dim=1)
        labels = torch.cat([query_targets, text_targets], dim=1)
        loss_tokens = label_token_count(labels)
        num_items_in_batch = cross_rank_token_normaliser(loss_tokens)
        with self.compute_region():
            if not self.lm_head_on_labels_only:
                # transformers' own way to divide by a token count other than the local one
                normaliser = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
                loss = self.llm_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    labels=labels,
                    return_dict=True,
                    use_cache=self._train_use_cache,
                    **normaliser,
                ).loss
            else:
                hidden = self.llm_model.base_model(
                    inputs_embeds=inputs_embeds,
                    attention_mask=attention_mask,
                    return_dict=True,
                    use_cache=self._train_use_cache,
                ).last_hidden_state
                loss = labelled_token_loss(hidden, labels, self.llm_model.get_output_embeddings(), num_items_in_batch)
        return {"loss": loss, "loss_tokens": loss_tokens}

    # --- inference -----------------------------------------------------------------------

    def prompt_embeds(self, queries: torch.Tensor, prompts: Sequence[str]):
        """Left-padded ``[pad] [queries] <s> prompt`` embeddings and attention mask."""
        return generation_embeds(self.llm_tokenizer, self.llm_model.get_input_embeddings(), queries, prompts)

    @torch.no_grad()
    def generate(
        self,
        samples,
        use_nucleus_sampling=False,
        num_beams=5,
        max_length=30,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.0,
        length_penalty=1.0,
        num_captions=1,
        temperature=1,
        prompt=None,
    ) -> list[str]:
        """Captions (or answers) for ``samples["image"]`` (or ``samples["vit_embeds"]``).

        ``num_captions`` per image, image-major."""
        inputs_embeds, attention_mask = self.generation_inputs(samples, prompt)
        outputs = self.decode(
            inputs_embeds,
            attention_mask,
            use_nucleus_sampling=use_nucleus_sampling,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_captions=num_captions,
            temperature=temperature,
        )
        texts = self.llm_tokenizer.batch_decode(outputs, skip_special_tokens=True)
        return [self.finished_text(text) for text in texts]

    def generation_inputs(self, samples, prompt=None):
        """Left-padded ``[pad] [queries] <s> prompt`` embeddings and mask of a batch: what the LLM continues."""
        image_embeds = self.image_embeds(samples)
        prompts = self.prompts_for(samples, image_embeds.size(0), prompt)
        return self.prompt_embeds(self.query_embeds(image_embeds=image_embeds), prompts)

    @staticmethod
    def finished_text(text: str) -> str:
        """A decoded caption as ``generate`` returns it: its first line (the model stops on a newline)."""
        return first_line(text)

    def decode(
        self,
        inputs_embeds,
        attention_mask,
        *,
        use_nucleus_sampling,
        num_beams,
        max_length,
        min_length,
        top_p,
        repetition_penalty,
        length_penalty,
        num_captions,
        temperature,
        stopping_criteria=None,
    ) -> torch.LongTensor:
        """The new token ids the frozen LLM writes after the left-padded ``inputs_embeds``, stopping on
        ``self.stop_token_ids``; LAVIS's generation arguments.  ``stopping_criteria``: transformers'
        criteria added to the stop tokens and the length (each sees every row's tokens after each step:
        the server streams text through one)."""
        with self.compute_region():
            return generate_tokens(
                self.llm_model,
                inputs_embeds,
                attention_mask,
                implementation=self.model_config.decode_implementation,
                compile=self.model_config.decode_compile,
                prepack=self.model_config.decode_prepack,
                do_sample=use_nucleus_sampling,
                top_p=top_p,
                temperature=temperature,
                num_beams=1 if use_nucleus_sampling else num_beams,
                max_new_tokens=max_length,
                min_new_tokens=min_length,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.llm_tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty,
                length_penalty=length_penalty,
                num_return_sequences=num_captions,
                use_cache=True,
                stopping_criteria=stopping_criteria,
            )

    def predict_answers(
        self,
        samples,
        num_beams=5,
        inference_method="generate",
        max_len=10,
        min_len=1,
        num_ans_candidates=128,
        answer_list=None,
        prompt="Question: {} Short answer:",
        length_penalty=0,
        **kwargs,
    ) -> list[str]:
        """LAVIS ``VQATask`` contract: one bare answer string per question."""
        if inference_method != "generate":
            raise ValueError(f"inference_method {inference_method!r} is not supported; use 'generate'")
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        prompt = prompt or "{}"
        prompts = [prompt.format(q) if "{}" in prompt else prompt + q for q in questions]
        answers = self.generate(
            {**{key: samples[key] for key in ("image", "vit_embeds") if key in samples}, "prompt": prompts},
            num_beams=num_beams,
            max_length=max_len,
            min_length=min_len,
            length_penalty=length_penalty,
        )
        answers = [_TRAILING_PUNCT.sub("", answer) for answer in answers]
        return self.lemmatize(answers) if self._apply_lemmatizer else answers

    def lemmatize(self, answers: list[str]) -> list[str]:
        if self._lemmatizer is None:
            import spacy

            try:
                self._lemmatizer = spacy.load("en_core_web_sm")
            except OSError as err:
                raise RuntimeError(
                    "model.apply_lemmatizer needs spaCy's en_core_web_sm: pip install it from a wheel, "
                    "or set apply_lemmatizer: false"
                ) from err

        def lemma(answer):
            words = [t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in self._lemmatizer(answer)]
            return " ".join(words)

        return [lemma(answer) for answer in answers]

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg, weights: WeightSource = FILES):
        """LAVIS's entry point: the model a ``model:`` config describes, its checkpoint loaded as the config says
        (files only: a random or meta build loads nothing)."""
        model = cls(cls.config_class.from_lavis(cfg), weights)
        if weights.loads_files:
            model.load_checkpoint_from_config(cfg)
        return model


def labelled_token_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, num_items_in_batch: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal-LM loss with the LM head applied only where a label follows.

    The same cross-entropy as transformers' ``labels=`` path, which projects every position
    onto the vocabulary; here the queries, ``<s>``, prompt and padding (most of a BLIP-2
    sequence) never reach the vocabulary-sized matmul.  Like transformers, the summed token
    losses are divided by ``num_items_in_batch`` when given, else averaged.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm_head(hidden[:, :-1][keep]).float()
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets[keep])
    return nn.functional.cross_entropy(logits, targets[keep], reduction="sum") / num_items_in_batch.to(logits.device)


def label_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of (B, T) ``labels`` carry loss once shifted: a 0-d long tensor."""
    return (labels[:, 1:] != -100).sum()


def cross_rank_token_normaliser(loss_tokens: torch.Tensor) -> torch.Tensor | None:
    """Global label tokens / world size in distributed training, else None (a local mean).

    Dividing each rank's summed token loss by it makes DDP's average of the rank gradients
    the gradient of the global token mean; a per-rank mean would weight a token on a rank
    with few tokens more than one on a rank with many.  Without gradients there is nothing
    to average, and evaluation must not wait on ranks that may run a different number of
    batches.
    """
    if not (torch.is_grad_enabled() and dist.is_available() and dist.is_initialized()):
        return None
    world_size = dist.get_world_size()
    if world_size == 1:
        return None
    # a copy: all_reduce works in place, and .to() on the same device and dtype returns loss_tokens itself
    total = loss_tokens.detach().to(collective_device(), torch.int64, copy=True)
    dist.all_reduce(total)
    # float32: a float64 0-d divisor would promote the loss itself to float64
    return total.to(loss_tokens.device, torch.float32) / world_size


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def stop_token_ids(tokenizer) -> list[int]:
    """End of text, plus the real newline token.

    InternLM2's tokenizer names it (a byte piece).  Otherwise "\n" must encode to one token
    that decodes back to "\n" (GPT-2/OPT's "Ċ"); a SentencePiece tokenizer that gives
    ["▁", "<0x0A>"] must not make "▁", a word start, the stop token.
    """
    ids = [tokenizer.eos_token_id]
    newline = getattr(tokenizer, "newline_token_id", None)
    if newline is None:
        encoded = tokenizer("\n", add_special_tokens=False).input_ids
        if len(encoded) == 1 and tokenizer.decode(encoded) == "\n":
            newline = encoded[0]
    if newline is not None and newline not in ids:
        ids.append(newline)
    return ids
