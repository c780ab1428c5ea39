"""Every change this package makes to LAVIS 1.0.2, transformers and timm behaviour.

One function per fix, each with a one-line reason in its docstring and a test in
``tests/compat``.  ``prepare_imports()`` runs before ``lavis`` is imported (its modules fail
to import on the pinned stack otherwise); ``patch_lavis()`` runs after.  Both are idempotent.
``applied()`` lists the fixes in force, for logs and bug reports.
"""

from __future__ import annotations

from blip2_internlm.compat.fixes import applied, fix  # noqa: F401  (compat.fix, compat.applied)


def prepare_imports() -> None:
    from blip2_internlm.compat import imports

    imports.restore_moved_transformers_helpers()
    imports.quiet_timm_deprecated_import_paths()


def patch_lavis() -> None:
    from blip2_internlm.compat import (
        attention,
        blip2,
        config,
        datasets,
        distributed,
        model_weights,
        runner_base,
        tasks,
    )

    config.run_config_validated_at_start()
    distributed.init_distributed_mode_cpu_aware()
    distributed.metric_sync_on_backend_device()
    runner_base.ddp_device_ids_only_on_cuda()
    runner_base.grad_scaler_only_on_cuda()
    runner_base.fresh_job_dir_relative_to_cwd()
    runner_base.epoch_reshuffle_behind_prefetch_loader()
    runner_base.evaluation_on_the_models_device()
    runner_base.reliable_runners()
    model_weights.safe_model_checkpoint_loading()
    blip2.offline_blip2_assets()
    blip2.stage1_models_built_from_config()
    blip2.qformer_lm_head_generation()
    blip2.qformer_lm_head_bias_tied()
    blip2.qformer_captions_without_cjk_spaces()
    blip2.eva_vit_checkpoint_non_reentrant()
    attention.fused_attention_in_eva_vit_and_qformer()
    datasets.no_hidden_annotation_downloads()
    datasets.caption_samples_keep_image_ids()
    datasets.vg_caption_images_in_download_layout()
    datasets.truncated_images_are_errors()
    datasets.caption_image_ids_read_per_sample()
    datasets.laion_shards_decode_images_and_captions_only()
    tasks.length_sorted_vqa_evaluation()
