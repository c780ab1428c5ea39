"""The model side of the server: one batch of :class:`~blip2_internlm.serve.mapping.Work` in one model call.

Every call is the model's own batched entry point, with the arguments the single-request paths use, so a
batched answer is the answer the request would get alone (the models left-pad their prompts; the specs
check the texts):

* ``caption``: ``model.generate({"image": B images}, prompt=caption prompt, ...)``, as the web demo's caption;
* ``prompt``: ``model.generate({"image": ..., "prompt": [B prompts]}, ...)``;
* ``answer``: ``model.predict_answers({"image": ..., "text_input": [B filled questions]}, prompt="{}", ...)``,
  the questions filled as the web demo fills them (``tools.app.filled_question``);
* ``chat``: ``model.generate({"image": ..., "messages": [B conversations]}, **CHAT_DEFAULTS | settings)``,
  which is what ``Blip2InternLMInstruct.chat`` calls for one conversation.

A sampled request with a seed runs alone after ``torch.manual_seed(seed)`` (the batcher keeps it alone),
so it gets what that seed gives one request, as in the web demo.

A streaming request's ``listener`` hears its text as the batch decodes it (``serve.streaming``), where the
batch draws one sequence per request (greedy or sampled); a beam search's text is known only at its end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import StoppingCriteriaList

from blip2_internlm.serve.mapping import Settings, Work
from blip2_internlm.serve.streaming import SettledText, TokenTap
from blip2_internlm.tools.app import ServedModel, filled_question


@dataclass(frozen=True)
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "length" when the text used every token it was allowed, else "stop"


class ModelRunner:
    """Turns batches of work into texts on ``served``'s model; the batcher calls :meth:`run` from one thread."""

    def __init__(self, served: ServedModel, caption_prompt: str, vqa_prompt: str):
        self.served = served
        self.caption_prompt = caption_prompt
        self.vqa_prompt = vqa_prompt

    @property
    def chat_model(self) -> bool:
        return hasattr(self.served.model, "chat")

    def prepare(self, work: Work) -> Work:
        """The image processed into pixels (in the request's thread, beside the model's); the question filled."""
        work.image = self.served.vis_processor(work.image)
        if work.settings.mode == "answer":
            work.text = filled_question(self.served, work.text, self.vqa_prompt)
        return work

    @torch.inference_mode()
    def run(self, settings: Settings, batch: list[Work]) -> list[Generated]:
        model = self.served.model
        pixels = torch.stack([work.image for work in batch]).to(self.served.source.device)
        decoding = dict(num_beams=settings.num_beams, max_length=settings.max_new_tokens)
        if settings.sampling:
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            decoding.update(use_nucleus_sampling=True, top_p=settings.top_p, temperature=settings.temperature)
        mode = settings.mode
        with recorded_decoding(model, self.token_tap(settings, batch)) as record:
            if mode == "caption":
                texts = model.generate({"image": pixels}, prompt=self.caption_prompt, **decoding)
            elif mode == "prompt":
                texts = model.generate({"image": pixels, "prompt": [work.text for work in batch]}, **decoding)
            elif mode == "answer":
                texts = model.predict_answers(
                    {"image": pixels, "text_input": [work.text for work in batch]},
                    prompt="{}",
                    num_beams=settings.num_beams,
                    max_len=settings.max_new_tokens,
                )
            elif mode == "chat":
                from blip2_internlm.models.blip2_internlm_instruct import CHAT_DEFAULTS

                samples = {"image": pixels, "messages": [work.messages for work in batch]}
                texts = model.generate(samples, **{**CHAT_DEFAULTS, **decoding})
            else:
                raise ValueError(f"unknown mode {mode!r}")
        stops = set(model.stop_token_ids)
        results = []
        for text, prompt_tokens, ids in zip(texts, record["prompt_tokens"], record["new_tokens"], strict=True):
            ends = [i for i, token in enumerate(ids) if token in stops]
            written = ends[0] + 1 if ends else len(ids)
            results.append(Generated(text, prompt_tokens, written, "stop" if ends else "length"))
        return results

    def streams(self, settings: Settings) -> bool:
        """Whether a batch with ``settings`` can stream its text token by token: one sequence per request
        (greedy or sampled, no beams), and a finished text that only ever cuts its end (not lemmatised)."""
        lemmatised = settings.mode == "answer" and getattr(self.served.model, "_apply_lemmatizer", False)
        return settings.num_beams == 1 and not lemmatised

    def token_tap(self, settings: Settings, batch: list[Work]) -> TokenTap | None:
        """The tap that streams the batch's listening requests, or None (no listener, or beams)."""
        if not self.streams(settings) or all(work.listener is None for work in batch):
            return None
        model = self.served.model
        return TokenTap(
            [
                None
                if work.listener is None
                else SettledText(model.llm_tokenizer, model.stop_token_ids, model.finished_text, work.listener)
                for work in batch
            ]
        )


@contextlib.contextmanager
def recorded_decoding(model, tap: TokenTap | None = None):
    """Within the block, what ``model.decode`` (the one decoding step every generation path of the models
    goes through) is given and returns: each row's prompt length (query tokens, ``<s>`` and the prompt or
    conversation: its attention mask) and its new token ids.  That is how the server counts tokens
    without a second decoding path beside ``generate`` and ``predict_answers``.  ``tap``, when given,
    sees every decoding step (it streams text to the requests)."""
    record = {}
    decode = model.decode

    def recording(inputs_embeds, attention_mask, **options):
        if tap is not None:
            options["stopping_criteria"] = StoppingCriteriaList([tap])
        ids = decode(inputs_embeds, attention_mask, **options)
        record["prompt_tokens"] = attention_mask.sum(dim=1).tolist()
        record["new_tokens"] = ids.tolist()
        return ids

    model.decode = recording  # an instance attribute over the class's method, removed after the call
    try:
        yield record
    finally:
        del model.decode
