"""Instruction data, InstructBLIP's recipe: each task's examples are phrased by instruction templates
sampled per example, in Chinese and English, and some templates are held out for evaluation.

* :data:`INSTRUCTION_TEMPLATES`: per task (``caption``, ``vqa`` for short answers, ``detail`` for a
  detailed description) and language, the ``train`` templates and the ``heldout`` ones.  A ``{}`` in
  a template is where the question goes; a template without one is followed by nothing.
* :class:`InstructionDataset` turns any LAVIS caption or VQA dataset (samples with ``text_input``,
  and ``answers`` for VQA) into conversations (``messages``) for ``blip2_internlm_instruct``; the
  ``instruction_tuning`` task wraps a dataset with it when its config says ``instruction_task``.
* :func:`shapes_conversations`: LLaVA-format records (``datasets/conversations.py`` reads them) of
  the synthetic shapes data, single-turn with sampled templates and two-turn with a follow-up
  question that only the first turn makes answerable ("图里有圆形吗？" then "它是什么颜色？").
"""

from __future__ import annotations

import json
import os
import random
from types import MappingProxyType

from torch.utils.data import default_collate

from blip2_internlm.datasets.shapes import PALETTE, POSITION_SLOTS, SHAPE_NAMES_ZH, YES_NO
from blip2_internlm.seeding import derived_seed

INSTRUCTION_TASKS = ("caption", "vqa", "detail")

INSTRUCTION_TEMPLATES = MappingProxyType(
    {
        "caption": {
            "zh": {
                "train": [
                    "图片描述：",
                    "用一句话描述这张图片。",
                    "请简要描述图片内容。",
                    "给这张图片写一句说明。",
                    "图里有什么？请用一句话描述。",
                    "这张图片展示了什么？简要回答。",
                    "请为这张图配一句文字说明。",
                    "描述一下你在图中看到的东西。",
                ],
                "heldout": ["简单说说这张图。", "这幅图画了什么？用一句话回答。"],
            },
            "en": {
                "train": [
                    "A short caption:",
                    "Describe the image in one sentence.",
                    "Write a short caption for this picture.",
                    "Briefly describe this image.",
                    "What does this image show? Answer in a sentence.",
                    "What can be seen here? Describe it briefly.",
                    "Caption this picture.",
                    "Tell me what is in the image, in one sentence.",
                ],
                "heldout": [
                    "Give a one-sentence description of the picture.",
                    "What is in this picture? One sentence.",
                ],
            },
        },
        "vqa": {
            "zh": {
                "train": [
                    "问题：{} 简短回答：",
                    "{} 请用一个词回答。",
                    "根据图片回答：{}",
                    "请回答这个问题：{}",
                    "{}",
                    "看这张图：{} 请简短回答。",
                ],
                "heldout": ["看图回答问题：{} 答案：", "{} 简短作答。"],
            },
            "en": {
                "train": [
                    "Question: {} Short answer:",
                    "{} Answer with one word.",
                    "Based on the image, answer: {}",
                    "Please answer the question: {}",
                    "{}",
                    "Look at the image. {} Keep it short.",
                ],
                "heldout": ["Look at the picture and answer: {} Answer:", "{} Reply briefly."],
            },
        },
        "detail": {
            "zh": {
                "train": ["详细描述这张图片。", "请详细说明图中的内容。", "这张图里都有什么？请详细描述。"],
                "heldout": ["仔细看这张图，把你看到的都写下来。"],
            },
            "en": {
                "train": [
                    "Describe this image in detail.",
                    "Give a detailed description of the picture.",
                    "What can you see in this image? Describe it thoroughly.",
                ],
                "heldout": ["Look closely at the image and write down everything you see."],
            },
        },
    }
)
TEMPLATE_SETS = ("train", "heldout")


def instruction(task: str, lang: str, choice: int, question: str | None = None, templates: str = "train") -> str:
    """The ``choice``-th (modulo their number) ``templates`` instruction of ``task`` in ``lang``, with ``question``."""
    if task not in INSTRUCTION_TEMPLATES:
        raise ValueError(f"instruction task {task!r}; expected one of {list(INSTRUCTION_TASKS)}")
    if lang not in INSTRUCTION_TEMPLATES[task]:
        raise ValueError(f"instruction language {lang!r}; expected one of {sorted(INSTRUCTION_TEMPLATES[task])}")
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"instruction templates {templates!r}; expected one of {list(TEMPLATE_SETS)}")
    options = INSTRUCTION_TEMPLATES[task][lang][templates]
    template = options[choice % len(options)]
    if "{}" in template:
        if question is None:
            raise ValueError(f"the {task} template {template!r} needs a question")
        return template.format(question)
    return template if question is None else f"{template}{question}"


