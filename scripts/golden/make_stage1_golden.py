"""Reference values for stage 1 (`pretrain_qformer`): BLIP-2's ITC, ITM and ITG losses
computed by LAVIS's own `Blip2Qformer.forward` on a tiny model.

Two steps, in two environments:

1. ``inputs`` (the project's venv): a tiny `Stage1` (the `tiny` preset's Q-Former with the
   pre-training heads, seeded, `ln_vision` and the LM bias perturbed so that they matter),
   a batch of 6 images (as the frozen image encoder's output before its final LayerNorm,
   i.e. what BLIP-2's `ln_vision` reads) and two sets of captions:
   ``distinct`` (6 different captions: LAVIS's pre-training branch, hard targets) and
   ``shared`` (captions 0 0 1 2 2 3, passed to LAVIS as `image_id`: its branch with soft
   targets over rows of the same id, which is ours for rows of the same caption).
   Writes ``weights.safetensors`` and ``inputs.safetensors``, plus ``model.json``.
2. ``reference`` (the LAVIS environment, see README.md): builds LAVIS's `Blip2Qformer`
   around those weights without running its constructor (which would load EVA-CLIP and
   bert-base-uncased from the hub): `Qformer` is LAVIS's `BertLMHeadModel` from a tiny
   `BertConfig`, `ln_vision` LAVIS's LayerNorm, the image encoder an identity (its output
   is the stored input), the tokenizer a stub returning the stored ids and mask. Then it
   calls `Blip2Qformer.forward` unchanged in a one-process gloo group (it calls
   `dist.get_rank()`), records the ITM negatives its `torch.multinomial` calls draw,
   back-propagates the total loss and writes ``golden.json`` (losses, negatives,
   versions) and ``grads.safetensors`` (gradients under our parameter names).

   `Blip2Qformer` is LAVIS's current one (`--blip2-qformer`, the file
   lavis/models/blip2_models/blip2_qformer.py of a LAVIS checkout, executed against the
   installed package): the PyPI release 1.0.2 predates its `image_id` branch (soft ITC
   targets over rows of the same id, those rows masked as ITM negatives). As a cross-check
   the ``distinct`` case also runs through the installed 1.0.2 class, replaying the same
   negatives (1.0.2 draws them from other weights: softmax + 1e-4, diagonal zeroed); its
   losses must agree.

Run from the repository root:

    .venv/bin/python scripts/golden/make_stage1_golden.py inputs
    git --git-dir=LAVIS.git show 506965b9:lavis/models/blip2_models/blip2_qformer.py > /tmp/blip2_qformer.py
    /work/lavisenv/bin/python scripts/golden/make_stage1_golden.py reference --blip2-qformer /tmp/blip2_qformer.py

tests/test_pretrain_qformer.py::test_losses_match_lavis_blip2_qformer loads the same inputs,
gives our `Stage1.losses` the negatives LAVIS drew, and compares losses and gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "golden_stage1"
EMBED_DIM = 16
MAX_LENGTH = 12
CAPTIONS = ("a red dog", "a blue cat with a hat", "the green toy on a box", "a black cup",
            "an orange ball in the bowl", "a white lamp")
CASES = {"distinct": [0, 1, 2, 3, 4, 5], "shared": [0, 0, 1, 2, 2, 3]}
SEED = 0


def _single_threaded():
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# ------------------------------------------------------------------ step 1: inputs
def make_inputs(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    from components.model.tiny.blip_diffusion import build_tiny
    from components.training.qformer_objectives import Stage1

    _single_threaded()
    model = build_tiny(SEED)
    tokenizer = model.qformer_tokenizer
    stage1 = Stage1(model.qformer, EMBED_DIM, tokenizer.bos_token_id).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        stage1.ln_vision.weight.copy_(1.0 + 0.2 * torch.randn(stage1.ln_vision.weight.shape, generator=g))
        stage1.ln_vision.bias.copy_(0.2 * torch.randn(stage1.ln_vision.bias.shape, generator=g))
        stage1.lm_bias.copy_(0.1 * torch.randn(stage1.lm_bias.shape, generator=g))
        pixels = torch.randn(len(CAPTIONS), 3, 32, 32, generator=g)
        body = stage1.image_body(pixels)
    tensors = {"image_body": body.contiguous()}
    for case, rows in CASES.items():
        texts = [CAPTIONS[i] for i in rows]
        tok = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        tensors[f"{case}/ids"] = tok.input_ids.contiguous()
        tensors[f"{case}/mask"] = tok.attention_mask.contiguous()
        tensors[f"{case}/text_idx"] = torch.tensor(rows)
    weights = {k: v.contiguous() for k, v in stage1.state_dict().items()
               if not k.startswith(("qformer.visual_encoder.", "qformer.proj_layer."))}
    weights.update({f"qformer.visual_encoder.post_layernorm.{p}": getattr(stage1.ln_vision, p).detach().clone()
                    for p in ("weight", "bias")})
    qcfg = model.qformer.config.qformer_config
    info = {
        "embed_dim": EMBED_DIM, "max_length": MAX_LENGTH, "captions": list(CAPTIONS), "cases": CASES,
        "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "num_query_tokens": stage1.num_query,
        "vision": {"hidden_size": model.qformer.config.vision_config.hidden_size,
                   "layer_norm_eps": stage1.ln_vision.eps},
        "qformer": {k: getattr(qcfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "cross_attention_frequency",
            "encoder_hidden_size", "pad_token_id")},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "weights.safetensors")
    save_file(tensors, out / "inputs.safetensors")
    (out / "model.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}/weights.safetensors, inputs.safetensors, model.json")


# --------------------------------------------------------------- step 2: reference
def to_lavis_key(key: str) -> str:
    """Our Stage1 parameter name -> the name in LAVIS's Blip2Qformer."""
    if key == "qformer.query_tokens":
        return "query_tokens"
    if key.startswith("qformer.visual_encoder.post_layernorm."):
        return "ln_vision." + key.rsplit(".", 1)[1]
    if key.startswith("qformer.embeddings."):
        return "Qformer.bert." + key[len("qformer."):]
    if key.startswith("qformer.encoder."):
        key = key.replace(".attention.attention.", ".attention.self.")
        key = key.replace(".crossattention.attention.", ".crossattention.self.")
        return "Qformer.bert." + key[len("qformer."):]
    if key.startswith("lm_transform.0."):
        return "Qformer.cls.predictions.transform.dense." + key.rsplit(".", 1)[1]
    if key.startswith("lm_transform.2."):
        return "Qformer.cls.predictions.transform.LayerNorm." + key.rsplit(".", 1)[1]
    if key == "lm_bias":
        return "Qformer.cls.predictions.bias"
    if key.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "temp"):
        return key
    raise KeyError(key)


