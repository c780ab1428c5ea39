"""Short text-only pretraining of a small InternLM2, so that it is a *pretrained* LLM.

BLIP-2 freezes a pretrained LLM and learns to prompt it.  A randomly initialised LLM
cannot be prompted: its near-uniform output ignores the context, and the Q-Former has
nothing to steer.  The tiny test LLM is therefore trained briefly on text that makes it
read its context, laid out as BLIP-2 will lay out its input: a context, then ``<s>``,
then the text.  The contexts are short keywords that determine every caption and answer
of the synthetic shapes task (``zh red circle left`` before ``<s>左边有一个红色的圆形``),
so a frozen LLM that has learned to read what precedes ``<s>`` is one the Q-Former's
soft prompt, which takes exactly that place, can steer.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch


def keyword_corpus(colors=None, shapes=None, positions=None) -> list[tuple[str, str]]:
    """(context, text) pairs: keyword-conditioned captions and answers, and plain texts."""
    from blip2_internlm.datasets import shapes as data

    colors = colors or data.DEFAULT_COLORS
    shapes_ = shapes or data.DEFAULT_SHAPES
    positions = positions or data.DEFAULT_POSITIONS
    pairs = []
    for color in colors:
        for shape in shapes_:
            for position in positions:
                obj = {"color": color, "shape": shape, "position": position}
                scene = {"objects": [obj], "target": obj, "exist": ((color, shape), True)}
                for lang in ("en", "zh"):
                    keywords = f"{lang} {color} {shape} {position}"
                    pairs.append((keywords, data._captions([obj], lang)[0]))
                    pairs += [(f"{keywords} {q}", a) for q, a in data._questions(scene, lang)]
    return pairs + [("", text) for text in data.text_corpus(colors, shapes_, positions)]


def pretrain_causal_lm(model_dir, pairs: list[tuple[str, str]], *, steps=1500, batch_size=32, lr=3e-3, seed=0) -> list[float]:
    """Train the checkpoint in ``model_dir`` on ``context <s> text </s>`` sequences; save it back.

    Deterministic for a given machine (fixed seeds, one thread).  Returns the loss curve.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    rows = [ids(context) + [tokenizer.bos_token_id] + ids(text) + [tokenizer.eos_token_id] for context, text in pairs]
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    try:
        for _ in range(steps):
            batch = rng.sample(rows, min(batch_size, len(rows)))
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir, safe_serialization=True)
    return losses