class InstructionDataset:
    """A LAVIS dataset whose samples get ``messages``: one user turn (a sampled instruction, with the sample's
    ``text_input`` as the question for ``vqa``) and the assistant's answer (``text_input`` for ``caption`` and
    ``detail``, the most frequent of ``answers`` for ``vqa``).

    The template is drawn from (``seed``, epoch, index), so a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, inner, task: str, lang: str, seed: int = 42, templates: str = "train"):
        instruction(task, lang, 0, "?", templates)  # checks task, language and template set
        self.inner, self.task, self.lang, self.seed, self.templates = inner, task, lang, seed, templates
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):  # LAVIS reads the inner dataset's attributes (annotation, vis_processor, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __getitem__(self, index):
        sample = dict(self.inner[index])
        choice = random.Random(derived_seed(self.seed, self.epoch, index)).randrange(1 << 30)
        if self.task == "vqa":
            answers, weights = sample.get("answers"), sample.get("weights")
            if not answers:
                raise ValueError(f"sample {index}: a vqa instruction sample needs 'answers'")
            answer = answers[max(range(len(answers)), key=lambda i: weights[i] if weights else 0)]
            prompt = instruction("vqa", self.lang, choice, sample["text_input"], self.templates)
        else:
            answer, prompt = sample["text_input"], instruction(self.task, self.lang, choice, None, self.templates)
        sample["messages"] = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        sample["text_input"] = answer
        sample.pop("answers", None), sample.pop("weights", None)
        return sample

    def collater(self, samples):
        """``default_collate`` of the samples (their VQA answer lists are gone), with ``messages`` kept per sample."""
        messages = [sample.pop("messages") for sample in samples]
        batch = default_collate(samples)
        batch["messages"] = messages
        return batch


# --- the shapes data as conversations ----------------------------------------------------------------

SHAPE_FOLLOW_UPS = MappingProxyType(
    {
        "exist": {"zh": "图里有{}吗？", "en": "is there a {}?"},
        "color": {"zh": "它是什么颜色？", "en": "what color is it?"},
        "position": {"zh": "它在哪里？", "en": "where is it?"},
    }
)


def _shape_word(shape: str, lang: str) -> str:
    return SHAPE_NAMES_ZH[shape] if lang == "zh" else shape


def follow_up(scene_objects: list[dict], shape: str, kind: str, lang: str) -> tuple[list[tuple[str, str]], str]:
    """Two turns about ``shape``: "is there a {shape}?" and its answer, then the ``kind`` (color or position)
    question about it ("it") and its answer.  Returns ([(question, answer)] of turn 1, turn-2 question) and the
    turn-2 answer; the shape must be in the scene exactly once."""
    matching = [o for o in scene_objects if o["shape"] == shape]
    if len(matching) != 1:
        raise ValueError(f"a follow-up needs exactly one {shape} in the scene, there are {len(matching)}")
    target = matching[0]
    yes = YES_NO[lang][0]
    first = (SHAPE_FOLLOW_UPS["exist"][lang].format(_shape_word(shape, lang)), yes)
    second = SHAPE_FOLLOW_UPS[kind][lang]
    if kind == "color":
        answer = PALETTE[target["color"]][1] if lang == "zh" else target["color"]
    else:
        answer = POSITION_SLOTS[target["position"]][2] if lang == "zh" else target["position"]
    return [first, (second, None)], answer


def _llava(record_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for number, (question, answer) in enumerate(turns):
        question = f"<image>\n{question}" if number == 0 else question
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "conversations": conversations}


CONVERSATION_KINDS = ("caption", "vqa", "exist", "follow_up")


def shapes_conversations(
    scenes: list[dict],
    captions: list[str],
    questions: list[list[tuple[str, str]]],
    images: list[str],
    lang: str,
    kinds: tuple[str, ...] = CONVERSATION_KINDS,
    vqa_per_image: int | None = None,
) -> list[dict]:
    """LLaVA records for the training images of the shapes data, every one phrased with a ``train`` template.

    Per image, of ``kinds``: ``caption``, its caption; ``vqa``, its questions (``vqa_per_image`` of them, taken
    in turn from image to image, or all); ``exist``, "is there a {shape}?" (yes or no) for one shape, in turn;
    ``follow_up``, for each shape it holds once, that question followed by "what color is it?" or "where is
    it?" (in turn).  ``scenes[i]["objects"]`` are the drawn objects of ``images[i]``."""
    unknown = set(kinds) - set(CONVERSATION_KINDS)
    if unknown:
        raise ValueError(f"conversation kinds {sorted(unknown)}; expected some of {list(CONVERSATION_KINDS)}")
    shape_names = list(SHAPE_NAMES_ZH)
    records = []
    for i, (scene, caption, qa, image) in enumerate(zip(scenes, captions, questions, images, strict=True)):
        rng = random.Random(derived_seed(0, i, len(lang)))
        if "caption" in kinds:
            records.append(_llava(f"{i}-caption", image, [(instruction("caption", lang, rng.randrange(99)), caption)]))
        if "vqa" in kinds:
            picked = range(len(qa)) if vqa_per_image is None else [(i + j) % len(qa) for j in range(vqa_per_image)]
            for k in picked:
                question, answer = qa[k]
                turn = (instruction("vqa", lang, rng.randrange(99), question), answer)
                records.append(_llava(f"{i}-vqa{k}", image, [turn]))
        shapes = [o["shape"] for o in scene["objects"]]
        if "exist" in kinds:
            # the first turn alone too: a question followed by a second one must not mean "yes"
            shape = shape_names[i % len(shape_names)]
            question = SHAPE_FOLLOW_UPS["exist"][lang].format(_shape_word(shape, lang))
            records.append(_llava(f"{i}-exist", image, [(question, YES_NO[lang][shape not in shapes])]))
        if "follow_up" in kinds:
            for k, shape in enumerate(s for s in shape_names if shapes.count(s) == 1):
                kind = ("color", "position")[(i + k) % 2]
                (first, (second, _)), answer = follow_up(scene["objects"], shape, kind, lang)
                records.append(_llava(f"{i}-follow{k}", image, [first, (second, answer)]))
    return records


def write_json(path: str, records) -> str:
    """ASCII-escaped JSON (LAVIS reads some files without an encoding); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    os.replace(tmp, path)
    return path
