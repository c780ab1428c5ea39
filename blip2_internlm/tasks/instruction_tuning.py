"""``task: instruction_tuning``: LAVIS's ``image_text_pretrain`` over caption and VQA datasets phrased as
instructions (InstructBLIP's recipe, ``datasets/instructions.py``), beside conversation datasets.

A dataset whose config has an ``instruction`` block gets its training split wrapped::

    datasets:
      coco_caption:
        instruction: {task: caption, lang: en}     # caption | vqa | detail; zh | en
      coco_vqa:
        instruction: {task: vqa, lang: en}
      llava_conversations: {...}                   # already conversations: left as it is

Each example is then a one-turn conversation whose user turn is an instruction template drawn per
example (and per epoch) from the task's ``train`` templates; the ``heldout`` ones are never drawn.
"""

from __future__ import annotations

from lavis.common.registry import registry
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask

from blip2_internlm.datasets.instructions import InstructionDataset

INSTRUCTION_KEYS = ("task", "lang")


@registry.register_task("instruction_tuning")
class InstructionTuningTask(ImageTextPretrainTask):
    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        seed = int(cfg.run_cfg.get("seed", 42))
        for name, dataset_cfg in cfg.datasets_cfg.items():
            block = dataset_cfg.get("instruction")
            if block is None:
                continue
            unknown = sorted(set(block) - set(INSTRUCTION_KEYS))
            if unknown or "task" not in block:
                raise ValueError(
                    f"datasets.{name}.instruction: expected {{task: caption|vqa|detail, lang: zh|en}}, got "
                    f"{dict(block)}"
                )
            splits = datasets[name]
            if "train" in splits:
                splits["train"] = InstructionDataset(splits["train"], block["task"], block.get("lang", "en"), seed)
        return datasets
