"""``make demo-instruct`` (``python -m blip2_internlm.tools.demo_instruct``): instruction tuning on the shapes data.

(0) the demo's pretrained tiny InternLM2 (cached; the same LLM as ``make demo``'s), (1) stage 1 with
LAVIS's own ``blip2`` and (2) stage 2 with ``blip2_internlm`` on the captions of ``make demo``'s
one-object images, then (3) ``blip2_internlm_instruct`` trained from the stage-2 checkpoint on
LLaVA-format conversations written from the shapes data (``datasets/instructions.py``): captions and
questions of the one-object images phrased by sampled ``train`` instruction templates, and on images
of one or two objects, "is there a {shape}?" alone and followed by "what color is it?" or "where is
it?".  (3) runs twice: with the LLM frozen as it is (``frozen``) and with LoRA adapters on it
(``lora``).  (4) On held-out images:

* **held-out templates**: every caption and question of the one-object test images phrased by the
  ``heldout`` templates, which training never saw; exact answers, in percent;
* **second turn**: "图里有圆形吗？" (is there a circle?) answered by the model, then "它是什么颜色？"
  (what color is it?) or "它在哪里？" (where is it?) with the model's own first answer in the
  history, for every shape that a two-object test image holds once: "it" is only defined by the first
  turn.  Exact answers of the second turn (and of the first), in percent.

Stages 1-3 run as ``python -m torch.distributed.run --nproc_per_node=2 -m blip2_internlm.train``
with two gloo processes, as users run them.  ``--seeds 42,1,2`` repeats stages 1-4 per seed and
reports mean, standard deviation, minimum and maximum.  Writes ``OUTPUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from blip2_internlm.datasets.builders import default_data_root, generator_args
from blip2_internlm.datasets.instructions import (
    follow_up,
    instruction,
    shapes_conversations,
    write_json,
)
from blip2_internlm.datasets.shapes import generate_shapes, scene_texts
from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS
from blip2_internlm.tools import demo
from blip2_internlm.tools.demo import CONFIGS, latest_job, parse_seeds, pretrained_llm, step_losses, torchrun

#: Captions and short answers: ``make demo``'s data (one object per image; stages 1-2 train on its captions).
SINGLE = demo.GENERATOR
#: Follow-ups: images of one or two objects, so that "it" in a second turn is only defined by the first.
PAIRS = {"seed": 0, "train": 1500, "val": 0, "test": 200, "image_size": 64, "max_objects": 2}
#: The two variants trained per seed: the LLM frozen as it is, and LoRA adapters on it.
VARIANTS = {"frozen": {}, "lora": {"llm_lora": {"r": 8, "alpha": 16, "dropout": 0.05}}}
METRICS = ("heldout_caption", "heldout_vqa", "heldout", "first_turn", "second_turn")


def shapes(generator: dict) -> tuple[Path, dict]:
    """The generated (or reused) shapes data of ``generator``: its root and normalised arguments."""
    args = generator_args(generator)
    manifest = generate_shapes(default_data_root(args), **args)
    return Path(manifest["root"]), manifest["args"]


def absolute(root: Path, records: list[dict]) -> list[dict]:
    return [{**record, "image": str(root / record["image"])} for record in records]


def prepare_data(lang: str, output: Path) -> Path:
    """This language's training conversations (LLaVA format, absolute image paths): per one-object image its
    caption and two questions, per image of the follow-up set an existence question and its follow-ups."""
    single_root, single_args = shapes(SINGLE)
    pairs_root, pairs_args = shapes(PAIRS)
    records = absolute(
        single_root,
        shapes_conversations(*scene_texts(single_args, "train", lang), lang, ("caption", "vqa"), vqa_per_image=2),
    )
    records += absolute(
        pairs_root, shapes_conversations(*scene_texts(pairs_args, "train", lang), lang, ("exist", "follow_up"))
    )
    return Path(write_json(str(output / "data" / f"conversations_{lang}_train.json"), records))


def evaluation_sets(lang: str) -> tuple[list[dict], list[dict]]:
    """The held-out-template captions and questions of the one-object test images, and the follow-up
    conversations of the follow-up set's test images (absolute image paths)."""
    single_root, single_args = shapes(SINGLE)
    pairs_root, pairs_args = shapes(PAIRS)
    scenes, captions, questions, images = scene_texts(single_args, "test", lang)
    heldout, follow_ups = [], []
    for i, (caption, qa, image) in enumerate(zip(captions, questions, images, strict=True)):
        image = str(single_root / image)
        prompt = instruction("caption", lang, i, templates="heldout")
        heldout.append({"image": image, "kind": "caption", "prompt": prompt, "answer": caption})
        for k, (question, answer) in enumerate(qa):
            prompt = instruction("vqa", lang, i + k, question, templates="heldout")
            heldout.append({"image": image, "kind": "vqa", "prompt": prompt, "answer": answer})
    scenes, _, _, images = scene_texts(pairs_args, "test", lang)
    for scene, image in zip(scenes, images, strict=True):
        shapes_in = [o["shape"] for o in scene["objects"]]
        for shape in sorted(s for s in set(shapes_in) if shapes_in.count(s) == 1):
            for kind in ("color", "position"):
                ((first, yes), (second, _)), answer = follow_up(scene["objects"], shape, kind, lang)
                follow_ups.append(
                    {"image": str(pairs_root / image), "first": first, "yes": yes, "second": second, "answer": answer}
                )
    return heldout, follow_ups


