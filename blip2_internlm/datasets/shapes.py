"""Deterministic synthetic "coloured shapes" data for the tests and the CPU demo.

Small RGB images of coloured shapes, with English and Chinese captions and VQA pairs,
written in the file formats LAVIS reads, so its caption datasets, ``VQATask`` and
``VQAEval`` score them unchanged.  The caption is a deterministic function of what is
drawn, so a tiny model can learn it to exact match.

Default task: one object per image, 4 colours x 3 shapes x 3 horizontal positions, on a
light grey background with small jitter of size and position and light pixel noise.
``max_objects`` (2..3) puts several objects in distinct positions, for counting.

Layout under ``out_dir`` (``i`` counts from 0 in each split)::

    manifest.json                              version, args, counts, relative paths
    images/{split}/{split}_{i:05d}.png
    annotations/caption_{lang}_{split}.json    train: [{image, caption: str, image_id}]
                                               val/test: [{image, caption: [refs],
                                                           image_id, image_id_int}]
    annotations/caption_{lang}_{split}_gt.json val/test: COCO captions ground truth
    annotations/vqa_{lang}_{split}.json        [{question_id, question, answer: [10],
                                                 image, image_id, dataset}]
    annotations/vqa_{lang}_{split}_questions.json    val/test: VQAv2 questions
    annotations/vqa_{lang}_{split}_annotations.json  val/test: VQAv2 annotations
    annotations/answer_list_{lang}.json        every answer the args allow

Ids.  The string ``image_id`` is ``shapes_{split}_{i:05d}`` (like LAVIS's ``coco_123456``).
The integer image id, used by the COCO caption ground truth (``image_id_int`` in the
caption records) and by every VQA file, is ``split_code * 100000 + i`` with split codes
train=1, val=2, test=3.  Question ids are ``lang_code * 10**7 + split_code * 10**6 +
i * 10 + question_index`` with en=1, zh=2, so they are unique across splits and languages.
Caption references: the first one is canonical (the only one for train), then one
paraphrase; COCO annotation ids are ``image_id_int * 10 + reference_index``.

VQA answers are already in the form ``VQAEval`` compares against: lowercase English
without punctuation or articles, numbers as Arabic digits in both languages (VQAEval maps
"two" to "2" but leaves "两"/"二" alone), Chinese "是"/"否" for yes/no.  Every question
lists its answer 10 times with answer_id 1..10: VQAEval's leave-one-out compares answer
dicts, so identical dicts would score a correct prediction as 0.

Repeat calls are cheap: if ``out_dir`` holds a complete manifest with the same version,
args and content fingerprint, and its files are there, it is returned as is.  The
fingerprint is a digest of what this code writes for the args (every single-object caption,
question and answer, a few sampled scenes with their text and pixels), so an edit of the
captions, questions, palette or drawing regenerates the data even where the version was
not bumped (a complete manifest without one, written before it was recorded, is trusted
once and given the fingerprint).  Otherwise the generator's own
outputs (``images/``, ``annotations/``, ``manifest.json``) are removed and written again;
other files in ``out_dir`` are left alone.  A directory whose ``images/``,
``annotations/`` or ``manifest.json`` this generator did not write is refused
(``FileExistsError``) rather than deleted.  Not safe for concurrent callers.

Same seed and args give byte-identical files with the same Pillow/zlib; each image draws
from its own random stream, so changing one split's size leaves the other splits' images
as they were.  JSON is written ASCII-escaped because LAVIS opens annotation files without
an encoding, which breaks Chinese under a non-UTF-8 locale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

# Bump when the same args would produce different files, so stale data is regenerated.
GENERATOR_VERSION = 1
DATASET_NAME = "shapes"

# Saturated and far apart in hue, so each survives 64 px, noise and resizing.
PALETTE = MappingProxyType(
    {
        "red": ((220, 40, 40), "红色"),
        "green": ((30, 160, 60), "绿色"),
        "blue": ((40, 80, 220), "蓝色"),
        "yellow": ((235, 200, 30), "黄色"),
        "purple": ((140, 60, 190), "紫色"),
        "orange": ((245, 130, 20), "橙色"),
    }
)
SHAPE_NAMES_ZH = MappingProxyType({"circle": "圆形", "square": "正方形", "triangle": "三角形"})
# x centre as a fraction of the width; English phrase; Chinese word.
POSITION_SLOTS = MappingProxyType(
    {
        "left": (1 / 6, "on the left", "左边"),
        "center": (1 / 2, "in the center", "中间"),
        "right": (5 / 6, "on the right", "右边"),
    }
)
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
DEFAULT_SHAPES = ("circle", "square", "triangle")
DEFAULT_POSITIONS = ("left", "center", "right")
DEFAULT_SPLITS = MappingProxyType({"train": 2000, "val": 200, "test": 200})

SPLIT_CODES = MappingProxyType({"train": 1, "val": 2, "test": 3})
LANG_CODES = MappingProxyType({"en": 1, "zh": 2})
MAX_PER_SPLIT = 99_999  # five-digit file names and the id encoding above

BACKGROUND = (230, 230, 230)
NOISE = 6  # +-, per channel: enough that no two images are byte-equal, far below colour gaps
# Radius and jitter as fractions of the image size.  Radius + x jitter <= 0.15 < 1/6, so
# each object stays inside its third of the width: the position word is never ambiguous
# and neighbours keep a gap of about 2 px at 64 px.
RADIUS_RANGE = (0.10, 0.13)
X_JITTER = 0.02
Y_JITTER = 0.12

# (question type, answer type) in question_index order.
QUESTION_TYPES = (
    ("color", "other"),
    ("shape", "other"),
    ("position", "other"),
    ("exist", "yes/no"),
    ("count", "number"),
)
YES_NO = MappingProxyType({"en": ("yes", "no"), "zh": ("是", "否")})


def generate_shapes(
    out_dir, *, splits=DEFAULT_SPLITS, image_size=64, seed=0, max_objects=1, colors=None, shapes=None, positions=None
) -> dict:
    """Writes the dataset under ``out_dir`` (or reuses it) and returns its manifest.

    The returned dict is ``manifest.json`` plus ``root`` (absolute out_dir), ``seconds``
    and ``reused``; those three stay out of the file so reruns are byte-identical.
    """
    started = time.perf_counter()
    args = _normalise_args(splits, image_size, seed, max_objects, colors, shapes, positions)
    root = os.path.abspath(os.fspath(out_dir))
    manifest_path = os.path.join(root, "manifest.json")

    fingerprint = content_fingerprint(args)
    previous = _read_manifest(manifest_path)
    reused = previous is not None and _is_complete(root, previous, args, fingerprint)
    if reused:
        manifest = previous
        if "fingerprint" not in manifest:
            # adopted: from now on an edit of the generator is noticed here too
            manifest = {**manifest, "fingerprint": fingerprint}
            _write_json(manifest_path, manifest)
    else:
        _claim_and_clear(root, previous)
        manifest = _write_dataset(root, args, fingerprint)
        # Written last: "complete" in the file means every other file is there.
        _write_json(manifest_path, manifest)
    return {**manifest, "root": root, "seconds": time.perf_counter() - started, "reused": reused}


def _normalise_args(splits, image_size, seed, max_objects, colors, shapes, positions):
    colors = _check_names("colors", DEFAULT_COLORS if colors is None else colors, PALETTE)
    shapes = _check_names("shapes", DEFAULT_SHAPES if shapes is None else shapes, SHAPE_NAMES_ZH)
    positions = _check_names("positions", DEFAULT_POSITIONS if positions is None else positions, POSITION_SLOTS)
    unknown = set(splits) - set(SPLIT_CODES)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; use {list(SPLIT_CODES)}")
    for name, count in splits.items():
        if not isinstance(count, int) or not 0 <= count <= MAX_PER_SPLIT:
            raise ValueError(f"split {name!r}: count must be an int in 0..{MAX_PER_SPLIT}, got {count!r}")
    # Canonical order, zero-sized splits dropped, so equal requests compare equal.
    splits = {name: splits[name] for name in SPLIT_CODES if splits.get(name)}
    if not splits:
        raise ValueError("no split has any images")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(image_size, int) or image_size < 24:
        raise ValueError(f"image_size must be an int >= 24, got {image_size!r}")
    if not isinstance(max_objects, int) or not 1 <= max_objects <= len(positions):
        raise ValueError(f"max_objects must be in 1..{len(positions)} (one object per position)")
    # Each object is a distinct colour+shape, and a "no" question needs one more that is absent.
    if len(colors) * len(shapes) <= max_objects:
        raise ValueError("need more colour x shape combinations than max_objects")
    return {
        "splits": splits,
        "image_size": image_size,
        "seed": seed,
        "max_objects": max_objects,
        "colors": colors,
        "shapes": shapes,
        "positions": positions,
    }


def _check_names(kind, names, known):
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"{kind} must be distinct names from {list(known)}, got {names!r}")
    return names


def _read_manifest(path):
    """The manifest at path; None if there is none, {} if it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _is_complete(root, manifest, args, fingerprint):
    if not (
        manifest.get("complete") is True
        and manifest.get("dataset") == DATASET_NAME
        and manifest.get("version") == GENERATOR_VERSION
        and manifest.get("args") == args
        # manifests written before fingerprints were recorded are trusted as before
        and manifest.get("fingerprint", None) in (None, fingerprint)
    ):
        return False
    try:
        paths = [p for group in manifest["files"].values() for p in _leaves(group)]
        paths += [_image_path(split, i) for split, n in args["splits"].items() for i in range(n)]
    except (KeyError, AttributeError, TypeError):
        return False
    return all(os.path.isfile(os.path.join(root, p)) for p in paths)


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _claim_and_clear(root, previous):
    """Marks root as this generator's, unfinished, and removes its old outputs."""
    owned = [os.path.join(root, d) for d in ("images", "annotations")]
    ours = previous is not None and previous.get("dataset") == DATASET_NAME
    if not ours and (previous is not None or any(os.path.exists(p) for p in owned)):
        raise FileExistsError(
            f"{root} has a manifest.json, images/ or annotations/ that this generator did "
            "not write; refusing to overwrite them"
        )
    os.makedirs(root, exist_ok=True)
    # Claimed before clearing, so a run that dies halfway is still ours to redo next time,
    # and an old complete manifest never vouches for half-replaced files.
    _write_json(os.path.join(root, "manifest.json"), {"dataset": DATASET_NAME, "complete": False})
    for path in owned:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _write_dataset(root, args, fingerprint):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    files = {"answer_list": {}}
    counts = {}
    for split, n in args["splits"].items():
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        scenes = []
        for i in range(n):
            rng = np.random.default_rng([args["seed"], SPLIT_CODES[split], i])
            scene = _sample_scene(rng, i, args)
            _draw(scene, rng, args["image_size"]).save(os.path.join(root, _image_path(split, i)), format="PNG")
            scenes.append(scene)
        files[split] = {lang: _write_annotations(root, split, lang, scenes) for lang in LANG_CODES}
        counts[split] = {"images": n, "questions_per_language": n * len(QUESTION_TYPES)}
    for lang in LANG_CODES:
        files["answer_list"][lang] = path = f"annotations/answer_list_{lang}.json"
        _write_json(os.path.join(root, path), _answer_list(lang, args))
    return {
        "dataset": DATASET_NAME,
        "version": GENERATOR_VERSION,
        "fingerprint": fingerprint,
        "complete": True,
        "args": args,
        "counts": counts,
        "files": files,
    }


