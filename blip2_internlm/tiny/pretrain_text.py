"""Short text-only pretraining of a small InternLM2, so that it is a *pretrained* LLM.

BLIP-2 freezes a pretrained LLM and learns to prompt it.  A randomly initialised LLM
cannot be prompted: its near-uniform output ignores the context, and the Q-Former has
nothing to steer.  The tiny test LLM is therefore trained briefly on text that makes it
read its context, laid out as BLIP-2 will lay out its input: a context, then ``<s>``,
then an optional prompt, then the text.  The contexts are short keywords that determine
every caption and answer of the synthetic shapes task (``zh red circle left`` before
``<s>图片描述：左边有一个红色的圆形``, or before ``<s>问题：图中有红色的圆形吗？ 简短回答：是``), so a
frozen LLM that has learned to read what precedes ``<s>`` is one the Q-Former's soft
prompt, which takes exactly that place, can steer, for captions and for questions.

What zero-shot VQA needs from it, and how each need is met (docs/demo.md has the
measurements behind each point):

* It must answer every question form from a text context, yes/no included.  The corpus
  asks each form about every object; "is there a ...?" is asked as often with "no" as with
  "yes", half of the "no"s about an object that shares the colour or the shape.  The loss
  is on the answer only, and the learning rate is 1e-3: at 3e-3 the LLM never learns the
  yes/no comparison and answers one word to every yes/no question, from text already.
* Its tokenizer must split Chinese into words, as InternLM2's does.  Trained on whole
  sentences, the tiny SentencePiece model made each question ("图中有红色的圆形吗") and
  each colour-and-shape pair ("红色的圆形") a single token, so nothing was shared
  between a caption and a question.
* It must read a soft prompt, not only keywords.  The Q-Former's soft prompt is a point
  nowhere near the embedding table (its norm measured far above an embedding row's: docs/demo.md), and
  it is trained for captions only.  So the contexts' embeddings are noised and rescaled
  (up to ``context_scale`` times), and from ``prefix_start`` on, every ``prefix_every``
  steps a fresh small network learns, with the LLM frozen, a prefix from which the LLM
  writes each object's caption; the LLM then also trains on questions about that object
  with that prefix as the context.  A prefix is made from the words of a caption, never
  from an image: the LLM learns that whatever makes it write a caption also answers
  questions, which is what BLIP-2 takes for granted in a large LLM.

* It must check the colour and the shape of "is there a red circle?" both.  Asked only
  that, it learns to check one of them (measured: "no" right for every absent pair that
  differs in the checked attribute, wrong for those that share it), so the corpus also asks
  about the colour alone and the shape alone.

``python -m blip2_internlm.tiny.pretrain_text --out DIR`` builds and pretrains one this
way (the demo's stage 0: ``qa_corpus``, ``pretrain_for_vqa``).  The ``tiny`` LLM asset that
the specs use keeps the earlier recipe (``keyword_corpus``, ``pretrain_causal_lm``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

#: The zero-shot VQA prompt of each language (what configs/tiny/vqa_zeroshot*.yaml use).
VQA_PROMPTS = {"zh": "问题：{} 简短回答：", "en": "Question: {} Short answer:"}
#: The caption prompt of each language (stage 2 and caption evaluation), as LAVIS's BLIP-2
#: captions with "a photo of".  With the task named in the text, the soft prompt only has
#: to carry what is in the image, and a question reads it as a caption does.
CAPTION_PROMPTS = {"zh": "图片描述：", "en": "A short caption:"}

#: The question kinds of the shapes data (``shapes.QUESTION_TYPES`` order) and the yes/no
#: variants the text check asks.
KINDS = ("color", "shape", "position", "exist", "count")
_YES_NO_KINDS = ("exist_yes", "exist_no_near", "exist_no_far")

#: Chinese words of the prompts and question templates besides the colour, shape and
#: position names, for the tokenizer corpus's word split.
_FUNCTION_WORDS_ZH = ("图中", "图片", "描述", "问题", "简短", "回答", "一个", "什么", "颜色", "形状", "位置", "几个")
#: What ``Blip2InternLM.predict_answers`` strips from the end of an answer.
_TRAILING_PUNCT = re.compile(r"[\s.,!?;:。，！？；：、]+$")
#: CJK characters and full-width punctuation.
_CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]+")


@dataclass(frozen=True)
class PretrainSettings:
    """Everything besides the corpus that decides the pretrained weights."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    #: Gaussian noise on the context embeddings, in units of the embedding table's spread.
    context_noise: float = 0.5
    #: Each context is scaled by a log-uniform factor in [1, context_scale].
    context_scale: float = 100.0
    #: Caption-trained prefixes (module docstring); prefix_every = 0 turns them off.
    prefix_start: int = 500
    prefix_every: int = 300
    prefix_fit_steps: int = 100
    prefix_tokens: int = 8
    prefix_batch: int = 8
    prefix_weight: float = 0.5