def evaluate(model, lang: str, batch_size: int = 32) -> dict:
    """Accuracies (percent) of a trained model on the held-out templates and the second turns."""
    from lavis.processors import load_processor
    from omegaconf import OmegaConf
    from PIL import Image

    processor = load_processor("blip_image_eval", OmegaConf.create({"image_size": SINGLE["image_size"]}))

    def images(rows):
        return torch.stack([processor(Image.open(row["image"]).convert("RGB")) for row in rows])

    def answers(rows, conversations):
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = slice(start, start + batch_size)
            samples = {"image": images(rows[chunk]), "messages": conversations[chunk]}
            out += model.generate(samples, num_beams=1, max_length=40)
        return out

    heldout, follow_ups = evaluation_sets(lang)
    said = answers(heldout, [[{"role": "user", "content": row["prompt"]}] for row in heldout])
    right = [text == row["answer"] for text, row in zip(said, heldout)]
    firsts = answers(follow_ups, [[{"role": "user", "content": row["first"]}] for row in follow_ups])
    histories = [
        [
            {"role": "user", "content": row["first"]},
            {"role": "assistant", "content": first or "-"},
            {"role": "user", "content": row["second"]},
        ]
        for row, first in zip(follow_ups, firsts)
    ]
    seconds = answers(follow_ups, histories)

    def percent(hits):
        return round(100 * sum(hits) / max(len(hits), 1), 2)

    return {
        "heldout_caption": percent([r for r, row in zip(right, heldout) if row["kind"] == "caption"]),
        "heldout_vqa": percent([r for r, row in zip(right, heldout) if row["kind"] == "vqa"]),
        "heldout": percent(right),
        "first_turn": percent([a == row["yes"] for a, row in zip(firsts, follow_ups)]),
        "second_turn": percent([a == row["answer"] for a, row in zip(seconds, follow_ups)]),
        "counts": {"heldout": len(heldout), "follow_ups": len(follow_ups)},
        "examples": [
            {"history": h, "said": s, "truth": row["answer"]}
            for h, s, row in list(zip(histories, seconds, follow_ups))[:6]
        ]
        + [{"prompt": row["prompt"], "said": s, "truth": row["answer"]} for s, row in list(zip(said, heldout))[:6]],
    }


