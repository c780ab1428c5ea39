"""Short text-only pretraining of a small InternLM2, so that it is a *pretrained* LLM.

BLIP-2 freezes a pretrained LLM and learns to prompt it.  A randomly initialised LLM
cannot be prompted: its near-uniform output ignores the context, and the Q-Former has
nothing to steer.  The tiny test LLM is therefore trained briefly on text that makes it
read its context, laid out as BLIP-2 will lay out its input: a context, then ``<s>``,
then an optional prompt, then the text.  The contexts are short keywords that determine
every caption and answer of the synthetic shapes task (``zh red circle left`` before
``<s>左边有一个红色的圆形``, or before ``<s>问题：图中是什么形状？ 简短回答：圆形``), so a
frozen LLM that has learned to read what precedes ``<s>`` is one the Q-Former's soft
prompt, which takes exactly that place, can steer, for captions and for questions.

``python -m blip2_internlm.internlm2.pretrain_text --out DIR`` builds and pretrains one
(the demo's stage 0); the ``tiny`` LLM asset is the same thing, cached.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

#: The zero-shot VQA prompt of each language (what configs/tiny/vqa_zeroshot*.yaml use).
VQA_PROMPTS = {"zh": "问题：{} 简短回答：", "en": "Question: {} Short answer:"}
#: The caption prompt of each language (stage 2 and caption evaluation), as LAVIS's BLIP-2
#: captions with "a photo of".  With the task named in the text, the soft prompt only has
#: to carry what is in the image, and a question reads it as a caption does.
CAPTION_PROMPTS = {"zh": "图片描述：", "en": "A short caption:"}


def keyword_corpus(colors=None, shapes=None, positions=None, seed=0) -> list[tuple[str, str, str]]:
    """(context, prompt, text) triples: keyword-conditioned captions and answers, plain texts.

    The keywords come in a random order in each row, so the LLM learns to find an
    attribute by what it is rather than where it stands, for captions and answers alike:
    a soft prompt trained for captions is then read the same way by a question.
    """
    from blip2_internlm.datasets import shapes as data

    colors = colors or data.DEFAULT_COLORS
    shapes_ = shapes or data.DEFAULT_SHAPES
    positions = positions or data.DEFAULT_POSITIONS
    rng = random.Random(seed)

    def keywords(*words):
        words = list(words)
        rng.shuffle(words)
        return " ".join(words)

    rows = []
    for color in colors:
        for shape in shapes_:
            for position in positions:
                obj = {"color": color, "shape": shape, "position": position}
                for lang in ("en", "zh"):
                    # captions weigh as much as the ten questions: they are stage 2's task
                    caption = data._captions([obj], lang)[0]
                    rows += [(keywords(lang, color, shape, position), CAPTION_PROMPTS[lang], caption) for _ in range(5)]
                    scene = {"objects": [obj], "target": obj, "exist": ((color, shape), True)}
                    qa = data._questions(scene, lang)
                    # "is there a ...?": as many yes as no, and every kind of no (other colour,
                    # other shape, both), so no shortcut answers it without reading the context
                    asked = [(color, shape)] * 2 + [  # plus the yes already in qa
                        (rng.choice([c for c in colors if c != color]), shape),
                        (color, rng.choice([h for h in shapes_ if h != shape])),
                        (rng.choice([c for c in colors if c != color]), rng.choice([h for h in shapes_ if h != shape])),
                    ]
                    for ask in asked:
                        exist_scene = {**scene, "exist": (ask, ask == (color, shape))}
                        qa.append(data._questions(exist_scene, lang)[3])
                    rows += [(keywords(lang, color, shape, position), VQA_PROMPTS[lang].format(q), a) for q, a in qa]
    return rows + [("", "", text) for text in data.text_corpus(colors, shapes_, positions)]


def pretrain_causal_lm(
    model_dir, rows: list[tuple[str, str, str]], *, steps=1500, batch_size=32, lr=3e-3, seed=0, context_noise=0.5
) -> list[float]:
    """Train the checkpoint in ``model_dir`` on ``context <s> prompt text </s>``; save it back.

    Prompt and text are tokenized apart, as Blip2InternLM does, so the answer starts on the
    same token boundary in pretraining and in generation.  Gaussian noise (``context_noise``
    times the embedding table's spread) is added to the context's embeddings: the LLM learns
    to read a neighbourhood of each keyword, not one point, and a soft prompt that lands
    near it is read the same way by every continuation.

    Deterministic for a given machine (fixed seeds, one thread).  Returns the loss curve.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    rows = [
        (ids(context), [tokenizer.bos_token_id] + ids(prompt) + ids(text) + [tokenizer.eos_token_id])
        for context, prompt, text in rows
    ]
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
            width = max(len(c) + len(t) for c, t in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            context = torch.zeros_like(ids, dtype=torch.bool)
            for i, (c, t) in enumerate(batch):
                ids[i, : len(c) + len(t)] = torch.tensor(c + t)
                mask[i, : len(c) + len(t)] = 1
                context[i, : len(c)] = True
            table = model.get_input_embeddings()
            embeds = table(ids)
            spread = table.weight.detach().std()
            embeds = embeds + context_noise * spread * torch.randn_like(embeds) * context.unsqueeze(-1)
            loss = model(inputs_embeds=embeds, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir, safe_serialization=True)
    return losses


def main(argv=None):
    import argparse
    import json

    from blip2_internlm.internlm2.tiny import build_tiny_internlm2

    parser = argparse.ArgumentParser(description="Build a tiny InternLM2 and pretrain it on the shapes text.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (intermediate = 2x)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    rows = keyword_corpus()
    build_tiny_internlm2(
        args.out,
        corpus=[" ".join(row) for row in rows],
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
    )
    losses = pretrain_causal_lm(args.out, rows, steps=args.steps, seed=args.seed)
    (args.out / "pretraining.json").write_text(json.dumps({"steps": len(losses), "losses": losses}))
    print(f"pretrained {args.out} for {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


if __name__ == "__main__":
    import blip2_internlm  # noqa: F401  (registers the native InternLM2 with the Auto classes)

    main()
