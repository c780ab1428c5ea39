"""The bench's inputs and the ``Side``: one model under test and the calls that are timed on it.

Both models get the same inputs (images, captions, questions, seeds) and are driven the same way:
a stage-2 training step, beam-search captioning and VQA with the generated length forced equal on
both sides (random weights end at random lengths otherwise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from blip2_internlm.tools.bench.models import build_ours

#: LAVIS's VQA defaults (``VQATask`` / ``predict_answers``) and caption default prompt.
VQA_PROMPT = "Question: {} Short answer:"
CAPTIONS = [
    "a red circle on the left and a blue square on the right",
    "two green triangles in the middle",
    "a yellow square at the top",
    "three purple circles and one orange triangle",
]
QUESTIONS = [
    "what color is the circle?",
    "how many shapes are there?",
    "is there a red square on the left of the blue triangle in the picture?",
    "what shape is at the top?",
    "which color is the shape in the middle of the image?",
    "are there two circles?",
]
NUM_BEAMS = 5


# --- inputs ------------------------------------------------------------------------------------


def make_inputs(size: dict, device: str, batch_size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size["image_size"], size["image_size"], generator=generator)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    # a pool of 4 batches of questions of mixed lengths, for the length-sorted batching toggle
    pool = [QUESTIONS[(i * 5) % len(QUESTIONS)] for i in range(4 * batch_size)]
    return dict(images=images.to(device), captions=captions, question=QUESTIONS[0], question_pool=pool)


@contextlib.contextmanager
def counting_new_tokens(llm, prompt_tokens: int, record: list):
    """Record how many tokens each ``llm.generate`` call produced (rows are equal length)."""
    generate = llm.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        # with input_ids, transformers returns prompt + new tokens; with only inputs_embeds, new tokens
        record.append(int(out.shape[1]) - (prompt_tokens if kwargs.get("input_ids") is not None else 0))
        return out

    llm.generate = counted
    try:
        yield
    finally:
        del llm.generate


# --- the model under test ---------------------------------------------------------------------


@dataclass
class Side:
    """One model under test and how to drive it."""

    label: str
    model: torch.nn.Module
    is_baseline: bool
    notes: dict = field(default_factory=dict)
    scaler: object = None

    @property
    def llm(self):
        return self.model.opt_model if self.is_baseline else self.model.llm_model

    def prefix_tokens(self, prompt: str) -> int:
        """Tokens the LLM reads before it generates: the queries and the tokenized prompt."""
        tokenizer = self.model.opt_tokenizer if self.is_baseline else self.model.llm_tokenizer
        return self.model.query_tokens.shape[1] + len(tokenizer(prompt).input_ids)

    def train_step(self, samples) -> Callable[[], None]:
        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
        scaler = self.scaler

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(samples)["loss"]
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

        return step

    def guarded_train_step(self, samples) -> Callable[[], None]:
        """``train_step`` as the training runner takes it: the loss checked, the gradient norm
        computed and both checked before the optimizer step (``runner.guarded_optimizer_step``)."""
        from blip2_internlm.runner import guarded_optimizer_step

        model = self.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = model(samples)["loss"]
            finite = bool(torch.isfinite(loss.detach()))
            loss.backward()
            guarded_optimizer_step(optimizer, self.scaler, finite)

        return step

    def caption(self, visual: dict, new_tokens: int, record: list, num_beams: int = NUM_BEAMS) -> Callable[[], list]:
        """``visual``: ``{"image": ...}``, or ours from a feature cache ``{"vit_embeds": ...}``."""
        model = self.model
        model.eval()
        if self.is_baseline:
            # LAVIS's min_length counts the prompt ids (its queries enter as query_embeds)
            prompt_tokens = len(model.opt_tokenizer(model.prompt).input_ids)
            kwargs = dict(max_length=new_tokens, min_length=prompt_tokens + new_tokens)
        else:
            prompt_tokens, kwargs = 0, dict(max_length=new_tokens, min_length=new_tokens)

        def run():
            with counting_new_tokens(self.llm, prompt_tokens, record):
                return model.generate(dict(visual), num_beams=num_beams, **kwargs)

        return run

    def vqa(
        self, visual: dict, questions: list, new_tokens: int, record: list, num_beams: int = NUM_BEAMS
    ) -> Callable[[], list]:
        model = self.model
        model.eval()
        if self.is_baseline:
            # LAVIS 1.0.2's Blip2OPT has no predict_answers and its generate takes one prompt
            # string per batch: the VQA prompt of VQATask's blip2 configs, one question per batch
            if len(set(questions)) != 1:
                raise ValueError("LAVIS 1.0.2's Blip2OPT.generate takes one prompt per batch")
            prompt = VQA_PROMPT.format(questions[0])
            prompt_tokens = len(model.opt_tokenizer(prompt).input_ids)

            def run():
                with counting_new_tokens(self.llm, prompt_tokens, record):
                    return model.generate(
                        {**visual, "prompt": prompt},
                        num_beams=num_beams,
                        max_length=new_tokens,
                        min_length=prompt_tokens + new_tokens,
                    )

            return run

        def run():
            with counting_new_tokens(self.llm, 0, record):
                return model.predict_answers(
                    {**visual, "text_input": questions},
                    num_beams=num_beams,
                    max_len=new_tokens,
                    min_len=new_tokens,
                    prompt=VQA_PROMPT,
                )

        return run


def ours_side(size: dict, device: str, **overrides) -> Side:
    """Our model at ``size`` with ``overrides`` (model-config keys), noting how each ``auto`` key resolved."""
    model = build_ours(size, device, **overrides)
    label = "blip2_internlm" + (f" {overrides}" if overrides else "")
    resolved = model.resolved_defaults(device)
    resolved.pop("machine")  # once, in the JSON's machine entry
    return Side(label, model, False, notes={"overrides": overrides, "resolved_defaults": resolved})