# --- corpus -------------------------------------------------------------------------------


def _objects(colors, shapes_, positions):
    return [{"color": c, "shape": s, "position": p} for c, s, p in itertools.product(colors, shapes_, positions)]


def _exist_asked(obj, colors, shapes_, rng, n_yes):
    """(colour, shape) pairs to ask "is there ...?" about: n_yes times the object itself, and
    n_yes absent pairs, in turn one of its colour, one of its shape and one sharing neither,
    so that no single attribute answers the question."""
    own = (obj["color"], obj["shape"])
    absent = [(c, s) for c in colors for s in shapes_ if (c, s) != own]
    pools = (
        [a for a in absent if a[0] == own[0]] or absent,
        [a for a in absent if a[1] == own[1]] or absent,
        [a for a in absent if a[0] != own[0] and a[1] != own[1]] or absent,
    )
    return [own] * n_yes + [rng.choice(pools[k % 3]) for k in range(n_yes)]


def _attribute_questions(obj, lang, colors, shapes_, rng):
    """Yes/no questions about one attribute ("is the shape red?", "is it a circle?"), each
    asked about the object's own value and another: the LLM learns to check the colour and
    the shape apart, which "is there a red circle?" then needs both of."""
    from blip2_internlm.datasets import shapes as data

    yes, no = data.YES_NO[lang]
    other_color = rng.choice([c for c in colors if c != obj["color"]])
    other_shape = rng.choice([s for s in shapes_ if s != obj["shape"]])
    qa = []
    for color in (obj["color"], other_color):
        question = f"is the shape {color}?" if lang == "en" else f"图中形状是{data.PALETTE[color][1]}吗？"
        qa.append((question, yes if color == obj["color"] else no))
    for shape in (obj["shape"], other_shape):
        question = f"is it a {shape}?" if lang == "en" else f"图中是{data.SHAPE_NAMES_ZH[shape]}吗？"
        qa.append((question, yes if shape == obj["shape"] else no))
    return qa


def context_words(obj: dict, lang: str) -> list[str]:
    """The keywords of one object in ``lang``, after a language tag: the words its captions
    and answers use, so a question's colour and shape can be matched to the context's."""
    from blip2_internlm.datasets import shapes as data

    if lang == "en":
        return ["en", obj["color"], obj["shape"], obj["position"]]
    zh = data.PALETTE[obj["color"]][1], data.SHAPE_NAMES_ZH[obj["shape"]], data.POSITION_SLOTS[obj["position"]][2]
    return ["zh", *zh]