#: Scenes drawn for the fingerprint come from this split code, which no split uses.
_PROBE_SPLIT_CODE = 0
_PROBE_SCENES = 4


def content_fingerprint(args) -> str:
    """Digest of what the generator writes for ``args`` (normalised), without writing it.

    Every single-object caption and question in both languages, the answer lists, and a
    few scenes sampled and drawn as the splits' are (text and raw pixels, so it does not
    depend on the PNG encoder): a change to any of the functions that make them changes it.
    """
    digest = hashlib.sha256()
    for color in args["colors"]:
        for shape in args["shapes"]:
            for position in args["positions"]:
                obj = {"color": color, "shape": shape, "position": position}
                for other in args["colors"]:
                    scene = {"objects": [obj], "target": obj, "exist": ((other, shape), other == color)}
                    for lang in LANG_CODES:
                        digest.update(json.dumps([_captions([obj], lang), _questions(scene, lang)]).encode())
    for lang in LANG_CODES:
        digest.update(json.dumps(_answer_list(lang, args)).encode())
    for i in range(_PROBE_SCENES):
        rng = np.random.default_rng([args["seed"], _PROBE_SPLIT_CODE, i])
        scene = _sample_scene(rng, i, args)
        digest.update(json.dumps([_captions(scene["objects"], lang) for lang in LANG_CODES]).encode())
        digest.update(json.dumps([_questions(scene, lang) for lang in LANG_CODES]).encode())
        digest.update(np.asarray(_draw(scene, rng, args["image_size"])).tobytes())
    return digest.hexdigest()[:16]