class _Tokens:
    def __init__(self, ids, mask):
        self.input_ids, self.attention_mask = ids, mask

    def to(self, device):
        return _Tokens(self.input_ids.to(device), self.attention_mask.to(device))


class _FixedTokenizer:
    """Stands in for BLIP-2's BertTokenizer: returns the stored ids of the batch."""

    def __init__(self, ids, mask, bos_token_id, pad_token_id):
        self.ids, self.mask = ids, mask
        self.bos_token_id, self.pad_token_id = bos_token_id, pad_token_id

    def __call__(self, text, padding, truncation, max_length, return_tensors):
        assert len(text) == len(self.ids) and padding == "max_length" and max_length == self.ids.shape[1]
        return _Tokens(self.ids.clone(), self.mask.clone())


def load_blip2_qformer(path: Path | None):
    """LAVIS's Blip2Qformer class: the installed one, or the one in `path` (a
    blip2_qformer.py of LAVIS), imported against the installed package."""
    if path is None:
        from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

        return Blip2Qformer
    import importlib.util

    from lavis.common.registry import registry

    spec = importlib.util.spec_from_file_location("lavis_head_blip2_qformer", path)
    module = importlib.util.module_from_spec(spec)
    register = registry.register_model
    registry.register_model = lambda name: (lambda model_cls: model_cls)  # its names are taken
    try:
        spec.loader.exec_module(module)
    finally:
        registry.register_model = register
    return module.Blip2Qformer


