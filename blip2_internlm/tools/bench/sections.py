"""The bench's sections, one function each, in the order ``run`` calls them; each takes the recorder.

* :func:`baselines` (``--sections lavis``): LAVIS's ``Blip2OPT``, as shipped and with its OPT in fp32.
* :func:`ours_and_toggles` (``ours``): our default and each optimisation switched off/on from it.
* :func:`reliability`: what the training runner adds to a step (non-finite guard, atomic save).
* :func:`caption_cli`: the captioning command's loop against the model's own batched ``generate``.
* :func:`sweep`: both models' step and VQA over batch sizes, and VQA over beams.

A section builds its models, hands the recorder the functions to time, and frees each model before
it builds the next, so that no two models are in memory at once.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import torch

from blip2_internlm.hardware import cpu_has_native_bf16, cpu_isa_class, emulated_bf16_slowdown
from blip2_internlm.tools.bench.models import build_baseline, build_ours, lavis_eager_attention, size_precision
from blip2_internlm.tools.bench.recorder import Bench
from blip2_internlm.tools.bench.sides import NUM_BEAMS, Side, make_inputs, ours_side
from blip2_internlm.tools.measure import measure_steps

#: What ``--sections`` may name: LAVIS's model, ours with its toggles, the training runner's additions,
#: the captioning command's loop, the batch-size and beam sweep.
SECTIONS = ("lavis", "ours", "reliability", "caption_cli", "sweep")

#: Our model like the CPU baseline (LAVIS's OPT in fp32): the LLM in fp32, no autocast.
LIKE_FOR_LIKE = dict(llm_precision="fp32", autocast_dtype="off")

#: The scaling sweep: images per batch for the step and for VQA (beam 5), and beams at the size's batch.
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)
SWEEP_BEAMS = (1, 3, 5)


def baselines(bench: Bench) -> None:
    """LAVIS's ``Blip2OPT`` as shipped (its OPT in fp16) and, on a CPU, with its OPT in fp32 (what a CPU
    user would pick): the step, captioning and VQA, on LAVIS's own attention code."""
    variants = [("LAVIS blip2_opt as shipped (OPT fp16)", None)]
    if torch.device(bench.device).type == "cpu":
        variants.append(("LAVIS blip2_opt, OPT fp32", "fp32"))
    for label, opt_dtype in variants:
        try:
            model = build_baseline(bench.size, bench.device, opt_dtype=opt_dtype)
        except Exception as err:
            for task in ("train_step", "caption", "vqa"):
                bench.row(task, label, None, None, bench.batch_size, status=f"error: cannot build: {err}")
            continue
        side = Side(
            label,
            model,
            True,
            notes={
                "attention": lavis_eager_attention(model),
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
            },
        )
        bench.measure_side(side, label)
        del side, model
        gc.collect()


