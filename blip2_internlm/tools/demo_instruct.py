"""``make demo-instruct`` (``python -m blip2_internlm.tools.demo --instruct``): instruction tuning on the shapes data.

(0) the demo's pretrained tiny InternLM2 (cached, the same as ``make demo``'s), (1) stage 1 with
LAVIS's own ``blip2`` on the captions, (2) ``blip2_internlm_instruct`` trained from the stage-1
checkpoint on LLaVA-format conversations written from the shapes data (``datasets/instructions.py``:
captions and questions phrased by sampled ``train`` instruction templates, and two-turn
conversations), once with the LLM frozen as it is and once with LoRA adapters on it, and (3) on
held-out images:

* **held-out templates**: every caption and question of the test images phrased by the ``heldout``
  templates, which training never saw; exact answers, in percent;
* **second turn**: "图里有圆形吗？" (is there a circle?) answered by the model, then "它是什么颜色？"
  (what color is it?) or "它在哪里？" (where is it?) with the model's own first answer in the
  history, for every shape that a test image holds once.  The images hold one or two objects, so
  "it" is only defined by the first turn.  Exact answers of the second turn, in percent.

Stages 1-2 run as ``python -m torch.distributed.run --nproc_per_node=2 -m blip2_internlm.train``
with two gloo processes, as users run them.  ``--seeds 42,1,2`` repeats stages 1-3 per seed and
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
    SHAPE_FOLLOW_UPS,
    follow_up,
    instruction,
    shapes_conversations,
    write_json,
)
from blip2_internlm.datasets.shapes import generate_shapes, scene_texts
from blip2_internlm.tools.demo import CONFIGS, latest_job, parse_seeds, pretrained_llm, step_losses, torchrun

#: The data: one or two objects per image, so a follow-up's "it" needs the first turn.
GENERATOR = {"seed": 0, "train": 1500, "val": 0, "test": 200, "image_size": 64, "max_objects": 2}
#: The two variants trained per seed: the LLM frozen as it is, and LoRA adapters on it.
VARIANTS = {"frozen": [], "lora": ["model.llm_lora={r: 8, alpha: 16, dropout: 0.05}"]}
METRICS = ("heldout_caption", "heldout_vqa", "heldout_all", "first_turn", "second_turn")


def prepare_data(lang: str, output: Path) -> tuple[Path, Path, dict]:
    """The shapes data (generated or reused) and this language's training conversations; (json, images, args)."""
    args = generator_args(GENERATOR)
    manifest = generate_shapes(default_data_root(args), **args)
    scenes, captions, questions, images = scene_texts(manifest["args"], "train", lang)
    path = Path(write_json(str(output / "data" / f"conversations_{lang}_train.json"), []))
    write_json(str(path), shapes_conversations(scenes, captions, questions, images, lang))
    return path, Path(manifest["root"]), manifest["args"]


def evaluation_sets(args: dict, lang: str) -> tuple[list[dict], list[dict]]:
    """The held-out-template questions and the follow-up conversations of the test images."""
    scenes, captions, questions, images = scene_texts(args, "test", lang)
    heldout, follow_ups = [], []
    for i, (scene, caption, qa, image) in enumerate(zip(scenes, captions, questions, images, strict=True)):
        prompt = instruction("caption", lang, i, templates="heldout")
        heldout.append({"image": image, "kind": "caption", "prompt": prompt, "answer": caption})
        for k, (question, answer) in enumerate(qa):
            prompt = instruction("vqa", lang, i + k, question, templates="heldout")
            heldout.append({"image": image, "kind": "vqa", "prompt": prompt, "answer": answer})
        shapes = [o["shape"] for o in scene["objects"]]
        for shape in sorted(s for s in set(shapes) if shapes.count(s) == 1):
            for kind in ("color", "position"):
                ((first, yes), (second, _)), answer = follow_up(scene["objects"], shape, kind, lang)
                follow_ups.append({"image": image, "first": first, "yes": yes, "second": second, "answer": answer})
    return heldout, follow_ups


def evaluate(model, root: Path, args: dict, lang: str, batch_size: int = 32) -> dict:
    """Accuracies (percent) of a trained model on the held-out templates and the second turns."""
    from lavis.processors import load_processor
    from omegaconf import OmegaConf
    from PIL import Image

    processor = load_processor("blip_image_eval", OmegaConf.create({"image_size": args["image_size"]}))

    def images(rows):
        return torch.stack([processor(Image.open(root / row["image"]).convert("RGB")) for row in rows])

    def answers(rows, conversations):
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = slice(start, start + batch_size)
            samples = {"image": images(rows[chunk]), "messages": conversations[chunk]}
            out += model.generate(samples, num_beams=1, max_length=40)
        return out

    heldout, follow_ups = evaluation_sets(args, lang)
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
        "heldout_all": percent(right),
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
    """Stage 1, then each variant's instruction tuning and evaluation, with ``run.seed=seed``."""
    from blip2_internlm.factory import build_model

    conversations, root, args = prepare_data(lang, output)
    common = [f"run.seed={seed}", "run.log_freq=50"]
    data = [f"datasets.shapes_caption.generator.{k}={v}" for k, v in GENERATOR.items()]
    result = {"lang": lang, "seed": seed, "generator": GENERATOR, "stages": {}}
    started = time.time()
    torchrun(
        "blip2_internlm.train",
        "pretrain_stage1.yaml",
        common + data + [f"datasets.shapes_caption.lang={lang}", f"run.output_dir={output / 'stage1'}"],
        nproc,
        output / "logs" / "stage1.log",
    )
    stage1 = latest_job(output / "stage1") / "checkpoint_last.pth"
    result["stages"]["stage1"] = {"seconds": round(time.time() - started, 1), "checkpoint": str(stage1)}
    for variant in variants:
        started = time.time()
        options = common + VARIANTS[variant]
        options += [
            f"model.pretrained={stage1}",
            f"model.llm_model={llm_dir}",
            f"datasets.llava_conversations.build_info.annotations.train.storage={conversations}",
            f"datasets.llava_conversations.build_info.images.storage={root}",
            f"run.output_dir={output / variant}",
        ]
        log = torchrun("blip2_internlm.train", "instruct.yaml", options, nproc, output / "logs" / f"{variant}.log")
        checkpoint = latest_job(output / variant) / "checkpoint_last.pth"
        trained = time.time() - started
        model = build_model(
            "blip2_internlm_instruct",
            cfg_path=CONFIGS / "instruct.yaml",
            options={"llm_model": str(llm_dir), "llm_lora": None, **_lora_option(variant)},
            checkpoint=checkpoint,
        )
        metrics = evaluate(model, root, args, lang)
        result["stages"][variant] = {
            "train_seconds": round(trained, 1),
            "eval_seconds": round(time.time() - started - trained, 1),
            "checkpoint": str(checkpoint),
            "curve": step_losses(log)[::4],
            **metrics,
        }
    return result


def _lora_option(variant: str) -> dict:
    return {"llm_lora": {"r": 8, "alpha": 16, "dropout": 0.05}} if variant == "lora" else {}


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
        "generator": GENERATOR,
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


__all__ = ["main", "evaluate", "evaluation_sets", "SHAPE_FOLLOW_UPS"]

if __name__ == "__main__":
    main()
