"""The bench's recorder: what a run has measured so far, and the measuring that makes a row.

A section (``blip2_internlm.tools.bench.sections``) builds its models and hands the recorder
functions to time; the recorder times them (``blip2_internlm.tools.measure``), keeps each result
as a row (a row that fails is kept with its error: a variant that cannot run is a result, not a
crash), prints it as it comes, and reads each generation row's decoding step against its roofline
floor on this machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from blip2_internlm.dtypes import dtype_name
from blip2_internlm.tools.bench.models import load_size
from blip2_internlm.tools.bench.sides import NUM_BEAMS, VQA_PROMPT, Side, make_inputs
from blip2_internlm.tools.measure import interleaved_medians, measure_steps, roofline_seconds


def decode_step_cost(llm: torch.nn.Module, images: int, rows: int, prefix: int, generated: float) -> dict:
    """What one decoding step must do at the least: FLOPs and bytes read.

    One token for each of ``rows`` sequences (images x beams) goes through every linear layer of the
    LLM (the LM head included; the embedding is a lookup) and attends over ``prefix`` tokens (queries +
    prompt) and ``generated`` ones.  It must read every linear weight once, each image's prefix keys and
    values once (an image's beams share them) and each row's own, all in the weights' dtype.
    """
    from torch import nn

    weights = [m.weight for m in llm.modules() if isinstance(m, nn.Linear)]
    config = llm.config
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    kv_width = getattr(config, "num_key_value_heads", None) or heads
    kv_width *= hidden // heads
    element = weights[0].element_size()
    flops = 2 * rows * sum(w.numel() for w in weights) + 4 * rows * layers * hidden * (prefix + generated)
    kv_bytes = 2 * layers * kv_width * element * (images * prefix + rows * generated)
    return dict(
        flops=flops,
        weight_bytes=sum(w.numel() * w.element_size() for w in weights),
        kv_bytes=kv_bytes,
        dtype=dtype_name(weights[0].dtype),
    )


class Bench:
    """One run's record: its inputs, rows and notes, the machine's matmul peaks and copy bandwidth the
    rows are read against (measured by ``run`` before any section), the training runner's overheads
    and the sweep's curves."""

    def __init__(
        self,
        size_name: str,
        device: str,
        repeats: int,
        batch_size: int | None = None,
        out_dir: Path = Path("output/bench"),
    ):
        self.size_name, self.device, self.repeats = size_name, device, repeats
        self.size = load_size(size_name)
        self.batch_size = batch_size or self.size["batch_size"]
        self.inputs = make_inputs(self.size, device, self.batch_size)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.peaks: dict = {}
        self.peak_by_kernel: dict = {}
        self.bandwidth = None
        self.overheads: dict = {}
        self.scaling: dict = {}
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)

    def row(
        self,
        task: str,
        variant: str,
        side: Side | None,
        make_fn: Callable[[], Callable],
        images: int,
        tokens: list | None = None,
        status: str | None = None,
        decode: dict | None = None,
    ) -> dict:
        row = dict(task=task, variant=variant, model=side.label if side else None, images=images, status="ok")
        if status is not None:
            row["status"] = status
        else:
            try:
                row.update(measure_steps(make_fn(), self.device, self.repeats))
            except Exception as err:  # a variant that cannot run is a result, not a crash
                row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if row["status"] == "ok":
            row["images_per_s"] = images / row["median_s"]
            row["gflops_per_s"] = row["flops"] / row["median_s"] / 1e9
            for dtype, peak in self.peaks.items():
                row[f"pct_of_{dtype}_peak"] = 100 * row["flops"] / row["median_s"] / peak
            if tokens:
                row["new_tokens"] = sorted(set(tokens))
        if side is not None:
            row["side_notes"] = side.notes
        self.rows.append(row)
        shown = f"{row['median_s'] * 1e3:9.1f} ms" if row["status"] == "ok" else row["status"]
        print(f"  {task:10s} {variant:44s} {shown}", flush=True)
        if decode is not None and row["status"] == "ok":
            self.decode_step(row, side, make_fn, **decode)
        return row

    def decode_step(
        self,
        row: dict,
        side: Side,
        full: Callable[[], Callable],
        one_token: Callable[[], Callable],
        prompt: str,
        new_tokens: int,
    ):
        """A generation row's time per decoding step, (the call - the same call for one new token) /
        (new tokens - 1), the two calls timed in turn (a difference of timings), read against the step's
        roofline floor on this machine (``decode_step_cost`` over the matmul peak of the LLM's dtype and
        the copy bandwidth)."""
        try:
            medians = interleaved_medians({"full": full(), "one": one_token()}, self.device, self.repeats)
        except Exception as err:
            row["decode"] = dict(status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return
        step_s = (medians["full"] - medians["one"]) / (new_tokens - 1)
        images = row["images"]
        prefix = side.prefix_tokens(prompt)
        cost = decode_step_cost(side.llm, images, images * NUM_BEAMS, prefix, new_tokens / 2)
        peak = self.peaks.get(cost["dtype"])
        if not peak:
            row["decode"] = dict(status=f"n/a on this CPU: no {cost['dtype']} matmul peak", step_ms=step_s * 1e3)
            return
        # the floor of the dtype the step really runs in, at the fastest kernel that ran for it
        floor = roofline_seconds(cost["flops"], cost["weight_bytes"] + cost["kv_bytes"], peak, self.bandwidth)
        row["decode"] = dict(
            status="ok",
            step_ms=step_s * 1e3,
            call_ms=medians["full"] * 1e3,
            one_token_call_ms=medians["one"] * 1e3,
            floor_ms=floor["seconds"] * 1e3,
            bound=floor["bound"],
            step_vs_floor=step_s / floor["seconds"],
            rows=images * NUM_BEAMS,
            prefix_tokens=prefix,
            **cost,
        )
        print(
            f"  {'':10s} {'  decode step':44s} {step_s * 1e3:9.1f} ms, roofline floor "
            f"{floor['seconds'] * 1e3:.1f} ms ({floor['bound']}-bound): {step_s / floor['seconds']:.1f}x",
            flush=True,
        )

    def measure_side(
        self, side: Side, variant: str, tasks=("train", "caption", "vqa"), visual: dict | None = None
    ) -> None:
        """``visual``: what stands for the images (default the images; ours may read cached ViT output)."""
        inputs, size, batch = self.inputs, self.size, self.batch_size
        visual = visual or {"image": inputs["images"]}
        if "train" in tasks:
            samples = {**visual, "text_input": inputs["captions"]}
            self.row("train_step", variant, side, lambda: side.train_step(samples), batch)
        if "caption" in tasks:
            tokens = []
            decode = dict(
                one_token=lambda: side.caption(visual, 1, []),
                prompt=side.model.prompt,
                new_tokens=size["caption_tokens"],
            )
            self.row(
                "caption",
                variant,
                side,
                lambda: side.caption(visual, size["caption_tokens"], tokens),
                batch,
                tokens,
                decode=decode,
            )
        if "vqa" in tasks:
            tokens = []
            questions = [inputs["question"]] * batch
            decode = dict(
                one_token=lambda: side.vqa(visual, questions, 1, []),
                prompt=VQA_PROMPT.format(inputs["question"]),
                new_tokens=size["vqa_tokens"],
            )
            self.row(
                "vqa",
                variant,
                side,
                lambda: side.vqa(visual, questions, size["vqa_tokens"], tokens),
                batch,
                tokens,
                decode=decode,
            )