def ours_and_toggles(bench: Bench, skip_toggles: bool) -> None:
    """Our default, then (unless ``skip_toggles``) each optimisation switched off or on from it: attention,
    the feature cache, the LM head on labels only, length-sorted VQA batching, then one model per
    precision or memory setting, like for like with the fp32 baseline among them."""
    from blip2_internlm.feature_cache import vit_features
    from blip2_internlm.models.attention import set_attn_implementation

    default = ours_side(bench.size, bench.device)
    bench.measure_side(default, "ours: default")
    if skip_toggles:
        return
    batch = bench.batch_size

    # 2. attention: SDPA (default) vs LAVIS's hand-written attention, ViT + Q-Former + LLM
    set_attn_implementation(default.model, "eager")
    bench.measure_side(default, "ours: attention eager (default sdpa)")
    set_attn_implementation(default.model, "sdpa")

    # 3. frozen-ViT feature cache: training and evaluation read the ViT's output (what
    # FeatureStore memory-maps) instead of running the ViT
    cached = {"vit_embeds": vit_features(default.model, bench.inputs["images"])}
    bench.measure_side(default, "ours: feature cache on", visual=cached)

    # the LM head on every position (transformers' labels= path) instead of labelled ones only
    default.model.lm_head_on_labels_only = False
    bench.measure_side(default, "ours: lm_head_on_labels_only=False", ("train",))
    default.model.lm_head_on_labels_only = True

    # 5. length-sorted VQA batching: 4 batches of mixed questions, dataset order vs sorted
    length_sorted_vqa(bench, default)
    del default
    gc.collect()

    # 4. precision and memory: each a model built with one config key changed
    no_autocast = dict(autocast_dtype="off")
    if size_precision(bench.size, bench.device)["vit"] == "fp16":  # LAVIS's fp16 ViT runs only under autocast
        no_autocast["vit_precision"] = "fp32"
    slow_bf16 = torch.device(bench.device).type == "cpu" and not cpu_has_native_bf16()
    builds = [] if slow_bf16 else [(dict(autocast_dtype="bf16"), ("train", "caption", "vqa"))]
    builds.append((no_autocast, ("train", "caption", "vqa")))
    if slow_bf16:
        bench.note(
            f"bf16 rows: not measured, this CPU ({cpu_isa_class()}) only emulates bf16 "
            f"(a bf16 matmul measured {emulated_bf16_slowdown():.0f}x slower than fp32)"
        )
    if torch.device(bench.device).type != "cuda":
        bench.note("fp16 autocast + loss scaling: not measured on CPU (autocast_dtype fp16 means no autocast on CPU)")
    # like for like with the fp32 baseline (the LLM in fp32, no autocast region), also where the default
    # resolves to it: the default is never to be slower than this row
    builds.append((LIKE_FOR_LIKE, ("train", "caption", "vqa")))
    if size_precision(bench.size, bench.device)["internlm2"] == "fp32" and not slow_bf16:
        builds.append((dict(llm_precision="bf16"), ("train", "caption", "vqa")))
    if torch.device(bench.device).type == "cpu":
        # fp32 linears through torch's default BLAS instead of oneDNN (models/cpu_linear.py), like for like
        builds.append(({**LIKE_FOR_LIKE, "cpu_fp32_linear": "torch"}, ("train", "caption", "vqa")))
    builds.append((dict(llm_grad_checkpoint=True), ("train",)))
    if torch.device(bench.device).type == "cuda":
        builds.append((dict(autocast_dtype="fp16"), ("train",)))
    for overrides, tasks in builds:
        variant = "ours: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        try:
            side = ours_side(bench.size, bench.device, **overrides)
        except Exception as err:
            bench.row("train_step", variant, None, None, batch, status=f"error: cannot build: {err}")
            continue
        if overrides.get("autocast_dtype") == "fp16":
            side.scaler = torch.amp.GradScaler(torch.device(bench.device).type)
            variant += " + GradScaler"
        bench.measure_side(side, variant, tasks)
        if overrides == dict(autocast_dtype="bf16"):  # the fastest combination: bf16 and the cache
            cached = {"vit_embeds": vit_features(side.model, bench.inputs["images"])}
            bench.measure_side(side, "ours: autocast_dtype=bf16, feature cache on", visual=cached)
        del side
        gc.collect()


def length_sorted_vqa(bench: Bench, side: Side) -> None:
    """VQA over 4 batches of questions of mixed lengths, in dataset order and sorted by length as our
    VQA task sorts them (``compat.tasks.sort_by_question_length``): what less padding per batch saves."""
    from blip2_internlm.compat.tasks import sort_by_question_length

    pool = bench.inputs["question_pool"]
    batch = bench.batch_size

    class Questions:  # what sort_by_question_length reads from a LAVIS VQA dataset
        annotation = [{"question": q} for q in pool]

    ordered = Questions()
    sort_by_question_length(ordered)
    orders = {"dataset order": pool, "length-sorted": [a["question"] for a in ordered.annotation]}
    visual = {"image": bench.inputs["images"]}
    for name, questions in orders.items():
        tokens = []

        def make(questions=questions, tokens=tokens):
            runs = [
                side.vqa(visual, questions[i : i + batch], bench.size["vqa_tokens"], tokens)
                for i in range(0, len(questions), batch)
            ]
            return lambda: [run() for run in runs]

        bench.row("vqa_mixed", f"ours: mixed questions, {name}", side, make, len(questions), tokens)


