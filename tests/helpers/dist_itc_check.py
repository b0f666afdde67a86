"""Stage 1's losses across processes, run under `accelerate launch --num_processes 2`
(tests/test_pretrain_qformer.py::test_two_processes_see_the_global_batch).

Every process builds the same tiny Stage1 and the same batch of 8 image-caption pairs (two
captions shared across the processes' halves) and takes its half. Each computes the
losses with the gather (`Stage1.losses`, `gather=True`), and also, on the whole batch
without any gather, what one process would. ITM negatives are fixed global indices (the
test replaces `hard_negatives`), so both see the same pairs. Written to argv[1] by rank 0,
for BLIP-2's ITC gradient and for `itc_full_gradient`: the largest difference between the
losses averaged over the processes and the one-process losses, the same for the gradients
(averaged, as DDP does), the largest difference of the ITM sampling weights (local rows of
the global matrix); and how far the local-only ITC is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from components.core.config import PretrainQFormerConfig  # noqa: E402
from components.model.tiny.blip_diffusion import build_tiny  # noqa: E402
from components.training.qformer_objectives import Stage1  # noqa: E402

CAPTIONS = ("a red dog", "a blue cat", "the green toy", "a black cup", "an orange ball", "a white lamp")
ROWS = [0, 1, 2, 3, 3, 4, 5, 1]  # rows 3|4 and 1|7 share a caption across the two halves


def main(out: Path) -> None:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # the group, as the stage's Accelerator makes it
    world, rank = state.num_processes, state.process_index
    torch.set_num_threads(1)
    model = build_tiny(0)
    stage1 = Stage1(model.qformer, 16, model.qformer_tokenizer.bos_token_id).eval()
    stage1.qformer.requires_grad_(True)
    stage1.qformer.visual_encoder.requires_grad_(False)
    stage1.ln_vision.requires_grad_(True)
    stage1.qformer.proj_layer.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # not an identity, so that its gradient means something
        stage1.ln_vision.weight.add_(0.2 * torch.randn(stage1.ln_vision.weight.shape, generator=g))
    n = len(ROWS)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    idx = torch.tensor(ROWS)
    tok = model.qformer_tokenizer([CAPTIONS[i] for i in ROWS], padding="max_length", max_length=12,
                                  truncation=True, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    # fixed negatives, global indices, never a positive: the next rows with another caption
    neg_text = torch.tensor([next(j % n for j in range(i + 3, i + 3 + n) if ROWS[j % n] != ROWS[i]) for i in range(n)])
    neg_image = torch.tensor([next(j % n for j in range(i + 5, i + 5 + n) if ROWS[j % n] != ROWS[i]) for i in range(n)])
    trainable = {k: p for k, p in stage1.named_parameters() if p.requires_grad}
    b = n // world
    mine = slice(rank * b, (rank + 1) * b)

    def run(rows: slice, gather: bool, cfg: PretrainQFormerConfig):
        seen = {}

        def fixed(w_i2t, w_t2i, generator, offset):
            seen.update(w_i2t=w_i2t, w_t2i=w_t2i, offset=offset)
            return neg_text[rows], neg_image[rows]

        stage1.hard_negatives = fixed
        stage1.zero_grad()
        losses = stage1.losses(stage1.image_embeds(pixels[rows]), idx[rows], ids[rows], mask[rows], cfg, None,
                               gather=gather)
        losses["loss"].backward()
        grads = {k: p.grad.detach().clone() for k, p in trainable.items() if p.grad is not None}
        return {k: v.detach() for k, v in losses.items()}, grads, seen

    result = {"processes": world, "global_batch": n}
    for full_gradient in (False, True):  # BLIP-2's gradient, and the one through both sides
        # ITG is per process (a token mean over its own rows), as in BLIP-2: left out here
        cfg = PretrainQFormerConfig(embed_dim=16, itg_weight=0.0, itc_full_gradient=full_gradient)
        full, full_grads, full_seen = run(slice(None), gather=False, cfg=cfg)
        local, local_grads, local_seen = run(mine, gather=True, cfg=cfg)
        loss_diff = 0.0
        for key in ("itc", "itm", "loss"):
            mean = local[key].clone()
            dist.all_reduce(mean)
            loss_diff = max(loss_diff, abs(mean.item() / world - full[key].item()))
        grad_diff = 0.0
        assert local_grads.keys() == full_grads.keys(), set(local_grads) ^ set(full_grads)
        for key, grad in local_grads.items():
            dist.all_reduce(grad)
            grad_diff = max(grad_diff, (grad / world - full_grads[key]).abs().max().item())
        weights_diff = max((local_seen[k] - full_seen[k][mine]).abs().max().item() for k in ("w_i2t", "w_t2i"))
        assert local_seen["w_i2t"].shape == (b, n) and local_seen["offset"] == rank * b
        suffix = "_full_gradient" if full_gradient else ""
        result.update({f"max_loss_diff{suffix}": loss_diff, f"max_grad_diff{suffix}": grad_diff,
                       f"max_weights_diff{suffix}": weights_diff})
    result["itc_full"] = full["itc"].item()
    # what a process would get from its own rows alone
    alone, _, _ = run(mine, gather=False, cfg=PretrainQFormerConfig(embed_dim=16, itg_weight=0.0, itm_weight=0.0))
    alone_itc = alone["itc"].clone()
    dist.all_reduce(alone_itc)
    # the drawn negatives (no replacement): global indices, never a row of the same caption
    del stage1.hard_negatives
    drawn = {}
    real = stage1.hard_negatives

    def recording(w_i2t, w_t2i, generator, offset):
        drawn["neg"] = real(w_i2t, w_t2i, generator, offset)
        return drawn["neg"]

    stage1.hard_negatives = recording
    stage1.losses(stage1.image_embeds(pixels[mine]), idx[mine], ids[mine], mask[mine], cfg,
                  torch.Generator().manual_seed(rank))
    picked = torch.cat(drawn["neg"])
    assert ((picked >= 0) & (picked < n)).all()
    assert not (idx[drawn["neg"][0]] == idx[mine]).any() and not (idx[drawn["neg"][1]] == idx[mine]).any()
    result["local_itc_diff"] = abs(alone_itc.item() / world - full["itc"].item())
    if rank == 0:
        out.write_text(json.dumps(result, indent=2))
        print(result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
