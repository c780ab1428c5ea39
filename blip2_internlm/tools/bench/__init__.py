"""Benchmark: ``blip2_internlm`` against LAVIS 1.0.2's own ``blip2_opt`` at matched sizes.

    python -m blip2_internlm.tools.bench --size {tiny,small,real} [--device cpu|cuda] [--repeats N]
                                   [--batch-size B] [--out-dir output/bench] [--skip-toggles]
                                   [--sections lavis,ours,reliability,caption_cli,sweep]

A script, not a test.  In one process, on identical inputs (same images, captions, questions,
seeds), it times

* one stage-2 training step (forward + backward + ``AdamW.step`` over the trainable parameters,
  as LAVIS's runner builds its optimizer),
* caption generation (beam 5) and VQA answering (LAVIS's VQA defaults: beam 5, ``max_len`` 10,
  ``min_len`` 1) in images/s, with the generated length forced equal on both sides (random
  weights end at random lengths otherwise),
* each optimisation of ours switched off/on one at a time from our default, and bf16 autocast
  with the feature cache together,
* for each generation row, the time of one decoding step against that step's roofline floor on this
  machine (``decode_step_cost``, the measured matmul peak and copy bandwidth),
* the sweep: the step and VQA at 1-32 images per batch and VQA at 1, 3 and 5 beams, both models,
  written as an SVG chart beside the JSON,

and reports medians over ``--repeats`` runs after a warm-up, ratios against the baseline,
achieved FLOP/s (``torch.utils.flop_counter.FlopCounterMode`` counts / median time) against the
peak matmul FLOP/s measured on the same machine, and peak memory (CPU: peak RSS growth; CUDA:
``max_memory_allocated``), all by ``blip2_internlm.tools.measure``.  The table is printed and written
with the machine's description to ``<out-dir>/<size>-<device>-<timestamp>.json``.

The models.  Sizes are YAML files in ``blip2_internlm/configs/bench``.  Both sides share the
EVA ViT (``blip2_internlm.models.vision.VIT_ARCHS``), the Q-Former (a BERT config of the size),
the LLM's width, depth, heads and vocabulary size; the InternLM2 SwiGLU width is chosen so its
MLP has OPT's MLP parameter count.  The baseline is ``lavis.models.blip2_models.blip2_opt.Blip2OPT``
as shipped: its vendored ``modeling_opt.OPTForCausalLM`` loaded in fp16 (LAVIS hard-codes
``torch_dtype=torch.float16``), its hand-written attention, its ``maybe_autocast`` (off on CPU),
its ``forward``/``generate``.  Weights are random: ours are built by ``blip2_internlm.factory`` with the
``random`` weight source of ``blip2_internlm.models.builders`` (the one assembly path every model takes), the baseline's
ViT and Q-Former by the same builders and its OPT by its own constructor with random
initialisation (``models.lavis_opt_random_weights``), so no weights are written or read and the
``real`` size needs no downloads.  The ``LAVIS blip2_opt, OPT fp32`` rows are the same baseline
with its OPT in fp32 (on CPU, fp16 is what LAVIS picks, not what a CPU user would pick, and it
fails there on mixed dtypes).

Fixes the baseline needs to run on this stack (transformers 4.57 vs code written for 4.26),
applied only while the bench runs, none changing its arithmetic: ``models.lavis_opt_generation``.

Where each part is, in this package:

* ``models``: the sizes, the model directories (configs and tokenizers, no weights), both models
  built at a size, and the fixes the baseline needs;
* ``sides``: the shared inputs and the ``Side`` (one model under test: its step, captioning, VQA);
* ``recorder``: ``Bench``, the run's record, and the measuring that makes a row;
* ``sections``: one function per ``--sections`` name, each taking the recorder;
* ``report``: the machine's description, the ratios, the targets, the table and the sweep's chart;
* here: :func:`run` (the machine's peaks, then the sections, then the report) and :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import torch

from blip2_internlm.hardware import cpu_isa_class
from blip2_internlm.tools.bench.models import (
    build_baseline,
    build_ours,
    internlm2_config,
    internlm2_dir,
    lavis_opt_generation,
    load_size,
    opt_config,
    opt_dir,
    qformer_dir,
    size_names,
)
from blip2_internlm.tools.bench.recorder import Bench, decode_step_cost
from blip2_internlm.tools.bench.report import format_table, machine_info, ratios, scaling_chart, targets
from blip2_internlm.tools.bench.sections import (
    SECTIONS,
    SWEEP_BATCHES,
    SWEEP_BEAMS,
    baselines,
    caption_cli,
    ours_and_toggles,
    reliability,
    sweep,
)
from blip2_internlm.tools.bench.sides import NUM_BEAMS, VQA_PROMPT, Side, make_inputs

# ``run`` (below) calls peak_matmul_flops through this module's namespace, so a spec that replaces
# ``bench.peak_matmul_flops`` changes what ``run`` measures.
from blip2_internlm.tools.measure import measure_steps, memory_bandwidth, peak_matmul_flops

__all__ = [
    "NUM_BEAMS",
    "SECTIONS",
    "SWEEP_BATCHES",
    "SWEEP_BEAMS",
    "VQA_PROMPT",
    "Bench",
    "Side",
    "baselines",
    "build_baseline",
    "build_ours",
    "caption_cli",
    "decode_step_cost",
    "format_table",
    "internlm2_config",
    "internlm2_dir",
    "load_size",
    "machine_info",
    "main",
    "make_inputs",
    "measure_steps",
    "opt_config",
    "opt_dir",
    "ours_and_toggles",
    "peak_matmul_flops",
    "qformer_dir",
    "reliability",
    "run",
    "scaling_chart",
    "size_names",
    "sweep",
]


def run(bench: Bench, skip_toggles: bool = False, sections=SECTIONS) -> dict:
    """The machine's matmul peaks and copy bandwidth, then each of ``sections`` in turn into ``bench``,
    then the result: the rows with their ratios, the targets, the machine and the settings."""
    print(
        f"bench size={bench.size_name} device={bench.device} batch={bench.batch_size} repeats={bench.repeats}",
        flush=True,
    )
    bench.peaks = peak_matmul_flops(bench.device, by_kernel=bench.peak_by_kernel)
    bench.bandwidth = memory_bandwidth(bench.device)
    print("  peak matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in bench.peaks.items()), flush=True)
    print(
        "  by kernel: "
        + ", ".join(f"{k} {v / 1e9:.0f}" if v else f"{k} n/a on this CPU" for k, v in bench.peak_by_kernel.items()),
        flush=True,
    )
    print(f"  CPU class: {cpu_isa_class()}", flush=True)
    print(f"  memory bandwidth (copy, read + write): {bench.bandwidth / 1e9:.1f} GB/s", flush=True)
    with lavis_opt_generation():
        if "lavis" in sections:
            baselines(bench)
        if "ours" in sections:
            ours_and_toggles(bench, skip_toggles)
    if "reliability" in sections:
        reliability(bench)
    if "caption_cli" in sections:
        caption_cli(bench)
    if "sweep" in sections:
        with lavis_opt_generation():
            sweep(bench)
    ratios(bench.rows)
    return dict(
        size=bench.size_name,
        device=bench.device,
        batch_size=bench.batch_size,
        repeats=bench.repeats,
        size_config=bench.size,
        machine=machine_info(bench.device),
        peak_matmul_flops=bench.peaks,
        peak_matmul_flops_by_kernel=bench.peak_by_kernel,
        memory_bandwidth_bytes_per_s=bench.bandwidth,
        notes=bench.notes,
        scaling=bench.scaling,
        rows=bench.rows,
        targets=targets(bench.rows, bench.peaks),
        reliability_overheads=bench.overheads,
        generation=dict(
            num_beams=NUM_BEAMS,
            caption_new_tokens=bench.size["caption_tokens"],
            vqa_new_tokens=bench.size["vqa_tokens"],
            vqa_prompt=VQA_PROMPT,
            forced_length="min length = max length on both sides (LAVIS: min_length counts its prompt ids)",
        ),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_internlm.tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small", choices=size_names())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median), after one warm-up")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the size's)")
    parser.add_argument("--skip-toggles", action="store_true", help="baseline vs our default only")
    parser.add_argument("--out-dir", type=Path, default=Path("output/bench"))
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)"
    )
    args = parser.parse_args(argv)
    sections = [name for name in args.sections.split(",") if name]
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")

    import blip2_internlm  # noqa: F401  (compat fixes, registration)

    bench = Bench(args.size, args.device, args.repeats, args.batch_size, args.out_dir)
    result = run(bench, args.skip_toggles, sections)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    where = torch.device(args.device).type
    where = f"{where}-{cpu_isa_class()}" if where == "cpu" else where
    out = args.out_dir / f"{args.size}-{where}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["scaling"]:
        chart = out.with_name(out.stem + "-scaling.svg")
        chart.write_text(scaling_chart(result))
        print(f"wrote {chart}")
    print()
    print(format_table(result))
    print("\ntargets: " + json.dumps(result["targets"], indent=2))
    if result["reliability_overheads"]:
        print("\ntraining runner overheads: " + json.dumps(result["reliability_overheads"], indent=2))
    print(f"\nwrote {out}")
    return 0
