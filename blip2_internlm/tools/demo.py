"""``make demo``: the whole pipeline on the synthetic shapes data, through the user entry points.

(0) text pretraining of the tiny InternLM2 (BLIP-2's LLM is a pretrained model, frozen
afterwards), (1) stage 1 with LAVIS's own ``blip2``, (2) stage 2 with ``blip2_internlm``
from the stage-1 checkpoint, (3) caption evaluation and zero-shot VQA on held-out images.
Stages 1-3 run as ``python -m torch.distributed.run --nproc_per_node=2 -m
blip2_internlm.train|evaluate`` with two gloo processes, exactly as users run them.
Writes ``OUTPUT/result.json``, a self-contained ``OUTPUT/report.html`` and, for every stage, a
TensorBoard log (``tensorboard --logdir OUTPUT``).

``--seeds 42,1,2`` runs stages 1-3 once per seed, each into ``OUTPUT/seed-N/`` (the layout
of a one-seed run, so ``make app`` takes ``--from-demo OUTPUT/seed-N``), and writes the
per-seed metrics with their mean, standard deviation, minimum and maximum to
``OUTPUT/result.json`` and a per-seed table to ``OUTPUT/report.html``.

The LLM does not depend on the seed: it is pretrained once and cached under
``$BLIP2_INTERNLM_CACHE/demo-llm-<digest>``, the digest covering its corpus, settings, the
source of the code that builds it and the library versions
(``pretrain_text.recipe``), so a changed recipe never reuses a stale LLM.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from blip2_internlm.datasets.builders import default_data_root, generator_args
from blip2_internlm.datasets.shapes import QUESTION_TYPES
from blip2_internlm.tiny.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS, recipe_digest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"
LOSS_LINE = re.compile(r"Train: data epoch: \[(\d+)\].*?\[\s*(\d+)/(\d+)\].*?loss: ([0-9.]+)")

#: The data every stage sees: same generator settings, hence the same generated files.
GENERATOR = {"seed": 0, "train": 4000, "val": 100, "test": 200, "image_size": 64, "max_objects": 1}
#: Metrics of one seed that --seeds aggregates, in the report's column order.
SEED_METRICS = (
    "caption_exact_match",
    "caption_bleu4",
    "caption_cider",
    "vqa_agg_metrics",
    "vqa_yes_no",
    "vqa_number",
    "vqa_other",
    *(f"vqa_{kind}" for kind, _ in QUESTION_TYPES),
    "seconds",
)


def run_logged(command: list[str], log: Path) -> str:
    """Run, echo the output live (LAVIS's metric logger lines carry the progress and ETA), keep a log."""
    print("$", " ".join(command), flush=True)
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(line)
            if "Train: data epoch" in line or "Evaluation" in line or "[shapes]" in line or "pretrained" in line:
                print(line, end="", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(lines))
    if process.returncode != 0:
        sys.stdout.write("".join(lines[-60:]))
        raise SystemExit(f"{command[3:7]} failed (exit {process.returncode}); full log: {log}")
    return "".join(lines)


def torchrun(module: str, cfg: str, options: list[str], nproc: int, log: Path) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        "--cfg-path",
        str(CONFIGS / cfg),
        "--options",
        *options,
    ]
    return run_logged(command, log)


def latest_job(output: Path) -> Path:
    return sorted(p for p in output.iterdir() if p.is_dir())[-1]


def step_losses(log_text: str) -> list[tuple[float, float]]:
    """(fractional epoch, loss) from LAVIS's metric logger lines."""
    points = []
    for epoch, step, total, loss in LOSS_LINE.findall(log_text):
        points.append((int(epoch) + int(step) / max(int(total), 1), float(loss)))
    return points