def reliability(bench: Bench) -> None:
    """What the training runner adds to a step: the non-finite guard, and an atomic checkpoint
    save (temporary file, fsync, rename) against a plain ``torch.save`` of the same state."""
    import tempfile

    from blip2_internlm.checkpoint import save_checkpoint_file

    side = ours_side(bench.size, bench.device)
    samples = {"image": bench.inputs["images"], "text_input": bench.inputs["captions"]}
    plain = bench.row(
        "train_step",
        "ours: default (reliability baseline)",
        side,
        lambda: side.train_step(samples),
        bench.batch_size,
    )
    guarded = bench.row(
        "train_step",
        "ours: default + non-finite guard",
        side,
        lambda: side.guarded_train_step(samples),
        bench.batch_size,
    )
    model = side.model
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for param in optimizer.param_groups[0]["params"]:  # optimizer state as after a step
        optimizer.state[param] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    state = {
        "model": {k: v for k, v in model.state_dict().items() if k not in frozen},
        "optimizer": optimizer.state_dict(),
    }
    with tempfile.TemporaryDirectory(dir=bench.out_dir) as directory:
        target = Path(directory) / "checkpoint_last.pth"
        saves = {
            "torch.save": bench.row(
                "checkpoint_save",
                "torch.save in place (LAVIS)",
                None,
                lambda: lambda: torch.save(state, target),
                bench.batch_size,
            ),
            "atomic": bench.row(
                "checkpoint_save",
                "atomic: temporary + fsync + rename",
                None,
                lambda: lambda: save_checkpoint_file(state, target),
                bench.batch_size,
            ),
        }
        size = target.stat().st_size
    if all(row["status"] == "ok" for row in (plain, guarded, *saves.values())):
        step = plain["median_s"]
        extra_save = saves["atomic"]["median_s"] - saves["torch.save"]["median_s"]
        bench.overheads = {
            "non-finite guard, % of a step": round(100 * (guarded["median_s"] - step) / step, 2),
            "checkpoint bytes": size,
            "atomic save over torch.save, ms per save": round(extra_save * 1e3, 1),
            "atomic save over torch.save, % of a step, per save": round(100 * extra_save / step, 2),
            **{
                f"atomic save, % of a step, amortised at save_every_iters={n}": round(
                    100 * saves["atomic"]["median_s"] / (n * step), 3
                )
                for n in (100, 1000)
            },
        }
        for key, value in bench.overheads.items():
            bench.note(f"{key}: {value}")
    gc.collect()  # the model goes with this frame; the next section builds its own


def caption_cli(bench: Bench, batches: int = 8) -> None:
    """What ``python -m blip2_internlm.tools.caption`` adds to generation: its batched loop (JPEG files
    decoded and resized in DataLoader workers, ``generate``, JSONL rows written and flushed)
    against the model's own batched ``generate`` on the same images already in memory."""
    import tempfile

    from lavis.processors.blip_processors import BlipImageEvalProcessor
    from PIL import Image

    from blip2_internlm.tools import caption

    side = ours_side(bench.size, bench.device)
    model = side.model.eval()
    count, new_tokens = batches * bench.batch_size, bench.size["caption_tokens"]
    processor = BlipImageEvalProcessor(image_size=bench.size["image_size"])
    generation = caption.GenerationSettings(
        mode="caption", prompt=model.prompt, num_beams=NUM_BEAMS, max_len=new_tokens, min_len=new_tokens
    )
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=bench.out_dir) as directory:
        folder = Path(directory)
        for index in range(count):
            # photo-sized and smooth, so the JPEGs decode like photos rather than noise
            coarse = torch.randint(0, 256, (3, 12, 16), generator=generator, dtype=torch.uint8).float()
            pixels = torch.nn.functional.interpolate(coarse[None], size=(480, 640), mode="bicubic")[0]
            array = pixels.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(array).save(folder / f"{index:04d}.jpg", quality=90)
        items = caption.collect_items([folder])
        images = torch.stack([processor(Image.open(item.path).convert("RGB")) for item in items]).to(bench.device)
        in_memory = list(images.split(bench.batch_size))
        out = folder / "captions.jsonl"

        def command_loop():
            out.unlink(missing_ok=True)
            summary = caption.run(model, processor, items, out, generation, batch_size=bench.batch_size)
            if summary.errors or summary.written != count:
                raise RuntimeError(f"the caption loop wrote {summary.written} rows, {summary.errors} errors")

        rows = {
            "generate": bench.row(
                "caption_cli",
                "generate, batched, images in memory",
                side,
                lambda: lambda: [generation(model, batch, None) for batch in in_memory],
                count,
            ),
            "command": bench.row(
                "caption_cli",
                f"caption command loop: {caption.WORKERS} decode workers + JSONL",
                side,
                lambda: command_loop,
                count,
            ),
        }
    if all(row["status"] == "ok" for row in rows.values()):
        ratio = rows["command"]["median_s"] / rows["generate"]["median_s"]
        bench.note(
            f"caption command: {rows['command']['images_per_s']:.2f} images/s against generate's "
            f"{rows['generate']['images_per_s']:.2f}: time ratio {ratio:.3f}, "
            f"overhead {100 * (ratio - 1):.1f}% "
            f"(target <= 10%; {count} JPEGs of 640x480, batch {bench.batch_size})"
        )


