"""``make demo``: the whole pipeline on the synthetic shapes data, through the user entry points.

(0) text pretraining of the tiny InternLM2 (BLIP-2's LLM is a pretrained model, frozen
afterwards), (1) stage 1 with LAVIS's own ``blip2``, (2) stage 2 with ``blip2_internlm``
from the stage-1 checkpoint, (3) caption evaluation and zero-shot VQA on held-out images.
Stages 1-3 run as ``python -m torch.distributed.run --nproc_per_node=2 -m
blip2_internlm.train|evaluate`` with two gloo processes, exactly as users run them.
Writes ``OUTPUT/result.json`` and a self-contained ``OUTPUT/report.html``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from blip2_internlm.datasets.builders import default_data_root, generator_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
LOSS_LINE = re.compile(r"Train: data epoch: \[(\d+)\].*?\[\s*(\d+)/(\d+)\].*?loss: ([0-9.]+)")

#: The data every stage sees: same generator settings, hence the same generated files.
GENERATOR = {"seed": 0, "train": 4000, "val": 100, "test": 200, "image_size": 64, "max_objects": 1}
from blip2_internlm.internlm2.pretrain_text import CAPTION_PROMPTS, VQA_PROMPTS  # noqa: E402


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", choices=("zh", "en"), default="zh")
    parser.add_argument("--output", type=Path, default=Path("output/demo"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--llm", default="128x3", help="tiny LLM size, HIDDENxLAYERS")
    args = parser.parse_args(argv)
    output = args.output.absolute()
    output.mkdir(parents=True, exist_ok=True)
    lang = args.lang
    data = [f"datasets.{{}}.generator.{k}={v}" for k, v in GENERATOR.items()]
    common = [f"run.seed={args.seed}", "run.log_freq=10"]
    result = {"lang": lang, "generator": GENERATOR, "stages": {}}

    # (0) the LLM: a tiny InternLM2, pretrained on text, then frozen for good
    started = time.time()
    llm_dir = output / "llm"
    hidden, layers = args.llm.split("x")
    run_logged(
        [
            sys.executable,
            "-m",
            "blip2_internlm.internlm2.pretrain_text",
            "--out",
            str(llm_dir),
            "--hidden",
            hidden,
            "--layers",
            layers,
        ],
        output / "logs" / "llm.log",
    )
    losses = json.loads((llm_dir / "pretraining.json").read_text())["losses"]
    result["stages"]["llm_pretraining"] = {
        "seconds": round(time.time() - started, 1),
        "final_loss": losses[-1],
        "curve": [(i / len(losses), loss) for i, loss in enumerate(losses)][::10],
    }

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
        started = time.time()
        log_text = torchrun(module, cfg, options, args.nproc, output / "logs" / f"{name}.log")
        job = latest_job(stage_out)
        entry = {"seconds": round(time.time() - started, 1), "output": str(job)}
        if module.endswith("train"):
            epochs = [
                json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train_')
            ]
            entry["epoch_losses"] = [float(e["train_loss"]) for e in epochs]
            entry["curve"] = step_losses(log_text)
            checkpoint = job / "checkpoint_last.pth"  # the training runner always writes it
        else:
            line = json.loads((job / "evaluate.txt").read_text().splitlines()[-1])
            entry["metrics"] = line.get("test", line)  # captioning nests by split, LAVIS's VQA does not
        result["stages"][name] = entry

    result["summary"] = {
        "caption_exact_match": result["stages"]["caption_eval"]["metrics"]["exact_match"],
        "caption_bleu4": result["stages"]["caption_eval"]["metrics"]["Bleu_4"],
        "caption_cider": result["stages"]["caption_eval"]["metrics"]["CIDEr"],
        "vqa_agg_metrics": result["stages"]["vqa_eval"]["metrics"]["agg_metrics"],
        "total_seconds": round(sum(s["seconds"] for s in result["stages"].values()), 1),
    }
    (output / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    (output / "report.html").write_text(report_html(result, output), encoding="utf-8")
    print(json.dumps(result["summary"], ensure_ascii=False, indent=2))
    print(f"report: {output / 'report.html'}")
    return result


# --- report ------------------------------------------------------------------------------


def svg_curve(points, title, width=420, height=160) -> str:
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1, (y1 - y0) or 1
    coords = " ".join(
        f"{30 + (x - x0) / span_x * (width - 40):.1f},{10 + (1 - (y - y0) / span_y) * (height - 30):.1f}"
        for x, y in points
    )
    return (
        f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<polyline fill="none" stroke="#2a6" stroke-width="1.5" points="{coords}"/>'
        f'<text x="30" y="{height - 4}" font-size="11">{html.escape(title)}: {ys[0]:.3f} → {ys[-1]:.3f}</text>'
        f"</svg></figure>"
    )


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
            f"<td>{html.escape(' / '.join(record['caption']))}</td><td>{mark} {html.escape(predicted)}</td><td><ul>{qa}</ul></td></tr>"
        )
    curves = "".join(svg_curve(s.get("curve", []), name) for name, s in stages.items())
    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v if not isinstance(v, float) else f'{v:.2f}'}</td></tr>"
        for k, v in result["summary"].items()
    )
    metrics = "".join(
        f"<tr><th>{name}</th><td>{html.escape(json.dumps(s['metrics'], ensure_ascii=False))}</td></tr>"
        for name, s in stages.items()
        if "metrics" in s
    )
    return f"""<!doctype html><html lang="{lang}"><meta charset="utf-8"><title>blip2-internlm demo</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}figure{{display:inline-block;margin:0 1em 1em 0}}img{{image-rendering:pixelated}}</style>
<h1>blip2-internlm demo ({lang})</h1>
<h2>Summary</h2><table>{summary}</table>
<h2>Metrics</h2><table>{metrics}</table>
<h2>Loss curves</h2>{curves}
<h2>Held-out images</h2><table><tr><th>image</th><th>references</th><th>generated</th><th>VQA (zero-shot)</th></tr>{"".join(rows)}</table>
</html>"""


if __name__ == "__main__":
    main()