def parse_seeds(text: str) -> list[int]:
    """``"42,1,2"`` -> [42, 1, 2]; anything else is an ``argparse`` error naming ``--seeds``."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: expected integers separated by commas, e.g. 42,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected distinct integers >= 0, e.g. 42,1,2")
    return seeds


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): the report says how busy the CPU was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# --- stage 0: the LLM --------------------------------------------------------------------


def pretrained_llm(hidden: int, layers: int, log: Path, use_cache: bool = True) -> tuple[Path, dict]:
    """The pretrained tiny LLM's directory (cached by recipe digest) and what its stage records."""
    from blip2_internlm.assets import cache_dir, generated

    def build(out: Path) -> None:
        command = [sys.executable, "-m", "blip2_internlm.tiny.pretrain_text", "--out", str(out)]
        run_logged(command + ["--hidden", str(hidden), "--layers", str(layers)], log)

    name = f"demo-llm-{hidden}x{layers}-{recipe_digest(hidden, layers)}"
    cached = use_cache and (cache_dir() / name / ".complete").exists()
    started = time.time()
    if use_cache:
        llm_dir = generated(name, build)
    else:
        llm_dir = log.parent.parent / "llm-build"
        shutil.rmtree(llm_dir, ignore_errors=True)
        build(llm_dir)
    built = time.time() - started
    record = json.loads((llm_dir / "pretraining.json").read_text())
    losses = record["losses"]
    return llm_dir, {
        "seconds": round(built, 1),
        "cached": cached,
        "cache_name": name,
        "final_loss": losses[-1],
        "text_qa": record["text_qa"],
        "settings": record["settings"],
        "curve": [(i / len(losses), loss) for i, loss in enumerate(losses)][::10],
    }


# --- stages 1-3 for one seed -------------------------------------------------------------


def vqa_by_question(vqa_job: Path, lang: str) -> tuple[dict, dict]:
    """Accuracy (exact answer) per question kind, and how often each answer was given to the
    yes/no questions: one word for all of them is the failure a coin-flip score hides."""
    root = Path(default_data_root(generator_args(GENERATOR)))
    truth = {
        q["question_id"]: q["answer"][0]
        for q in json.loads((root / "annotations" / f"vqa_{lang}_test.json").read_text(encoding="utf-8"))
    }
    answers = json.loads((vqa_job / "result" / "test_vqa_result.json").read_text(encoding="utf-8"))
    hits, counts, yes_no = {}, {}, {}
    for row in answers:
        kind = QUESTION_TYPES[row["question_id"] % 10][0]
        counts[kind] = counts.get(kind, 0) + 1
        hits[kind] = hits.get(kind, 0) + (str(row["answer"]).strip() == truth[row["question_id"]])
        if kind == "exist":
            yes_no[row["answer"]] = yes_no.get(row["answer"], 0) + 1
    accuracy = {kind: round(100 * hits[kind] / counts[kind], 1) for kind, _ in QUESTION_TYPES if kind in counts}
    return accuracy, dict(sorted(yes_no.items(), key=lambda kv: -kv[1]))