def _image_path(split, i):
    return f"images/{split}/{split}_{i:05d}.png"


# --- scenes: what is drawn, in a language-neutral form -------------------------------


def _sample_scene(rng, i, args):
    """Objects (left to right) and the question choices for one image."""
    size = args["image_size"]
    n = int(rng.integers(1, args["max_objects"] + 1))
    slots = sorted(
        rng.choice(len(args["positions"]), n, replace=False), key=lambda k: POSITION_SLOTS[args["positions"][k]][0]
    )
    combos = [(c, s) for c in args["colors"] for s in args["shapes"]]
    picked = rng.choice(len(combos), n, replace=False)
    objects = []
    for slot, combo in zip(slots, picked):
        position = args["positions"][slot]
        objects.append(
            {
                "color": combos[combo][0],
                "shape": combos[combo][1],
                "position": position,
                "cx": size * (POSITION_SLOTS[position][0] + rng.uniform(-X_JITTER, X_JITTER)),
                "cy": size * (0.5 + rng.uniform(-Y_JITTER, Y_JITTER)),
                "r": size * rng.uniform(*RADIUS_RANGE),
            }
        )
    # Alternating by index makes yes/no exactly balanced; the image content is independent of i.
    present = {(o["color"], o["shape"]) for o in objects}
    if i % 2 == 0:
        asked = objects[int(rng.integers(n))]
        exist = ((asked["color"], asked["shape"]), True)
    else:
        absent = [c for c in combos if c not in present]
        exist = (absent[int(rng.integers(len(absent)))], False)
    return {"split_index": i, "objects": objects, "target": objects[int(rng.integers(n))], "exist": exist}