def qa_corpus(
    colors=None, shapes=None, positions=None, seed=0, captions_per_object=3, yes_per_object=6, attribute_rounds=2
) -> list[tuple[str, str, str]]:
    """The demo's corpus: (context, prompt, text) triples, keyword-conditioned captions and
    answers, plain captions.

    The keywords come in a random order in each row, so the LLM learns to find an
    attribute by what it is rather than where it stands, for captions and answers alike.
    Per object and language: ``captions_per_object`` captions, one question of each
    non-yes/no kind, ``yes_per_object`` "is there ...?" questions answered yes and as many
    answered no, and ``attribute_rounds`` times a yes and a no question about its colour
    alone and about its shape alone.  Plain rows (no context) hold the captions, as text the LLM has read;
    questions without a context are left out, their answers are not in the text.
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

    rows, plain = [], []
    for obj in _objects(colors, shapes_, positions):
        for lang in ("en", "zh"):
            context = context_words(obj, lang)
            captions = data._captions([obj], lang)
            plain += captions
            rows += [(keywords(*context), CAPTION_PROMPTS[lang], captions[0]) for _ in range(captions_per_object)]
            scene = {"objects": [obj], "target": obj, "exist": ((obj["color"], obj["shape"]), True)}
            qa = [qa for qa, (kind, _) in zip(data._questions(scene, lang), data.QUESTION_TYPES) if kind != "exist"]
            for ask in _exist_asked(obj, colors, shapes_, rng, yes_per_object):
                exist_scene = {**scene, "exist": (ask, ask == (obj["color"], obj["shape"]))}
                qa.append(data._questions(exist_scene, lang)[KINDS.index("exist")])
            for _ in range(attribute_rounds):
                qa += _attribute_questions(obj, lang, colors, shapes_, rng)
            rows += [(keywords(*context), VQA_PROMPTS[lang].format(q), a) for q, a in qa]
    return rows + [("", "", text) for text in plain]


def zh_words(text: str) -> list[str]:
    """``text`` split into the shapes vocabulary's Chinese words (longest match), other
    characters one by one."""
    from blip2_internlm.datasets import shapes as data

    lexicon = {zh for _, zh in data.PALETTE.values()} | set(data.SHAPE_NAMES_ZH.values())
    lexicon |= {zh for _, _, zh in data.POSITION_SLOTS.values()} | set(_FUNCTION_WORDS_ZH)
    lexicon = sorted(lexicon, key=len, reverse=True)
    words, i = [], 0
    while i < len(text):
        word = next((w for w in lexicon if text.startswith(w, i)), text[i])
        words.append(word)
        i += len(word)
    return words


def tokenizer_corpus(rows: list[tuple[str, str, str]]) -> list[str]:
    """Lines to train the tiny tokenizer on: each part of a row on its own, as the model
    tokenizes them (context, prompt and text apart), and Chinese one word a line, so that
    no piece spans two words (InternLM2's own vocabulary has "红色" and "圆形", not
    "红色的圆形")."""
    lines = []
    for row in rows:
        for part in row:
            lines += [line for line in _CJK.sub("\n", part).split("\n") if line.strip()]
            for run in _CJK.findall(part):
                lines += zh_words(run)
    return lines


# --- pretraining -------------------------------------------------------------------------


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _right_padded(rows, pad_id):
    """(ids, attention mask, labels) for (token ids, index of the first labelled token) rows."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, start : len(row)] = ids[i, start : len(row)]
    return ids, mask, labels


def _with_prefix(prefix, embeds, mask, labels):
    """Prepend (B, P, H) prefix embeddings, attended and unlabelled."""
    batch, length = prefix.shape[:2]
    return (
        torch.cat([prefix, embeds], dim=1),
        torch.cat([torch.ones(batch, length, dtype=mask.dtype), mask], dim=1),
        torch.cat([torch.full((batch, length), -100, dtype=labels.dtype), labels], dim=1),
    )


