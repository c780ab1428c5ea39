"""Instruction-tuned BLIP-2 with a frozen InternLM2: ``arch: blip2_internlm_instruct``.

What it adds to ``blip2_internlm`` (the same ViT, Q-Former, projection and LLM, built the same way):

* **An instruction-aware Q-Former**, as InstructBLIP: the instruction's tokens (the Q-Former's own
  BERT tokenizer) join the learned queries in the Q-Former's self-attention, so what the queries take
  from the image depends on what is asked.  For a conversation the instruction is its user turns,
  latest last, truncated on the left to ``max_instruction_len`` tokens.  The Q-Former therefore keeps
  its text embeddings and text feed-forward layers, which stage 2 drops; from a stage-2 checkpoint
  they start from the BERT weights, from LAVIS's stage-1 ``blip2_pretrained.pth`` they are loaded.
* **Conversations**: the LLM's input is ``[queries] <s>`` and the conversation rendered by
  ``model.chat_template`` (models/chat_template.py); the loss is on the assistant's turns only.
  A sample holds ``messages`` (a list of ``{"role", "content"}``), or, as LAVIS's caption and VQA
  datasets give it, a ``prompt`` (the instruction; default ``model.prompt``) and a ``text_input``
  (the answer).
* **LoRA on the frozen LLM** (``model.llm_lora``, models/lora.py): the adapters and the Q-Former
  train, the LLM's own weights do not.
* **Chat**: :meth:`chat` answers the last user turn of a history, :meth:`chat_stream` yields the
  answer as it is written.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence

import torch
from lavis.common.registry import registry

from blip2_internlm.models.blip2_internlm import Blip2InternLM
from blip2_internlm.models.builders import WeightSource, build_qformer_tokenizer
from blip2_internlm.models.chat_template import ChatTemplate, ConversationError, user_turns
from blip2_internlm.models.config import Blip2InternLMInstructConfig
from blip2_internlm.models.llm_inputs import conversation_tokens, left_padded_embeds, segment_ids
from blip2_internlm.models.lora import add_lora, set_adapter_dropout
from blip2_internlm.paths import MODEL_CONFIG_DIR

#: Generation defaults of :meth:`Blip2InternLMInstruct.chat`: greedy, room for a paragraph.
CHAT_DEFAULTS = {"num_beams": 1, "max_length": 128, "min_length": 1}


@registry.register_model("blip2_internlm_instruct")
class Blip2InternLMInstruct(Blip2InternLM):
    PRETRAINED_MODEL_CONFIG_DICT = {
        name: os.path.join(MODEL_CONFIG_DIR, f"blip2_internlm_instruct_{name}.yaml")
        for name in ("tiny", "internlm2_1.8b", "internlm2_chat_1.8b")
    }
    config_class = Blip2InternLMInstructConfig

    def _build(self, config: Blip2InternLMInstructConfig, weights: WeightSource) -> None:
        super()._build(config, weights)
        self.template = ChatTemplate.for_tokenizer(config.chat_template, self.llm_tokenizer)
        self.stop_token_ids = self.template.stop_token_ids
        self.lora_parameters = add_lora(self.llm_model, config.lora) if config.lora else 0

    def _llm_in_4bit(self, config: Blip2InternLMInstructConfig) -> bool:
        return bool(config.lora and config.lora.load_in_4bit)

    def _trim_qformer(self, weights: WeightSource) -> None:
        if not self.model_config.qformer_text_input:
            super()._trim_qformer(weights)
            return
        # the instruction's tokenizer; truncated on the left: the latest turn matters most
        self.tokenizer = build_qformer_tokenizer(self.model_config.qformer_text_model, "left", weights)
        with weights.building():
            self.Qformer.resize_token_embeddings(len(self.tokenizer))  # + LAVIS's [DEC]: stage 1's size
        self.Qformer.cls = None  # the text embeddings and feed-forward stay (instruction tokens), the LM head goes

    @property
    def checkpoint_required_prefixes(self) -> tuple[str, ...]:
        """What a pretrained checkpoint (stage 2 of ``blip2_internlm``, or LAVIS's stage 1) must hold: the
        queries and the Q-Former's query path.  The instruction path may start from the BERT weights."""
        text_only = (".embeddings.word_embeddings.", ".embeddings.position_embeddings.", ".intermediate.", ".output.")
        return ("query_tokens",) + tuple(
            name for name, _ in self.Qformer.named_parameters(prefix="Qformer") if not any(t in name for t in text_only)
        )

    @property
    def finetuned_required_prefixes(self) -> tuple[str, ...]:
        """What an instruction-tuned checkpoint must hold: every trainable weight (LoRA adapters included)."""
        return tuple(name for name, param in self.named_parameters() if param.requires_grad)

    def train(self, mode: bool = True):
        super().train(mode)
        set_adapter_dropout(self.llm_model, mode)  # the frozen LLM stays in eval mode, its adapters do not
        return self

    # --- conversations ---------------------------------------------------------------------

    def conversations(self, samples, batch_size: int, *, with_answers: bool, prompt=None) -> list[list[dict]]:
        """One message list per image: ``samples["messages"]``, else a user turn from the prompt (and, with
        ``with_answers``, the assistant's ``samples["text_input"]``); ``model.system_prompt`` in front."""
        if samples.get("messages") is not None:
            conversations = [list(messages) for messages in samples["messages"]]
            if len(conversations) != batch_size:
                raise ValueError(f"samples['messages'] has {len(conversations)} conversations for {batch_size} images")
        else:
            prompts = self.prompts_for(samples, batch_size, prompt)
            empty = [i for i, p in enumerate(prompts) if not p.strip()]
            if empty:
                raise ConversationError(
                    f"sample {empty[0]} has no instruction: give samples['prompt'] or samples['messages'], or set "
                    "model.prompt"
                )
            conversations = [[{"role": "user", "content": p}] for p in prompts]
            if with_answers:
                texts = samples["text_input"]
                if len(texts) != batch_size:
                    raise ValueError(f"batch has {batch_size} images but {len(texts)} texts")
                for conversation, text in zip(conversations, texts):
                    conversation.append({"role": "assistant", "content": text})
        system = self.model_config.system_prompt
        if system:
            conversations = [
                c if c and c[0].get("role") == "system" else [{"role": "system", "content": system}, *c]
                for c in conversations
            ]
        return conversations

    def query_embeds(self, image=None, image_embeds=None, instructions: Sequence[str] | None = None):
        """The LLM-space soft prompt, (B, num_query_token, llm_width); the Q-Former reads ``instructions``."""
        if instructions is None or not self.model_config.qformer_text_input:
            return super().query_embeds(image, image_embeds)
        if image_embeds is None:
            image_embeds = self.image_embeds({"image": image})
        device = image_embeds.device
        text = self.tokenizer(
            list(instructions),
            padding="longest",
            truncation=True,
            max_length=self.model_config.max_instruction_len,
            return_tensors="pt",
        ).to(device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=device)
        with self.compute_region():
            output = self.Qformer.bert(
                text.input_ids,
                attention_mask=torch.cat([query_atts, text.attention_mask], dim=1),
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                return_dict=True,
            )
        queries = output.last_hidden_state[:, : query_tokens.shape[1]]  # (B, num_query_token, qformer width)
        return self.llm_proj(queries).to(self.llm_model.dtype)

    # --- training --------------------------------------------------------------------------

    def forward(self, samples):
        """``{"loss", "loss_tokens"}`` as ``blip2_internlm``'s, over the assistant turns of each conversation."""
        image_embeds = self.image_embeds(samples)
        conversations = self.conversations(samples, image_embeds.size(0), with_answers=True)
        queries = self.query_embeds(image_embeds=image_embeds, instructions=[user_turns(c) for c in conversations])
        rows = [self.template.training_segments(c) for c in conversations]
        input_ids, text_atts, labels = (
            t.to(queries.device) for t in conversation_tokens(self.llm_tokenizer, rows, self.max_txt_len)
        )
        return self.language_model_loss(queries, input_ids, text_atts, labels)

    # --- inference -------------------------------------------------------------------------

    def generation_inputs(self, samples, prompt=None):
        """Left-padded ``[pad] [queries] <s> history <assistant opening>`` embeddings and mask of a batch: the
        histories ``samples["messages"]`` (each ending with a user turn), or one instruction per image,
        ``samples["prompt"]`` / ``prompt`` / ``model.prompt``.  ``generate`` (the base model's) continues them."""
        image_embeds = self.image_embeds(samples)
        conversations = self.conversations(samples, image_embeds.size(0), with_answers=False, prompt=prompt)
        queries = self.query_embeds(image_embeds=image_embeds, instructions=[user_turns(c) for c in conversations])
        heads, _ = segment_ids(self.llm_tokenizer, [self.template.generation_segments(c) for c in conversations])
        embed = self.llm_model.get_input_embeddings()
        return left_padded_embeds(embed, queries, heads, self.llm_tokenizer.pad_token_id)

    @staticmethod
    def finished_text(text: str) -> str:
        """An answer keeps every line: the end of the assistant's turn is what stops it."""
        return text.strip()

    def chat(self, image: torch.Tensor, messages: Sequence[dict], **generation) -> str:
        """The answer to the last user turn of ``messages`` about ``image`` (a processed image, (3, H, W) or
        (1, 3, H, W)); ``generation``: ``generate``'s arguments (default greedy, 128 new tokens)."""
        return self.generate(self._chat_samples(image, messages), **{**CHAT_DEFAULTS, **generation})[0]

    def chat_stream(self, image: torch.Tensor, messages: Sequence[dict], **generation) -> Iterator[str]:
        """:meth:`chat`'s answer as pieces of text, each yielded as soon as its tokens are decoded.

        Decoded by ``llm.generate`` with transformers' ``TextIteratorStreamer`` (greedy or sampling, no
        beams), in a background thread that holds the model's compute region."""
        from transformers import TextIteratorStreamer

        settings = {**CHAT_DEFAULTS, **generation}
        if settings.pop("num_beams", 1) != 1:
            raise ValueError("chat_stream decodes one sequence: num_beams must be 1")
        sample = settings.pop("use_nucleus_sampling", False)
        unsupported = sorted(set(settings) - {"top_p", "temperature", "max_length", "min_length", "repetition_penalty"})
        if unsupported:
            raise ValueError(f"chat_stream does not take {unsupported}; use chat for those")
        with torch.no_grad():
            inputs_embeds, attention_mask = self.generation_inputs(self._chat_samples(image, messages))
        streamer = TextIteratorStreamer(self.llm_tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure = []

        def decode():
            try:
                with torch.no_grad(), self.compute_region():
                    self.llm_model.generate(
                        inputs_embeds=inputs_embeds,
                        attention_mask=attention_mask,
                        streamer=streamer,
                        do_sample=sample,
                        top_p=settings.pop("top_p", 0.9),
                        temperature=settings.pop("temperature", 1),
                        max_new_tokens=settings.pop("max_length"),
                        min_new_tokens=settings.pop("min_length"),
                        repetition_penalty=settings.pop("repetition_penalty", 1.0),
                        eos_token_id=self.stop_token_ids,
                        pad_token_id=self.llm_tokenizer.pad_token_id,
                        use_cache=True,
                    )
            except BaseException as err:  # raised again in the caller's thread
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=decode, name="chat_stream", daemon=True)
        thread.start()
        first = True
        for piece in streamer:
            piece = piece.lstrip() if first else piece
            first = first and not piece
            if piece:
                yield piece
        thread.join()
        if failure:
            raise failure[0]

    def _chat_samples(self, image: torch.Tensor, messages: Sequence[dict]) -> dict:
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[0] != 1:
            raise ValueError(f"chat takes one processed image, (3, H, W) or (1, 3, H, W); got {tuple(image.shape)}")
        return {"image": image.to(self.device), "messages": [list(messages)]}