def _draw(scene, rng, size):
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        cx, cy, r, fill = o["cx"], o["cy"], o["r"], PALETTE[o["color"]][0]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            h = 0.9 * r  # a bit smaller, so a square does not look bigger than a circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # triangle pointing up; the centre (cx, cy) stays inside it
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    noise = rng.integers(-NOISE, NOISE + 1, size=(size, size, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# --- text ----------------------------------------------------------------------------


def _captions(objects, lang):
    """[canonical, paraphrase]; the canonical one is what a model must learn exactly."""
    if lang == "en":
        parts = [f"a {o['color']} {o['shape']} {POSITION_SLOTS[o['position']][1]}" for o in objects]
        canonical = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return [canonical, "there is " + canonical]
    words = [(POSITION_SLOTS[o["position"]][2], PALETTE[o["color"]][1], SHAPE_NAMES_ZH[o["shape"]]) for o in objects]
    return ["，".join(f"{p}有一个{c}的{s}" for p, c, s in words), "，".join(f"一个{c}的{s}在{p}" for p, c, s in words)]


def _questions(scene, lang):
    """(question, answer) per QUESTION_TYPES entry."""
    objects, target = scene["objects"], scene["target"]
    (exist_color, exist_shape), exist_answer = scene["exist"]
    _, pos_en, pos_zh = POSITION_SLOTS[target["position"]]
    single = len(objects) == 1  # several objects need the question to say which one
    yes, no = YES_NO[lang]
    if lang == "en":
        return [
            ("what color is the shape?" if single else f"what color is the shape {pos_en}?", target["color"]),
            ("what shape is it?" if single else f"what shape is {pos_en}?", target["shape"]),
            (f"where is the {target['color']} {target['shape']}?", target["position"]),
            (f"is there a {exist_color} {exist_shape}?", yes if exist_answer else no),
            ("how many shapes are there?", str(len(objects))),
        ]
    color_zh, shape_zh = PALETTE[target["color"]][1], SHAPE_NAMES_ZH[target["shape"]]
    return [
        ("图中形状是什么颜色？" if single else f"{pos_zh}的形状是什么颜色？", color_zh),
        ("图中是什么形状？" if single else f"{pos_zh}是什么形状？", shape_zh),
        (f"{color_zh}的{shape_zh}在什么位置？", pos_zh),
        (f"图中有{PALETTE[exist_color][1]}的{SHAPE_NAMES_ZH[exist_shape]}吗？", yes if exist_answer else no),
        ("图中有几个形状？", str(len(objects))),
    ]


def _answer_list(lang, args):
    if lang == "en":
        words = [*args["colors"], *args["shapes"], *args["positions"]]
    else:
        words = [PALETTE[c][1] for c in args["colors"]] + [SHAPE_NAMES_ZH[s] for s in args["shapes"]]
        words += [POSITION_SLOTS[p][2] for p in args["positions"]]
    return words + list(YES_NO[lang]) + [str(k) for k in range(1, args["max_objects"] + 1)]


# --- files ---------------------------------------------------------------------------


def _write_annotations(root, split, lang, scenes):
    """Writes one language's caption and VQA files for a split; returns their paths."""
    is_train = split == "train"
    code = SPLIT_CODES[split]
    captions, gt_images, gt_anns = [], [], []
    vqa, questions, answers = [], [], []
    for scene in scenes:
        i = scene["split_index"]
        image, image_int = _image_path(split, i), code * 100_000 + i
        refs = _captions(scene["objects"], lang)
        record = {
            "image": image,
            "caption": refs[0] if is_train else refs,
            "image_id": f"{DATASET_NAME}_{split}_{i:05d}",
        }
        if not is_train:
            record["image_id_int"] = image_int
            gt_images.append({"id": image_int})
            gt_anns += [{"image_id": image_int, "caption": c, "id": image_int * 10 + k} for k, c in enumerate(refs)]
        captions.append(record)
        for q, ((question, answer), (qtype, atype)) in enumerate(zip(_questions(scene, lang), QUESTION_TYPES)):
            qid = LANG_CODES[lang] * 10**7 + code * 10**6 + i * 10 + q
            vqa.append(
                {
                    "question_id": qid,
                    "question": question,
                    "answer": [answer] * 10,
                    "image": image,
                    "image_id": image_int,
                    "dataset": DATASET_NAME,
                }
            )
            questions.append({"image_id": image_int, "question": question, "question_id": qid})
            answers.append(
                {
                    "question_id": qid,
                    "image_id": image_int,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)],
                }
            )

    stem = f"annotations/{{}}_{lang}_{split}"
    paths = {"caption": stem.format("caption") + ".json", "vqa": stem.format("vqa") + ".json"}
    if not is_train:
        paths["caption_gt"] = stem.format("caption") + "_gt.json"
        paths["vqa_questions"] = stem.format("vqa") + "_questions.json"
        paths["vqa_annotations"] = stem.format("vqa") + "_annotations.json"
    contents = {
        "caption": captions,
        "vqa": vqa,
        "caption_gt": {"images": gt_images, "annotations": gt_anns, "info": {}, "licenses": [], "type": "captions"},
        # The header fields are the ones VQA.loadRes copies from the questions file.
        "vqa_questions": {
            "info": {"description": f"{DATASET_NAME} {lang} {split}"},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "license": {},
            "data_subtype": f"{DATASET_NAME}_{lang}_{split}",
            "questions": questions,
        },
        "vqa_annotations": {
            "info": {"description": f"{DATASET_NAME} {lang} {split}"},
            "license": {},
            "data_subtype": f"{DATASET_NAME}_{lang}_{split}",
            "annotations": answers,
        },
    }
    for kind, path in paths.items():
        _write_json(os.path.join(root, path), contents[kind])
    return paths