class _PrefixTask:
    """Caption-trained prefixes (module docstring): per language, the caption rows and the
    question rows of every object, and one-hot object codes for the prefix network."""

    def __init__(self, tokenizer, settings: PretrainSettings, seed: int):
        from blip2_internlm.datasets import shapes as data

        self.settings = settings
        self.objects = _objects(data.DEFAULT_COLORS, data.DEFAULT_SHAPES, data.DEFAULT_POSITIONS)
        self.codes = torch.stack(
            [
                torch.cat(
                    [
                        torch.nn.functional.one_hot(torch.tensor(names.index(obj[key])), len(names)).float()
                        for key, names in (
                            ("color", data.DEFAULT_COLORS),
                            ("shape", data.DEFAULT_SHAPES),
                            ("position", data.DEFAULT_POSITIONS),
                        )
                    ]
                )
                for obj in self.objects
            ]
        )
        rng = random.Random(seed)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.captions, self.questions = {}, {}
        for lang in ("en", "zh"):
            head = [bos] + _ids(tokenizer, CAPTION_PROMPTS[lang])
            self.captions[lang] = [
                (head + _ids(tokenizer, data._captions([obj], lang)[0]) + [eos], len(head)) for obj in self.objects
            ]
            self.questions[lang] = []
            for k, obj in enumerate(self.objects):
                scene = {"objects": [obj], "target": obj, "exist": ((obj["color"], obj["shape"]), True)}
                qa = data._questions(scene, lang)[:3]
                for ask in _exist_asked(obj, data.DEFAULT_COLORS, data.DEFAULT_SHAPES, rng, 2):
                    qa.append(data._questions({**scene, "exist": (ask, ask == (obj["color"], obj["shape"]))}, lang)[3])
                for question, answer in qa:
                    head = [bos] + _ids(tokenizer, VQA_PROMPTS[lang].format(question))
                    self.questions[lang].append((k, head + _ids(tokenizer, answer) + [eos], len(head)))
        self.prefixes = {}

    def fit(self, model, pad_id, generator):
        """New prefixes: per language a fresh network, trained on the captions, the LLM frozen."""
        s = self.settings
        table = model.get_input_embeddings()
        width = table.weight.shape[1]
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        model.eval()
        try:
            for lang, rows in self.captions.items():
                net = torch.nn.Sequential(
                    torch.nn.Linear(self.codes.shape[1], 256),
                    torch.nn.GELU(),
                    torch.nn.LayerNorm(256),
                    torch.nn.Linear(256, s.prefix_tokens * width),
                )
                optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
                ids, mask, labels = _right_padded(rows, pad_id)
                embeds = table(ids).detach()
                for _ in range(s.prefix_fit_steps):
                    codes = self.codes + 0.1 * torch.randn(self.codes.shape, generator=generator)
                    prefix = net(codes).view(len(rows), s.prefix_tokens, width)
                    inputs, attention, targets = _with_prefix(prefix, embeds, mask, labels)
                    loss = model(inputs_embeds=inputs, attention_mask=attention, labels=targets).loss
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    self.prefixes[lang] = net(self.codes).view(len(rows), s.prefix_tokens, width)
        finally:
            for p in trainable:
                p.requires_grad_(True)
            model.train()

    def loss(self, model, pad_id, rng):
        """The LM loss of a batch of questions with their object's prefix as the context."""
        lang = rng.choice(sorted(self.prefixes))
        picked = rng.sample(self.questions[lang], self.settings.prefix_batch)
        ids, mask, labels = _right_padded([(row, start) for _, row, start in picked], pad_id)
        prefix = self.prefixes[lang][[k for k, _, _ in picked]]
        embeds, mask, labels = _with_prefix(prefix, model.get_input_embeddings()(ids), mask, labels)
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def _own_rng(train):
    """Runs ``train`` on a fork of torch's global RNG: it seeds itself, and its caller's draws after it are
    the same whether the asset was built now (a cold cache) or read from the cache."""

    @functools.wraps(train)
    def forked(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return train(*args, **kwargs)

    return forked


@_own_rng
def pretrain_for_vqa(
    model_dir, rows: list[tuple[str, str, str]], settings: PretrainSettings | None = None
) -> list[float]:
    """Train the checkpoint in ``model_dir`` on ``context <s> prompt text </s>``; save it back.

    Prompt and text are tokenized apart, as Blip2InternLM does, so the answer starts on the
    same token boundary in pretraining and in generation.  Rows with a context are labelled
    on their text only (the answer or caption), as BLIP-2 labels its captions; plain rows on
    all of it.  The context's embeddings get Gaussian noise (``context_noise`` times the
    embedding table's spread) and a random scale, so the LLM reads a neighbourhood of each
    keyword at any norm, not one point; caption-trained prefixes as in the module docstring.

    Deterministic for a given machine (fixed seeds, one thread).  Returns the loss curve.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = settings or PretrainSettings()
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    pad_id = tokenizer.pad_token_id

    encoded = []
    for context, prompt, text in rows:
        context_ids = _ids(tokenizer, context)
        body = [tokenizer.bos_token_id] + _ids(tokenizer, prompt) + _ids(tokenizer, text) + [tokenizer.eos_token_id]
        start = len(context_ids) + 1 + len(_ids(tokenizer, prompt)) if context else 1
        encoded.append((context_ids, body, start))
    rng = random.Random(s.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    prefix_task = _PrefixTask(tokenizer, s, s.seed) if s.prefix_every else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=s.steps, pct_start=0.1)
    losses = []
    model.train()
    try:
        for step in range(s.steps):
            with_prefixes = prefix_task is not None and step >= s.prefix_start
            if with_prefixes and (step - s.prefix_start) % s.prefix_every == 0:
                prefix_task.fit(model, pad_id, generator)
            batch = rng.sample(encoded, min(s.batch_size, len(encoded)))
            ids, mask, labels = _right_padded([(c + body, start) for c, body, start in batch], pad_id)
            context = torch.zeros_like(ids, dtype=torch.bool)
            for i, (c, _, _) in enumerate(batch):
                context[i, : len(c)] = True
            table = model.get_input_embeddings()
            embeds = table(ids)
            spread = table.weight.detach().std()
            noise = s.context_noise * spread * torch.randn(embeds.shape, generator=generator)
            scale = torch.exp(torch.rand(len(batch), 1, 1, generator=generator) * math.log(s.context_scale))
            embeds = torch.where(context.unsqueeze(-1), (embeds + noise) * scale, embeds)
            loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
            if with_prefixes:
                loss = loss + s.prefix_weight * prefix_task.loss(model, pad_id, rng)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir, safe_serialization=True)
    return losses


# --- the tiny LLM asset's recipe -----------------------------------------------------------
# ``model.llm_model: tiny`` (blip2_internlm.tiny.llm) is built with these two, unchanged, so
# the cached asset and every spec that reads its outputs keep their meaning; the demo's recipe
# above is the one that makes zero-shot VQA work (docs/demo.md).


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


@_own_rng
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


# --- what the pretrained LLM knows -------------------------------------------------------


def text_qa_accuracy(model_dir, langs=("en", "zh"), max_new_tokens=8) -> dict:
    """Percent of questions the LLM answers right from a keyword context, by language and kind.

    Every object is asked every question form with its keywords (in a fixed order, no
    noise) as the context; "is there ...?" three times: about the object (``exist_yes``),
    about one that shares its colour or shape (``exist_no_near``) and one that shares
    neither (``exist_no_far``).  Answers are decoded greedily and cut as ``predict_answers``
    cuts them (first line, no trailing punctuation), then compared with the truth.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blip2_internlm.datasets import shapes as data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    objects = _objects(data.DEFAULT_COLORS, data.DEFAULT_SHAPES, data.DEFAULT_POSITIONS)
    rng = random.Random(0)
    result = {}
    for lang in langs:
        cases = []  # (kind, context <s> prompt ids, answer)
        for obj in objects:
            context = _ids(tokenizer, " ".join(context_words(obj, lang)))
            scene = {"objects": [obj], "target": obj, "exist": ((obj["color"], obj["shape"]), True)}
            asked = _exist_asked(obj, data.DEFAULT_COLORS, data.DEFAULT_SHAPES, rng, 1)
            qa = [(kind, q, a) for kind, (q, a) in zip(KINDS, data._questions(scene, lang)) if kind != "exist"]
            for kind, ask in zip(_YES_NO_KINDS, [asked[0], asked[1], _far(obj, rng)]):
                question, answer = data._questions({**scene, "exist": (ask, kind == "exist_yes")}, lang)[3]
                qa.append((kind, question, answer))
            for kind, question, answer in qa:
                prompt = _ids(tokenizer, VQA_PROMPTS[lang].format(question))
                cases.append((kind, context + [tokenizer.bos_token_id] + prompt, answer))
        # left-padded, so every row's answer starts at the same position
        width = max(len(row) for _, row, _ in cases)
        ids = torch.full((len(cases), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, row, _) in enumerate(cases):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        hits, counts = {}, {}
        for (kind, _, answer), text in zip(cases, texts):
            hits[kind] = hits.get(kind, 0) + (_TRAILING_PUNCT.sub("", text.split("\n", 1)[0].strip()) == answer)
            counts[kind] = counts.get(kind, 0) + 1
        result[lang] = {kind: round(100 * hits[kind] / counts[kind], 1) for kind in counts}
    return result


def _far(obj, rng):
    """An absent (colour, shape) that shares neither attribute with ``obj``."""
    from blip2_internlm.datasets import shapes as data

    far = [(c, s) for c in data.DEFAULT_COLORS for s in data.DEFAULT_SHAPES if c != obj["color"] and s != obj["shape"]]
    return rng.choice(far)


# --- reproducibility ---------------------------------------------------------------------


def recipe(hidden_size: int, num_layers: int, settings: PretrainSettings | None = None) -> dict:
    """What decides the pretrained LLM: corpus, tokenizer text, sizes, settings, the source of
    the code that builds and trains it, and the library versions whose kernels run it."""
    import sentencepiece
    import transformers

    from blip2_internlm.internlm2 import configuration, modeling, tokenization
    from blip2_internlm.tiny import internlm2 as tiny

    rows = qa_corpus()
    sources = [
        Path(module.__file__).read_text(encoding="utf-8") for module in (configuration, modeling, tiny, tokenization)
    ]
    sources.append(Path(__file__).read_text(encoding="utf-8"))
    return {
        "corpus": hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest(),
        "tokenizer_corpus": hashlib.sha256(json.dumps(tokenizer_corpus(rows), ensure_ascii=False).encode()).hexdigest(),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "settings": asdict(settings or PretrainSettings()),
        "source": hashlib.sha256("\0".join(sources).encode()).hexdigest(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentencepiece": sentencepiece.__version__,
        },
    }


def recipe_digest(hidden_size: int, num_layers: int, settings: PretrainSettings | None = None) -> str:
    """Short digest of ``recipe``: a pretrained LLM cached under it is never a stale one."""
    text = json.dumps(recipe(hidden_size, num_layers, settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_pretrained(out, hidden_size: int = 64, num_layers: int = 2, settings: PretrainSettings | None = None) -> dict:
    """Build a tiny InternLM2 in ``out``, pretrain it, check it on text; returns what
    ``pretraining.json`` records (settings, loss curve, text QA accuracy, digest)."""
    from blip2_internlm.tiny.internlm2 import build_tiny_internlm2

    settings = settings or PretrainSettings()
    out = Path(out)
    rows = qa_corpus()
    build_tiny_internlm2(
        out,
        corpus=tokenizer_corpus(rows),
        seed=settings.seed,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
    )
    losses = pretrain_for_vqa(out, rows, settings)
    record = {
        "recipe_digest": recipe_digest(hidden_size, num_layers, settings),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "settings": asdict(settings),
        "rows": len(rows),
        "steps": len(losses),
        "losses": losses,
        "text_qa": text_qa_accuracy(out),
    }
    (out / "pretraining.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None):
    import argparse

    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description="Build a tiny InternLM2 and pretrain it on the shapes text.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (intermediate = 2x)")
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    settings = PretrainSettings(steps=args.steps, seed=args.seed)
    record = build_pretrained(args.out, args.hidden, args.layers, settings)
    losses = record["losses"]
    print(f"pretrained {args.out} for {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print("text QA accuracy from a keyword context:", json.dumps(record["text_qa"]))


if __name__ == "__main__":
    import blip2_internlm  # noqa: F401  (registers the native InternLM2 with the Auto classes)

    main()
