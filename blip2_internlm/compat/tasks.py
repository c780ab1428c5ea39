"""LAVIS's tasks: evaluation order."""

import functools

from blip2_internlm.compat.fixes import fix


def sort_by_question_length(dataset, key: str = "question") -> bool:
    """Reorder ``dataset.annotation`` longest question first (stable); False if it has none.

    Batches then hold questions of similar length, so little of each batch is left padding;
    LAVIS's VQA task keys every answer by ``question_id``, so the scores do not change.
    Longest first: a batch that does not fit in memory fails at the first step.
    """
    annotation = getattr(dataset, "annotation", None)
    if (
        not isinstance(annotation, list)
        or not annotation
        or not all(isinstance(a, dict) and isinstance(a.get(key), str) for a in annotation)
    ):
        return False
    dataset.annotation = sorted(annotation, key=lambda ann: -len(ann[key]))
    return True


@fix
def length_sorted_vqa_evaluation():
    """LAVIS evaluates VQA in dataset order, so every batch is padded to its longest question; run.length_sorted_eval: True sorts the evaluation splits by question length."""
    from lavis.tasks.vqa import VQATask

    build = VQATask.build_datasets  # inherited by the GQA and AOK-VQA tasks

    @functools.wraps(build)
    def build_datasets(self, cfg):
        datasets = build(self, cfg)
        run = cfg.run_cfg
        if run.get("length_sorted_eval", False):
            # the runner builds its (distributed) samplers after this, so every rank sees the
            # sorted order, and results still merge by question_id; training order is untouched
            eval_splits = set(run.get("valid_splits", []) or []) | set(run.get("test_splits", []) or [])
            for splits in datasets.values():
                for split in eval_splits & set(splits):
                    sort_by_question_length(splits[split])
        return datasets

    VQATask.build_datasets = build_datasets
