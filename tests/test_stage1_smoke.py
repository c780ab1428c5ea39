"""Stage 1 (LAVIS's blip2: ITC + ITM + ITG) trains on CPU with two gloo processes through torchrun."""

import json

import torch


def test_both_ranks_train_and_the_loss_goes_down(stage1_run):
    job_dir, result = stage1_run
    assert "distributed init (rank 1, world 2, gloo)" in result.stdout + result.stderr
    epochs = [
        json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train_')
    ]
    losses = [float(e["train_loss"]) for e in epochs]
    assert len(losses) == 3
    assert losses[-1] < 0.85 * losses[0], losses


def test_the_checkpoint_reloads_with_a_key_report(stage1_run, lavis_ready):
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    job_dir, _ = stage1_run
    checkpoint = job_dir / "checkpoint_2.pth"
    model = Blip2Qformer.from_pretrained("tiny")
    report = model.load_from_pretrained(str(checkpoint))
    assert report.unexpected == []
    assert report.missing and all(key.startswith("visual_encoder.") for key in report.missing)  # frozen, not saved
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(model.query_tokens, saved["query_tokens"])
    assert any(key.startswith("Qformer.bert.encoder") for key in report.loaded)