def run_seed(output: Path, lang: str, seed: int, llm_dir: Path, nproc: int) -> dict:
    """Stages 1-3 with ``run.seed=seed`` into ``output``; returns its result (also written there)."""
    output.mkdir(parents=True, exist_ok=True)
    data = [f"datasets.{{}}.generator.{k}={v}" for k, v in GENERATOR.items()]
    # every stage also logs to TensorBoard, into <stage>/<job>/tensorboard (docs/tracking.md)
    common = [f"run.seed={seed}", "run.log_freq=10", "run.report_to=[tensorboard]"]
    result = {"lang": lang, "seed": seed, "generator": GENERATOR, "stages": {}}
    checkpoint = None
    # quoted: LAVIS parses --options values as YAML, and "Question: {}" would be a mapping
    caption_prompt = "model.prompt=" + json.dumps(CAPTION_PROMPTS[lang], ensure_ascii=False)
    plan = [
        ("stage1", "blip2_internlm.train", "pretrain_stage1.yaml", "shapes_caption", []),
        (
            "stage2",
            "blip2_internlm.train",
            "pretrain_stage2.yaml",
            "shapes_caption",
            [f"model.llm_model={llm_dir}", caption_prompt],
        ),
        (
            "caption_eval",
            "blip2_internlm.evaluate",
            "caption_eval.yaml",
            "shapes_caption",
            [
                f"model.llm_model={llm_dir}",
                caption_prompt,
                "run.caption_tokenizer=" + ("char" if lang == "zh" else "words"),
            ],
        ),
        (
            "vqa_eval",
            "blip2_internlm.evaluate",
            "vqa_zeroshot.yaml",
            "shapes_vqa",
            [f"model.llm_model={llm_dir}", "run.prompt=" + json.dumps(VQA_PROMPTS[lang], ensure_ascii=False)],
        ),
    ]
    for name, module, cfg, dataset, extra in plan:
        stage_out = output / name
        options = (
            common
            + [o.format(dataset) for o in data]
            + [f"datasets.{dataset}.lang={lang}", f"run.output_dir={stage_out}"]
            + extra
        )
        if name == "stage2":
            options.append(f"model.pretrained={checkpoint}")
        if name.endswith("_eval"):
            options.append(f"model.finetuned={checkpoint}")
        started, load = time.time(), load_average()
        log_text = torchrun(module, cfg, options, nproc, output / "logs" / f"{name}.log")
        job = latest_job(stage_out)
        entry = {"seconds": round(time.time() - started, 1), "load": [load, load_average()], "output": str(job)}
        if module.endswith("train"):
            lines = (job / "log.txt").read_text().splitlines()
            epochs = [json.loads(line) for line in lines if line.startswith('{"train_')]
            entry["epoch_losses"] = [float(e["train_loss"]) for e in epochs]
            entry["curve"] = step_losses(log_text)
            checkpoint = job / "checkpoint_last.pth"  # the training runner always writes it
        else:
            line = json.loads((job / "evaluate.txt").read_text().splitlines()[-1])
            entry["metrics"] = line.get("test", line)  # captioning nests by split, LAVIS's VQA does not
        result["stages"][name] = entry

    vqa = result["stages"]["vqa_eval"]
    by_question, yes_no_answers = vqa_by_question(Path(vqa["output"]), lang)
    vqa["by_question"], vqa["yes_no_answers"] = by_question, yes_no_answers
    caption = result["stages"]["caption_eval"]["metrics"]
    loads = [x for s in result["stages"].values() for x in s["load"] if x is not None]
    result["summary"] = {
        "caption_exact_match": caption["exact_match"],
        "caption_bleu4": caption["Bleu_4"],
        "caption_cider": caption["CIDEr"],
        "vqa_agg_metrics": vqa["metrics"]["agg_metrics"],
        "vqa_yes_no": vqa["metrics"].get("yes/no"),
        "vqa_number": vqa["metrics"].get("number"),
        "vqa_other": vqa["metrics"].get("other"),
        **{f"vqa_{kind}": accuracy for kind, accuracy in by_question.items()},
        "yes_no_answers": yes_no_answers,
        "seconds": round(sum(s["seconds"] for s in result["stages"].values()), 1),
        "mean_load": round(statistics.mean(loads), 2) if loads else None,
    }
    return result


def link_llm(llm_dir: Path, output: Path) -> Path:
    """A copy of the LLM in ``output/llm``, where ``make app --from-demo`` looks for it."""
    target = output / "llm"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(llm_dir, target)
    return target