def build_lavis(Blip2Qformer, info: dict, weights: dict):
    import torch
    from lavis.models.blip2_models.blip2 import LayerNorm
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
    from torch import nn

    q = info["qformer"]
    config = BertConfig(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"],
                        num_hidden_layers=q["num_hidden_layers"], num_attention_heads=q["num_attention_heads"],
                        intermediate_size=q["intermediate_size"], hidden_act=q["hidden_act"],
                        max_position_embeddings=q["max_position_embeddings"], layer_norm_eps=q["layer_norm_eps"],
                        pad_token_id=q["pad_token_id"])
    # as Blip2Base.init_Qformer sets them
    config.encoder_width = q["encoder_hidden_size"]
    config.add_cross_attention = True
    config.cross_attention_freq = q["cross_attention_frequency"]
    config.query_length = info["num_query_tokens"]

    model = Blip2Qformer.__new__(Blip2Qformer)
    nn.Module.__init__(model)
    model.visual_encoder = nn.Identity()  # its output is the stored `image_body`
    model.ln_vision = LayerNorm(info["vision"]["hidden_size"], eps=info["vision"]["layer_norm_eps"])
    model.Qformer = BertLMHeadModel(config)
    model.query_tokens = nn.Parameter(torch.zeros(1, info["num_query_tokens"], q["hidden_size"]))
    model.vision_proj = nn.Linear(q["hidden_size"], info["embed_dim"])
    model.text_proj = nn.Linear(q["hidden_size"], info["embed_dim"])
    model.itm_head = nn.Linear(q["hidden_size"], 2)
    model.temp = nn.Parameter(0.07 * torch.ones([]))
    model.max_txt_len = info["max_length"]

    state = {to_lavis_key(k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids: a buffer; the decoder's weight and bias are tied to the word embeddings and the bias
    assert set(missing) <= {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
                            "Qformer.cls.predictions.decoder.bias"}, missing
    assert not unexpected, unexpected
    assert model.Qformer.cls.predictions.decoder.weight is model.Qformer.bert.embeddings.word_embeddings.weight
    assert model.Qformer.cls.predictions.decoder.bias is model.Qformer.cls.predictions.bias
    return model.eval()


def run_lavis(Blip2Qformer, info: dict, weights: dict, inputs: dict, case: str, replay: list[int] | None = None):
    """LAVIS's forward on one case, then backward: (output, negatives drawn, model)."""
    import torch

    model = build_lavis(Blip2Qformer, info, weights)
    ids, mask = inputs[f"{case}/ids"], inputs[f"{case}/mask"]
    model.tokenizer = _FixedTokenizer(ids, mask, info["bos_token_id"], info["pad_token_id"])
    samples = {"image": inputs["image_body"].clone(), "text_input": [""] * len(ids)}
    if case == "shared":
        samples["image_id"] = inputs[f"{case}/text_idx"].clone()
    drawn: list[int] = []
    multinomial = torch.multinomial

    def recording(weights_row, n, *args, **kwargs):
        if replay is not None:
            idx = torch.tensor([replay[len(drawn)]])
        else:
            idx = multinomial(weights_row, n, *args, **kwargs)
        drawn.append(int(idx.item()))
        return idx

    torch.manual_seed(SEED)
    torch.multinomial = recording
    try:
        output = model(samples)
    finally:
        torch.multinomial = multinomial
    output.loss.backward()
    assert len(drawn) == 2 * len(ids)
    return output, drawn, model


def make_reference(out: Path, blip2_qformer: Path | None) -> None:
    import hashlib

    import lavis
    import torch
    import torch.distributed as dist
    import transformers
    from safetensors.torch import load_file, save_file

    _single_threaded()
    info = json.loads((out / "model.json").read_text())
    weights = load_file(out / "weights.safetensors")
    inputs = load_file(out / "inputs.safetensors")
    current, released = load_blip2_qformer(blip2_qformer), load_blip2_qformer(None)
    source = blip2_qformer.read_bytes() if blip2_qformer else None
    golden: dict = {"cases": {}, "reference": {
        "blip2_qformer.py": "installed" if source is None else hashlib.sha256(source).hexdigest(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "salesforce-lavis": getattr(lavis, "__version__", "1.0.2"), "python": sys.version.split()[0]}}
    grads = {}
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            for case in info["cases"]:
                output, drawn, model = run_lavis(current, info, weights, inputs, case)
                bs = len(drawn) // 2
                golden["cases"][case] = {
                    "itc": output.loss_itc.item(), "itm": output.loss_itm.item(), "itg": output.loss_lm.item(),
                    "loss": output.loss.item(),
                    # LAVIS draws an image for each text first, then a text for each image
                    "neg_image": drawn[:bs], "neg_text": drawn[bs:],
                }
                if case == "shared":  # no positive drawn as a negative
                    idx = inputs[f"{case}/text_idx"]
                    assert not (idx[torch.tensor(drawn[:bs])] == idx).any()
                    assert not (idx[torch.tensor(drawn[bs:])] == idx).any()
                params = dict(model.named_parameters())
                for key in weights:
                    grad = params[to_lavis_key(key)].grad
                    if grad is not None:
                        grads[f"{case}/{key}"] = grad.detach().contiguous()
                print(case, golden["cases"][case])
            # the released package on the case both handle, with the same negatives
            output, drawn, _ = run_lavis(released, info, weights, inputs, "distinct",
                                         golden["cases"]["distinct"]["neg_image"]
                                         + golden["cases"]["distinct"]["neg_text"])
            for name, value in (("itc", output.loss_itc), ("itm", output.loss_itm), ("itg", output.loss_lm)):
                assert abs(value.item() - golden["cases"]["distinct"][name]) < 1e-6, (name, value)
            print("the installed release gives the same losses on the distinct case")
        finally:
            dist.destroy_process_group()
    save_file(grads, out / "grads.safetensors")
    (out / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {out}/golden.json, grads.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["inputs", "reference"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--blip2-qformer", type=Path, default=None,
                        help="reference step: LAVIS's blip2_qformer.py to use (default: the installed one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.step == "inputs":
        make_inputs(args.out)
    else:
        make_reference(args.out, args.blip2_qformer)


if __name__ == "__main__":
    main()