def run_seed(output: Path, lang: str, seed: int, llm_dir: Path, nproc: int, variants) -> dict:
    """Stages 1-2 as ``make demo`` runs them, then each variant's instruction tuning from the stage-2 checkpoint
    and its evaluation, with ``run.seed=seed``."""
    from blip2_internlm.factory import build_model

    conversations = prepare_data(lang, output)
    common = [f"run.seed={seed}", "run.log_freq=50"]
    data = [f"datasets.shapes_caption.generator.{k}={v}" for k, v in SINGLE.items()]
    data.append(f"datasets.shapes_caption.lang={lang}")
    caption_prompt = "model.prompt=" + json.dumps(CAPTION_PROMPTS[lang], ensure_ascii=False)
    result = {"lang": lang, "seed": seed, "generators": {"single": SINGLE, "pairs": PAIRS}, "stages": {}}
    checkpoint = None
    for stage, cfg, extra in (
        ("stage1", "pretrain_stage1.yaml", []),
        ("stage2", "pretrain_stage2.yaml", [f"model.llm_model={llm_dir}", caption_prompt]),
    ):
        started = time.time()
        pretrained = [f"model.pretrained={checkpoint}"] if checkpoint else []
        options = common + data + extra + pretrained + [f"run.output_dir={output / stage}"]
        torchrun("blip2_internlm.train", cfg, options, nproc, output / "logs" / f"{stage}.log")
        checkpoint = latest_job(output / stage) / "checkpoint_last.pth"
        result["stages"][stage] = {"seconds": round(time.time() - started, 1), "checkpoint": str(checkpoint)}
    stage2 = checkpoint
    for variant in variants:
        started = time.time()
        model_options = {"llm_model": str(llm_dir), "llm_lora": None, **VARIANTS[variant]}
        options = common + [f"model.{key}={json.dumps(value)}" for key, value in model_options.items()]
        options += [
            f"model.pretrained={stage2}",
            f"datasets.llava_conversations.build_info.annotations.train.storage={conversations}",
            f"datasets.llava_conversations.build_info.images.storage={conversations.parent}",
            f"run.output_dir={output / variant}",
        ]
        log = torchrun("blip2_internlm.train", "instruct.yaml", options, nproc, output / "logs" / f"{variant}.log")
        checkpoint = latest_job(output / variant) / "checkpoint_last.pth"
        trained = time.time() - started
        model = build_model(
            "blip2_internlm_instruct", cfg_path=CONFIGS / "instruct.yaml", options=model_options, checkpoint=checkpoint
        )
        metrics = evaluate(model, lang)
        result["stages"][variant] = {
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.time() - started - trained, 1),
            "checkpoint": str(checkpoint),
            "curve": step_losses(log)[::4],
            **metrics,
        }
    return result


def aggregate(runs: dict[int, dict], variants) -> dict:
    stats = {}
    for variant in variants:
        for metric in METRICS:
            values = [run["stages"][variant][metric] for run in runs.values()]
            stats[f"{variant}.{metric}"] = {
                "mean": round(statistics.mean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", choices=("zh", "en"), default="zh")
    parser.add_argument("--output", type=Path, default=Path("output/demo-instruct"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seeds", type=parse_seeds, default=[42], help="comma-separated seeds, e.g. 42,1,2")
    parser.add_argument("--variants", default="frozen,lora", help="frozen, lora or both (comma-separated)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants {args.variants!r}: choose from {list(VARIANTS)}")
    output = args.output.absolute()
    started = time.time()
    llm_dir, llm_stage = pretrained_llm(128, 3, output / "logs" / "llm.log")
    runs = {}
    for seed in args.seeds:
        runs[seed] = run_seed(output / f"seed-{seed}", args.lang, seed, llm_dir, args.nproc, variants)
        line = {v: {m: runs[seed]["stages"][v][m] for m in METRICS} for v in variants}
        print(json.dumps({"seed": seed, **line}, ensure_ascii=False), flush=True)
    result = {
        "lang": args.lang,
        "seeds": args.seeds,
        "generators": {"single": SINGLE, "pairs": PAIRS},
        "llm": llm_stage["cache_name"],
        "per_seed": {str(seed): run for seed, run in runs.items()},
        "aggregate": aggregate(runs, variants),
        "total_seconds": round(time.time() - started, 1),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(json.dumps(result["aggregate"], ensure_ascii=False, indent=2))
    print(f"result: {output / 'result.json'} ({result['total_seconds']} s)")
    return result


if __name__ == "__main__":
    main()