def aggregate(runs: dict[int, dict]) -> dict:
    """Mean, standard deviation (n - 1), minimum and maximum of each seed metric."""
    stats = {}
    for metric in SEED_METRICS:
        values = [run["summary"][metric] for run in runs.values() if run["summary"].get(metric) is not None]
        if values:
            stats[metric] = {
                "mean": round(statistics.mean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", choices=("zh", "en"), default="zh")
    parser.add_argument("--output", type=Path, default=Path("output/demo"))
    parser.add_argument("--nproc", type=int, default=2)
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=42, help="one run, written to OUTPUT (default 42)")
    seeds.add_argument(
        "--seeds", type=parse_seeds, help="comma-separated seeds, e.g. 42,1,2: one run each in OUTPUT/seed-N"
    )
    parser.add_argument("--llm", default="128x3", help="tiny LLM size, HIDDENxLAYERS")
    parser.add_argument(
        "--rebuild-llm", action="store_true", help="pretrain the LLM again instead of taking it from the cache"
    )
    args = parser.parse_args(argv)
    try:
        hidden, layers = (int(x) for x in args.llm.split("x"))
    except ValueError:
        parser.error(f"--llm {args.llm!r}: expected HIDDENxLAYERS, e.g. 128x3")
    output = args.output.absolute()
    output.mkdir(parents=True, exist_ok=True)
    lang = args.lang

    # (0) the LLM: a tiny InternLM2, pretrained on text, then frozen for good
    started = time.time()
    llm_dir, llm_stage = pretrained_llm(hidden, layers, output / "logs" / "llm.log", use_cache=not args.rebuild_llm)

    if args.seeds is None:
        result = run_seed(output, lang, args.seed, link_llm(llm_dir, output), args.nproc)
        result["stages"] = {"llm_pretraining": llm_stage, **result["stages"]}
        result["summary"]["total_seconds"] = round(time.time() - started, 1)
        write_result(output, result, report_html(result, output))
        print(json.dumps(result["summary"], ensure_ascii=False, indent=2))
        print(f"report: {output / 'report.html'}")
        print(f"TensorBoard: tensorboard --logdir {output}")
        return result

    runs = {}
    for seed in args.seeds:
        seed_out = output / f"seed-{seed}"
        run = run_seed(seed_out, lang, seed, link_llm(llm_dir, seed_out), args.nproc)
        run["stages"] = {"llm_pretraining": llm_stage, **run["stages"]}
        write_result(seed_out, run, report_html(run, seed_out))
        runs[seed] = run
        print(json.dumps({"seed": seed, **run["summary"]}, ensure_ascii=False), flush=True)
    result = {
        "lang": lang,
        "seeds": args.seeds,
        "generator": GENERATOR,
        "llm_pretraining": {k: v for k, v in llm_stage.items() if k != "curve"},
        "per_seed": {str(seed): run["summary"] for seed, run in runs.items()},
        "aggregate": aggregate(runs),
        "total_seconds": round(time.time() - started, 1),
    }
    write_result(output, result, seeds_report_html(result))
    print(json.dumps(result["aggregate"], ensure_ascii=False, indent=2))
    print(f"report: {output / 'report.html'}")
    print(f"TensorBoard (every seed and stage): tensorboard --logdir {output}")
    return result


def write_result(output: Path, result: dict, report: str) -> None:
    (output / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    (output / "report.html").write_text(report, encoding="utf-8")


# --- report ------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
)


def summary_value(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else json.dumps(value, ensure_ascii=False)


def svg_curve(points, title, width=420, height=220) -> str:
    """A stage's loss curve, (fractional epoch, loss) points; empty without points."""
    from blip2_internlm.tools.charts import line_chart

    if not points:
        return ""
    label = f"{title}: {points[0][1]:.3f} → {points[-1][1]:.3f}"
    return f"<figure>{line_chart({label: points}, title, 'epoch', 'loss', width=width, height=height)}</figure>"


def report_html(result: dict, output: Path, examples: int = 12) -> str:
    stages = result["stages"]
    caption_job = Path(stages["caption_eval"]["output"])
    vqa_job = Path(stages["vqa_eval"]["output"])
    predictions = {}
    for path in (caption_job / "result").glob("test_epoch*.json"):
        if "rank" not in path.name:
            predictions = {r["image_id"]: r["caption"] for r in json.loads(path.read_text())}
    answers = {}
    for path in (vqa_job / "result").glob("test_vqa_result.json"):
        answers = {r["question_id"]: r["answer"] for r in json.loads(path.read_text())}
    root = Path(default_data_root(generator_args(result["generator"])))
    lang = result["lang"]
    records = json.loads((root / "annotations" / f"caption_{lang}_test.json").read_text())[:examples]
    questions = json.loads((root / "annotations" / f"vqa_{lang}_test.json").read_text())
    by_image = {}
    for q in questions:
        by_image.setdefault(q["image_id"], []).append(q)
    rows = []
    for record in records:
        image = base64.b64encode((root / record["image"]).read_bytes()).decode()
        qa = "".join(
            f"<li>{html.escape(q['question'])} → <b>{html.escape(str(answers.get(q['question_id'], '—')))}</b>"
            f" <small>(truth: {html.escape(q['answer'][0])})</small></li>"
            for q in by_image.get(record["image_id_int"], [])
        )
        predicted = predictions.get(record["image_id_int"], "—")
        mark = "✓" if predicted in record["caption"] else "✗"
        rows.append(
            f'<tr><td><img src="data:image/png;base64,{image}" width="96" height="96"></td>'
            f"<td>{html.escape(' / '.join(record['caption']))}</td><td>{mark} {html.escape(predicted)}</td>"
            f"<td><ul>{qa}</ul></td></tr>"
        )
    curves = "".join(svg_curve(s.get("curve", []), name) for name, s in stages.items())
    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(summary_value(v))}</td></tr>"
        for k, v in result["summary"].items()
    )
    metrics = "".join(
        f"<tr><th>{name}</th><td>{html.escape(json.dumps(s['metrics'], ensure_ascii=False))}</td></tr>"
        for name, s in stages.items()
        if "metrics" in s
    )
    return f"""<!doctype html><html lang="{lang}"><meta charset="utf-8"><title>blip2-internlm demo</title>
<style>{STYLE}td,th{{vertical-align:top;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}
img{{image-rendering:pixelated}}</style>
<h1>blip2-internlm demo ({lang})</h1>
<h2>Summary</h2><table>{summary}</table>
<h2>Metrics</h2><table>{metrics}</table>
<h2>The LLM alone, on text</h2>{text_qa_table(stages.get("llm_pretraining", {}).get("text_qa", {}))}
<h2>Loss curves</h2>{curves}
<h2>Held-out images</h2><table>
<tr><th>image</th><th>references</th><th>generated</th><th>VQA (zero-shot)</th></tr>{"".join(rows)}</table>
</html>"""


