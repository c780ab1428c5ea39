"""A small MMBench-format TSV from the synthetic shapes images, for the tiny evaluation and the specs.

``python -m blip2_internlm.datasets.mmbench_shapes --out shapes.tsv [--lang zh|en] [--images 16]
[--no-answers]`` writes one; the ``synthetic`` key of the ``mmbench`` dataset config has the builder
write (and cache) one on first use.  Per image a colour and a shape question in the shapes data's own
wording, four options each, categories ``color`` and ``shape``; the format is in
``datasets/mmbench.py`` and docs/mmbench.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import sys
import tempfile

import numpy as np

from blip2_internlm.datasets.shapes import PALETTE, SHAPE_NAMES_ZH, generate_shapes, scene_texts

LANGS = ("zh", "en")

#: Distractors beyond the shapes the generator draws, so every shape question has four options.
EXTRA_SHAPES = {"pentagon": "五边形", "star": "星形", "hexagon": "六边形"}
SHAPES_TSV_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category"]
SHAPES_TSV_HEADER += ["image", "source", "split", "comment"]


def write_shapes_tsv(
    path, *, lang: str = "zh", images: int = 16, seed: int = 0, image_size: int = 64, answers: bool = True
) -> dict:
    """Write an MMBench-format TSV of ``2 * images`` questions about the synthetic shapes images.

    Per image a ``shape`` and a ``color`` question (the shapes data's own wording, e.g.
    "图中是什么形状？"), four options with the right one at a seeded position, every third question
    with a hint; ``answers=False`` leaves the answer column empty, as in a test split.  Returns
    ``{"path", "questions", "answers"}``.
    """
    if lang not in LANGS:
        raise ValueError(f"lang = {lang!r}; expected one of {LANGS}")
    rng = np.random.default_rng([seed, 7])
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_shapes(tmp, splits={"test": int(images)}, image_size=image_size, seed=seed)
        scenes, _, questions, image_paths = scene_texts(manifest["args"], "test", lang)
        encoded = []
        for image_path in image_paths:
            with open(os.path.join(tmp, image_path), "rb") as handle:
                encoded.append(base64.b64encode(handle.read()).decode("ascii"))
    shape_names = {**{s: (s, z) for s, z in SHAPE_NAMES_ZH.items()}, **{s: (s, z) for s, z in EXTRA_SHAPES.items()}}
    color_names = {c: (c, z) for c, (_, z) in PALETTE.items()}
    kinds = (("color", 0, color_names), ("shape", 1, shape_names))  # QUESTION_TYPES order of the shapes data
    rows = []
    for i, (scene, pairs) in enumerate(zip(scenes, questions)):
        for kind, position, names in kinds:
            question, _ = pairs[position]
            right = scene["target"][kind]
            wrong = [name for name in names if name != right]
            options = [right] + [wrong[k] for k in rng.choice(len(wrong), 3, replace=False)]
            order = rng.permutation(4)
            shown = [options[k] for k in order]
            texts = [names[name][0 if lang == "en" else 1] for name in shown]
            number = len(rows)
            hint = ""
            if number % 3 == 0:
                hint = "There is one shape in the image." if lang == "en" else "图中只有一个形状。"
            answer = "ABCD"[shown.index(right)] if answers else ""
            # the shape question refers to the colour question's image by its index, as MMBench files may
            image = encoded[i] if kind == "color" else str(number - 1)
            split = "dev" if answers else "test"
            rows.append([str(number), question, hint, *texts, answer, kind, "perception", image, "shapes", split, ""])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(SHAPES_TSV_HEADER)
        writer.writerows(rows)
    os.replace(tmp_path, path)
    return {"path": str(path), "questions": len(rows), "answers": bool(answers)}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write an MMBench-format TSV from the synthetic shapes images.")
    parser.add_argument("--out", required=True, help="the .tsv file to write")
    parser.add_argument("--lang", choices=LANGS, default="zh")
    parser.add_argument("--images", type=int, default=16, help="images; two questions each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-answers", action="store_true", help="leave the answer column empty (a test split)")
    ns = parser.parse_args(argv)
    written = write_shapes_tsv(
        ns.out, lang=ns.lang, images=ns.images, seed=ns.seed, image_size=ns.image_size, answers=not ns.no_answers
    )
    print(json.dumps(written, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
