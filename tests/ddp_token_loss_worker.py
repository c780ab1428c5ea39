"""One rank of the DDP token-loss spec (tests/models/test_ddp_token_loss.py), run by torchrun.

    ddp_token_loss_worker.py BATCH_FILE OUT_DIR

BATCH_FILE (torch.save) holds the tiny model's ``state_dict`` and the global batch
(``images``, ``captions``); rank r takes its contiguous share of the batch.  For each loss path
(``lm_head_on_labels_only`` true and false) the rank runs one DistributedDataParallel
forward/backward as training does, and one with the loss every rank computed before it
was token-weighted across ranks: the mean over its own label tokens.  It also records its
loss without gradients, as evaluation computes it.  OUT_DIR/rank<r>.pt gets the losses,
token counts and DDP's (averaged) gradients of the trainable parameters.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main(batch_file: str, out_dir: str) -> None:
    from lavis.models import load_model_and_preprocess

    import blip2_internlm  # noqa: F401  (applies compat, registers the model)
    import blip2_internlm.models.blip2_internlm as blip2_module

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batch = torch.load(batch_file)
    model = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)[0]  # eval: no dropout
    model.load_state_dict(batch["state_dict"], strict=True)
    share = len(batch["captions"]) // world_size
    mine = slice(rank * share, (rank + 1) * share)
    samples = {"image": batch["images"][mine], "text_input": batch["captions"][mine]}
    ddp = DistributedDataParallel(model)
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    token_weighted = blip2_module.cross_rank_token_normaliser

    def one_step():
        model.zero_grad(set_to_none=True)
        output = ddp(samples)
        output["loss"].backward()
        grads = {name: param.grad.detach().clone() for name, param in trainable}
        return {"loss": output["loss"].detach(), "loss_tokens": output["loss_tokens"], "grads": grads}

    result = {}
    for labels_only in (True, False):
        model.lm_head_on_labels_only = labels_only
        result[labels_only, "token_weighted"] = one_step()
        blip2_module.cross_rank_token_normaliser = lambda loss_tokens: None  # each rank's own token mean
        try:
            result[labels_only, "per_rank_mean"] = one_step()
        finally:
            blip2_module.cross_rank_token_normaliser = token_weighted
        with torch.no_grad():
            result[labels_only, "no_grad"] = {"loss": model(samples)["loss"]}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