def text_qa_table(text_qa: dict) -> str:
    """Percent of questions the pretrained LLM answers from a keyword context, per language and kind."""
    if not text_qa:
        return ""
    kinds = list(dict.fromkeys(kind for per_lang in text_qa.values() for kind in per_lang))
    head = "".join(f"<th>{html.escape(kind)}</th>" for kind in kinds)
    rows = "".join(
        f"<tr><th>{html.escape(lang)}</th>" + "".join(f"<td>{per_lang.get(kind, '—')}</td>" for kind in kinds) + "</tr>"
        for lang, per_lang in text_qa.items()
    )
    return (
        "<p>Accuracy (%) of the frozen LLM answering from the keywords of one object as its context, "
        "before any image is involved: zero-shot VQA cannot do better than this.</p>"
        f"<table><tr><th></th>{head}</tr>{rows}</table>"
    )


def seeds_report_html(result: dict) -> str:
    """The per-seed table of a --seeds run, with mean, standard deviation, minimum and maximum."""

    def cell(value):
        return "—" if value is None else f"{value:.1f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(metric)}</th>" for metric in SEED_METRICS)
    rows = []
    for seed, summary in result["per_seed"].items():
        cells = "".join(f"<td>{cell(summary.get(metric))}</td>" for metric in SEED_METRICS)
        answers = html.escape(json.dumps(summary.get("yes_no_answers", {}), ensure_ascii=False))
        rows.append(
            f'<tr><th><a href="seed-{seed}/report.html">seed {html.escape(seed)}</a></th>{cells}'
            f"<td>{answers}</td><td>{cell(summary.get('mean_load'))}</td></tr>"
        )
    for stat in ("mean", "std", "min", "max"):
        cells = "".join(f"<td>{cell(result['aggregate'].get(metric, {}).get(stat))}</td>" for metric in SEED_METRICS)
        rows.append(f"<tr><th>{stat}</th>{cells}<td></td><td></td></tr>")
    llm = result["llm_pretraining"]
    lang = result["lang"]
    built = "taken from the cache" if llm.get("cached") else f"pretrained in {llm.get('seconds')} s"
    return f"""<!doctype html><html lang="{lang}"><meta charset="utf-8"><title>blip2-internlm demo, seeds</title>
<style>{STYLE}td,th{{text-align:right}}</style>
<h1>blip2-internlm demo ({lang}), seeds {html.escape(", ".join(map(str, result["seeds"])))}</h1>
<p>Each seed runs stages 1-3 (the LLM is the same for all); its own report has the images,
answers and loss curves.  Caption metrics and VQA in percent (CIDEr-D x100), vqa_color ...
vqa_count: exact answers per question kind; seconds: stages 1-3 of that seed; load: the mean
1-minute load average sampled around its stages.</p>
<table><tr><th>seed</th>{head}<th>yes/no answers given</th><th>load</th></tr>{"".join(rows)}</table>
<h2>The LLM alone, on text</h2>{text_qa_table(llm.get("text_qa", {}))}
<p>LLM: {html.escape(llm.get("cache_name", ""))}, {built}.
Total wall time: {result["total_seconds"]} s.</p>
</html>"""


if __name__ == "__main__":
    main()
