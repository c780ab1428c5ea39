"""``make demo``: the tiny pipeline on the synthetic shapes data, through the user entry points.

stage 1 (LAVIS's blip2) -> stage 2 (blip2_internlm from the stage-1 checkpoint) -> zero-shot
VQA scored by LAVIS's VQATask, each as ``python -m torch.distributed.run --nproc_per_node=2
-m blip2_internlm.train|evaluate`` with two gloo processes.  Writes ``OUTPUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def torchrun(module: str, cfg: Path, options: list[str], nproc: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, "--cfg-path", str(cfg), "--options", *options]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def job_dir(output: Path) -> Path:
    jobs = sorted(p for p in output.iterdir() if p.is_dir())
    return jobs[-1]


def epoch_losses(job: Path) -> list[float]:
    lines = (job / "log.txt").read_text().splitlines()
    return [float(json.loads(line)["train_loss"]) for line in lines if line.startswith('{"train_')]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", choices=("zh", "en"), default="zh")
    parser.add_argument("--output", type=Path, default=Path("output/demo"))
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    output = args.output.absolute()
    result = {"lang": args.lang}

    stages = [
        ("stage1", "blip2_internlm.train", "pretrain_stage1.yaml", ["datasets.shapes_caption.lang=" + args.lang]),
        ("stage2", "blip2_internlm.train", "pretrain_stage2.yaml", ["datasets.shapes_caption.lang=" + args.lang]),
        ("vqa", "blip2_internlm.evaluate", "vqa_zeroshot.yaml", ["datasets.shapes_vqa.lang=" + args.lang]),
    ]
    checkpoint = None
    for name, module, cfg, options in stages:
        stage_out = output / name
        options = options + [f"run.output_dir={stage_out}"]
        if name == "stage2":
            options.append(f"model.pretrained={checkpoint}")
        if name == "vqa":
            options.append(f"model.finetuned={checkpoint}")
            if args.lang == "en":
                options.append("run.prompt=Question: {} Short answer:")
        started = time.time()
        torchrun(module, REPO_CONFIGS / cfg, options, args.nproc)
        job = job_dir(stage_out)
        entry = {"seconds": round(time.time() - started, 1), "output": str(job)}
        if module.endswith("train"):
            entry["epoch_losses"] = epoch_losses(job)
            checkpoint = max(job.glob("checkpoint_*.pth"), key=lambda p: p.stat().st_mtime)
        else:
            entry["metrics"] = json.loads((job / "evaluate.txt").read_text().splitlines()[-1])
        result[name] = entry

    (output / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return result


if __name__ == "__main__":
    main()