def sweep(bench: Bench, repeats: int = 2) -> None:
    """How cost grows: LAVIS's model and ours by default, the training step and VQA (beam 5) at
    each of ``SWEEP_BATCHES`` images per batch, and VQA at the size's batch with each of
    ``SWEEP_BEAMS`` beams; images/s into ``bench.scaling`` (a point that fails is left out, noted)."""
    cpu = torch.device(bench.device).type == "cpu"
    sides = (
        ("LAVIS blip2_opt" + (", OPT fp32" if cpu else ""), True),
        ("ours: default", False),
    )
    scaling = {"batch": {}, "beams": {}, "repeats": repeats, "vqa_new_tokens": bench.size["vqa_tokens"]}
    for label, is_baseline in sides:
        try:
            model = (
                build_baseline(bench.size, bench.device, opt_dtype="fp32" if cpu else None)
                if is_baseline
                else build_ours(bench.size, bench.device)
            )
        except Exception as err:
            bench.note(f"sweep: {label}: cannot build: {err}")
            continue
        curves = {"train_step": [], "vqa": [], "beams": []}
        for task, x, images, make in _sweep_points(bench, Side(label, model, is_baseline)):
            try:
                seconds = measure_steps(make(), bench.device, repeats, flops=False)["median_s"]
            except Exception as err:
                bench.note(f"sweep: {label} {task} at {x}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
            point = dict(x=x, images=images, ms=round(seconds * 1e3, 2), images_per_s=round(images / seconds, 3))
            curves[task].append(point)
            print(f"  sweep      {label:32s} {task:10s} {x:3d} {seconds * 1e3:9.1f} ms", flush=True)
        scaling["beams"][label] = curves.pop("beams")
        scaling["batch"][label] = curves
        del model
        gc.collect()
    bench.scaling = scaling


def _sweep_points(bench: Bench, side: Side):
    """(task, x, images, make) for each point of the sweep; ``make()`` gives the function to time."""
    new_tokens = bench.size["vqa_tokens"]
    for batch in SWEEP_BATCHES:
        inputs = make_inputs(bench.size, bench.device, batch)
        visual = {"image": inputs["images"]}
        samples = {**visual, "text_input": inputs["captions"]}
        questions = [inputs["question"]] * batch
        yield "train_step", batch, batch, functools.partial(side.train_step, samples)
        yield "vqa", batch, batch, functools.partial(side.vqa, visual, questions, new_tokens, [])
    inputs = make_inputs(bench.size, bench.device, bench.batch_size)
    visual = {"image": inputs["images"]}
    questions = [inputs["question"]] * bench.batch_size
    for beams in SWEEP_BEAMS:
        yield "beams", beams, bench.batch_size, functools.partial(side.vqa, visual, questions, new_tokens, [], beams)