def _write_json(path, obj):
    # json.dumps, unlike json.dump, uses the C encoder: most of the run time otherwise.
    # Replaced in one step, so a crash never leaves a truncated manifest behind.
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(json.dumps(obj, ensure_ascii=True))
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_SPLITS.items():
        parser.add_argument(f"--{split}", type=int, default=n, help=f"{split} images (0 skips)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-objects", type=int, default=1)
    ns = parser.parse_args(argv)
    manifest = generate_shapes(
        ns.out,
        splits={s: getattr(ns, s) for s in DEFAULT_SPLITS},
        image_size=ns.image_size,
        seed=ns.seed,
        max_objects=ns.max_objects,
    )
    summary = {k: manifest[k] for k in ("root", "counts", "reused")}
    print(json.dumps({**summary, "seconds": round(manifest["seconds"], 3)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def text_corpus(colors=DEFAULT_COLORS, shapes=DEFAULT_SHAPES, positions=DEFAULT_POSITIONS) -> list[str]:
    """Every single-object caption, question and answer, in both languages.

    Text for tokenizers and language models that must know the shapes vocabulary without
    seeing any image (the tiny LLM's SentencePiece model is trained on it).
    """
    lines = []
    for color in colors:
        for shape in shapes:
            for position in positions:
                obj = {"color": color, "shape": shape, "position": position}
                scene = {"objects": [obj], "target": obj, "exist": ((color, shape), True)}
                for lang in LANG_CODES:
                    lines += _captions([obj], lang)
                    lines += [f"{q} {a}" for q, a in _questions(scene, lang)]
    return lines


def scene_texts(
    args: dict, split: str, lang: str
) -> tuple[list[dict], list[str], list[list[tuple[str, str]]], list[str]]:
    """The scenes of a generated split (as drawn, recomputed without drawing), with each one's canonical
    caption, its (question, answer) pairs in ``QUESTION_TYPES`` order and its image path under the root;
    ``args`` as ``generate_shapes`` takes them (``_normalise_args`` order)."""
    args = _normalise_args(
        **{key: args.get(key) for key in ("splits", "image_size", "seed", "max_objects")},
        colors=args.get("colors"),
        shapes=args.get("shapes"),
        positions=args.get("positions"),
    )
    scenes = [
        _sample_scene(np.random.default_rng([args["seed"], SPLIT_CODES[split], i]), i, args)
        for i in range(args["splits"][split])
    ]
    captions = [_captions(scene["objects"], lang)[0] for scene in scenes]
    questions = [_questions(scene, lang) for scene in scenes]
    return scenes, captions, questions, [_image_path(split, i) for i in range(len(scenes))]
