"""Stage pretrain_qformer: the three BLIP-2 objectives, their masks, resume, bad input, and
that it learns (held-out image-to-text retrieval well above chance)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.core import paths
from components.core.config import Params, PretrainQFormerConfig
from components.core.errors import BlipDiffError
from components.data.manifests import SUBJECTS_SCHEMA, read_manifest, write_parquet
from components.model.layout import load_qformer
from components.model.tiny.blip_diffusion import build_tiny
from components.stages import ingest, pretrain_qformer, train_subject
from components.training import qformer_objectives
from components.training.data import CLASS_TEMPLATES, row_captions
from components.training.faults import STOP_AFTER_ENV
from tests.helpers.fast_params import SMALL_INGEST

GOLDEN_STAGE1 = Path(__file__).parent / "fixtures" / "golden_stage1"
SMALL = SMALL_INGEST


def _params(ingest_cfg=SMALL, **stage) -> Params:
    base = {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2, "base": None}
    return Params(ingest=ingest_cfg, pretrain_qformer={**base, **stage})


@pytest.fixture(scope="module")
def subjects_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    ingest.ingest_subjects(_params().ingest, root)
    return root


def _copy(src, dst):
    shutil.copytree(src / "data", dst / "data")
    return dst


def _stage1(seed=0):
    model = build_tiny(seed)
    return qformer_objectives.Stage1(model.qformer, 16, model.qformer_tokenizer.bos_token_id).eval(), model


def test_itg_mask_is_causal_and_queries_never_see_the_text():
    stage1, model = _stage1()
    torch.manual_seed(0)
    embeds = stage1.image_embeds(torch.randn(1, 3, 32, 32))
    tok = model.qformer_tokenizer(["a red toy with dots", "a red toy with zzzz"], return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    first = ids.shape[1] - 5  # the texts differ from here on
    assert (ids[0, :first] == ids[1, :first]).all() and (ids[0, first:-1] != ids[1, first:-1]).any()
    ones = torch.ones(2, stage1.num_query, dtype=torch.bool)
    nq, length = stage1.num_query, ids.shape[1]
    rows, cols = torch.arange(nq + length)[:, None], torch.arange(nq + length)[None]
    allowed = ((cols < nq) | ((rows >= nq) & (cols <= rows)))[None] & torch.cat([ones, mask.bool()], 1)[:, None]
    out = stage1._joint(ids, embeds.expand(2, -1, -1), allowed)
    # Queries: identical for both texts. Text positions before the change: identical too.
    torch.testing.assert_close(out[0, :nq], out[1, :nq])
    torch.testing.assert_close(out[0, nq : nq + first], out[1, nq : nq + first])
    assert not torch.allclose(out[0, nq + first :], out[1, nq + first :])
    # ITM's bidirectional mask lets the queries read the text.
    itm = stage1.itm_logits(ids, mask, embeds.expand(2, -1, -1))
    assert not torch.allclose(itm[0], itm[1])


def test_itc_text_features_ignore_padding_and_depend_on_the_text():
    stage1, model = _stage1()
    short = model.qformer_tokenizer(["a blue ball"], return_tensors="pt")
    padded = model.qformer_tokenizer(["a blue ball"], padding="max_length", max_length=30, return_tensors="pt")
    other = model.qformer_tokenizer(["a green vase"], return_tensors="pt")
    a = stage1.text_features(short.input_ids, short.attention_mask)
    torch.testing.assert_close(a, stage1.text_features(padded.input_ids, padded.attention_mask), atol=1e-5, rtol=0)
    assert not torch.allclose(a, stage1.text_features(other.input_ids, other.attention_mask))


def test_hard_negatives_never_share_the_text():
    g = torch.Generator().manual_seed(0)
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).bool()
    weights = torch.softmax(torch.randn(4, 4), 1).masked_fill(same, 0)
    for _ in range(50):
        neg = qformer_objectives._draw_negatives(weights, g)
        assert not same[torch.arange(4), neg].any()
    # A batch where one row has no negative at all still draws one (another row).
    lonely = torch.zeros(3, 3)
    assert (qformer_objectives._draw_negatives(lonely, g) != torch.arange(3)).all()


def _golden_stage1():
    """The tiny Stage1 and inputs of tests/fixtures/golden_stage1 (scripts/golden/make_stage1_golden.py)."""
    info = json.loads((GOLDEN_STAGE1 / "model.json").read_text())
    model = build_tiny(0)
    stage1 = qformer_objectives.Stage1(model.qformer, info["embed_dim"], info["bos_token_id"]).eval()
    missing, unexpected = stage1.load_state_dict(load_file(GOLDEN_STAGE1 / "weights.safetensors"), strict=False)
    assert not unexpected
    # everything the losses use is in the fixture: only the frozen image encoder's body and stage 2's projection are not
    assert all(k.startswith(("qformer.visual_encoder.", "qformer.proj_layer.")) for k in missing)
    assert not [k for k in missing if "post_layernorm" in k]
    return stage1, info, load_file(GOLDEN_STAGE1 / "inputs.safetensors")


def _golden_losses(stage1, inputs, case, negatives, **cfg):
    """Our losses on a fixture case, with the ITM negatives the reference drew."""
    stage1.hard_negatives = lambda w_i2t, w_t2i, generator, offset: (
        torch.tensor(negatives["neg_text"]), torch.tensor(negatives["neg_image"]))
    stage1.zero_grad()
    embeds = stage1.ln_vision(inputs["image_body"])
    config = PretrainQFormerConfig(embed_dim=stage1.vision_proj.out_features, **cfg)
    return stage1.losses(embeds, inputs[f"{case}/text_idx"], inputs[f"{case}/ids"], inputs[f"{case}/mask"],
                         config, None)


@pytest.mark.parametrize("case", ["distinct", "shared"])
def test_losses_match_lavis_blip2_qformer(case):
    """ITC, ITM and ITG and their gradients equal LAVIS's `Blip2Qformer.forward` (BLIP-2
    stage 1) on the same weights, inputs and ITM negatives. `distinct`: six captions;
    `shared`: captions 0 0 1 2 2 3 (LAVIS's branch with `image_id`: soft ITC targets)."""
    stage1, _, inputs = _golden_stage1()
    golden = json.loads((GOLDEN_STAGE1 / "golden.json").read_text())["cases"][case]
    grads = {k.split("/", 1)[1]: v for k, v in load_file(GOLDEN_STAGE1 / "grads.safetensors").items()
             if k.startswith(f"{case}/")}
    losses = _golden_losses(stage1, inputs, case, golden)
    for name in ("itc", "itm", "itg", "loss"):
        assert abs(losses[name].item() - golden[name]) < 1e-5, (name, losses[name].item(), golden[name])
    losses["loss"].backward()
    params = dict(stage1.named_parameters())
    assert {"temp", "qformer.query_tokens", "qformer.visual_encoder.post_layernorm.weight"} <= grads.keys()
    for key, ref in grads.items():
        torch.testing.assert_close(params[key].grad, ref, atol=1e-5, rtol=1e-4, msg=key)
    # The fixture tells: without BLIP-2's label smoothing, ITC is another number; with the
    # gradient through both sides' features, the gradients differ.
    plain = _golden_losses(stage1, inputs, case, golden, itc_label_smoothing=0.0)
    assert abs(plain["itc"].item() - golden["itc"]) > 1e-3
    _golden_losses(stage1, inputs, case, golden, itc_full_gradient=True)["loss"].backward()
    assert (params["text_proj.weight"].grad - grads["text_proj.weight"]).abs().max() > 1e-2


def test_itc_label_smoothing_mixes_a_uniform_target():
    """ITC with smoothing e: cross-entropy against target * (1 - e) + e / N, N the batch;
    rows of the same caption share the target; e = 0 is the plain contrastive loss."""
    stage1, _, inputs = _golden_stage1()
    golden = json.loads((GOLDEN_STAGE1 / "golden.json").read_text())["cases"]["shared"]
    idx = inputs["shared/text_idx"]
    with torch.no_grad():
        embeds = stage1.ln_vision(inputs["image_body"])
        sim = stage1.similarity(stage1.image_features(embeds),
                                stage1.text_features(inputs["shared/ids"], inputs["shared/mask"])) / stage1.temp
        same = (idx[:, None] == idx[None]).float()
        for e in (0.0, 0.1, 0.3):
            target = same / same.sum(1, keepdim=True) * (1 - e) + e / len(idx)
            by_hand = -0.5 * ((target * sim.log_softmax(1)).sum(1).mean() + (target * sim.t().log_softmax(1)).sum(1).mean())
            ours = _golden_losses(stage1, inputs, "shared", golden, itc_label_smoothing=e)["itc"]
            torch.testing.assert_close(ours, by_hand, atol=1e-6, rtol=0)
    assert PretrainQFormerConfig().itc_label_smoothing == 0.1 == Params().pretrain_qformer.itc_label_smoothing


def test_ln_vision_is_the_only_trained_part_of_the_image_encoder():
    """BLIP-2's ln_vision is the image encoder's final LayerNorm: the Q-Former reads
    `visual_encoder(pixels)`, gradients reach that LayerNorm and nothing before it."""
    stage1, model = _stage1()
    stage1.qformer.visual_encoder.requires_grad_(False)
    stage1.ln_vision.requires_grad_(True)
    pixels = torch.randn(2, 3, 32, 32)
    embeds = stage1.image_embeds(pixels)
    torch.testing.assert_close(embeds, stage1.qformer.visual_encoder(pixels))
    assert stage1.image_body(pixels).grad_fn is None  # the body runs without a graph
    stage1.image_features(embeds).sum().backward()
    assert stage1.ln_vision.weight.grad is not None and stage1.ln_vision.weight.grad.abs().sum() > 0
    trainable = {n for n, p in stage1.qformer.visual_encoder.named_parameters() if p.requires_grad}
    assert trainable == {"post_layernorm.weight", "post_layernorm.bias"}


@pytest.mark.slow
def test_two_processes_see_the_global_batch(tmp_path):
    """Under `accelerate launch` with 2 processes (gloo), each holding half of a batch of 8:
    ITC softmaxes over all 8, the same-caption positives and ITM negatives are global, and
    the losses and gradients averaged over the processes equal one process's on all 8
    (tests/helpers/dist_itc_check.py asserts it and writes what it measured)."""
    from tests.helpers.launch import launch_two

    out = tmp_path / "dist.json"
    launch_two([str(Path(__file__).parent / "helpers" / "dist_itc_check.py"), str(out)], Path(__file__).parents[1],
               "ITC check")
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["global_batch"] == 8
    for suffix in ("", "_full_gradient"):  # BLIP-2's ITC gradient, and through both sides
        assert result[f"max_loss_diff{suffix}"] < 1e-5 and result[f"max_grad_diff{suffix}"] < 1e-5, result
        assert result[f"max_weights_diff{suffix}"] < 1e-6, result
    # the local-only loss (each process's 4 rows on their own) is another number
    assert result["local_itc_diff"] > 1e-3, result


def test_resumed_run_ends_with_the_same_weights_and_folder_loads(subjects_root, tmp_path, monkeypatch):
    a = _copy(subjects_root, tmp_path / "a")
    metrics, _ = pretrain_qformer.run(_params(), a)
    assert {"itc_r1", "itc_r1_chance", "fixed_batch_loss_start", "fixed_batch_itm_end"} <= metrics.keys()
    b = _copy(subjects_root, tmp_path / "b")
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(BlipDiffError, match="stopped after step 2"):
        pretrain_qformer.run(_params(), b)
    assert not (b / paths.QFORMER_DIR).exists()
    monkeypatch.delenv(STOP_AFTER_ENV)
    pretrain_qformer.run(_params(), b, resume="latest")
    folder_a, folder_b = a / paths.QFORMER_DIR, b / paths.QFORMER_DIR
    wa, wb = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    curve = paths.curve_file("pretrain_qformer")
    assert (a / curve).read_bytes() == (b / curve).read_bytes()
    assert (a / curve).read_text().splitlines()[0] == "step,itc,itm,itg,loss,lr"
    heads = load_file(folder_a / pretrain_qformer.HEADS_FILE)
    assert {"temp", "itm_head.weight", "vision_proj.weight", "text_proj.weight", "lm_bias"} <= heads.keys()

    # The subject encoder loads the folder, and its weights are the trained ones.
    qformer = load_qformer(folder_a)
    untrained = build_tiny(0).qformer.state_dict()
    trained = qformer.state_dict()
    assert not torch.equal(trained["query_tokens"], untrained["query_tokens"])
    torch.testing.assert_close(trained["visual_encoder.embeddings.patch_embedding.weight"],
                               untrained["visual_encoder.embeddings.patch_embedding.weight"])  # frozen
    # but for its final LayerNorm, BLIP-2's ln_vision, trained in this stage and saved with the Q-Former
    assert not torch.equal(trained["visual_encoder.post_layernorm.weight"], untrained["visual_encoder.post_layernorm.weight"])

    with pytest.raises(BlipDiffError, match="other pretrain_qformer/preset params"):
        pretrain_qformer.run(_params(learning_rate=1e-4), b, resume="latest")


def test_train_subject_starts_from_the_pretrained_qformer(subjects_root, tmp_path):
    from components.stages import context

    root = _copy(subjects_root, tmp_path / "chain")
    params = Params(ingest=SMALL, context={"backgrounds_per_image": 1, "matting_max_side": None},
                    pretrain_qformer={"steps": 2, "batch_size": 4, "log_every": 1, "base": None},
                    train_subject={"steps": 1, "batch_size": 2, "resolution": 16, "id_draws": 1, "log_every": 1,
                                   "base": None,
                                   "train_qformer": False})
    context.run(params, root)
    with pytest.raises(BlipDiffError, match="no pre-trained Q-Former here"):
        train_subject.run(params, root)
    pretrain_qformer.run(params, root)
    train_subject.run(params, root)
    pre = load_file(root / paths.QFORMER_DIR / "model.safetensors")
    after = load_file(root / paths.BLIP_DIFFUSION_DIR / "qformer" / "model.safetensors")
    assert all(torch.equal(pre[k], after[k]) for k in pre)  # frozen in stage 2 here: carried over unchanged

    # A Q-Former of another architecture is refused with a clear message.
    from transformers import Blip2Config

    from components.model.qformer import BlipDiffusionQFormer

    config = Blip2Config.from_pretrained(root / paths.QFORMER_DIR)
    config.qformer_config.intermediate_size = 48
    BlipDiffusionQFormer(config).save_pretrained(root / "other_qformer")
    with pytest.raises(BlipDiffError, match="does not fit the preset's architecture"):
        train_subject.run(Params(**{**params.model_dump(), "train_subject": {
            **params.train_subject.model_dump(), "qformer": "other_qformer"}}), root)


def test_bad_inputs(subjects_root, tmp_path):
    with pytest.raises(BlipDiffError, match="manifest not found"):
        pretrain_qformer.run(_params(), tmp_path)
    root = _copy(subjects_root, tmp_path / "bad")
    frame = read_manifest(root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    (root / frame["image_path"].iloc[0]).unlink()
    with pytest.raises(BlipDiffError, match=r"is missing \(re-run `dvc repro ingest`\)"):
        pretrain_qformer.run(_params(), root)
    same = frame.iloc[1:].assign(caption="a thing").astype(object)
    rows = same.where(same.notna(), None).to_dict("records")
    write_parquet(rows, root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    with pytest.raises(BlipDiffError, match="need at least two different ones"):
        pretrain_qformer.run(_params(), root)
    write_parquet([], root / paths.SUBJECTS_MANIFEST, SUBJECTS_SCHEMA)
    with pytest.raises(BlipDiffError, match="no images in the train split"):
        pretrain_qformer.run(_params(), root)
    assert not (root / paths.QFORMER_DIR).exists()


def test_captions_from_the_manifest_else_class_templates():
    assert row_captions("a red star-shaped toy with dots", "toy") == ["a red star-shaped toy with dots"]
    texts = row_captions(None, "dog")
    assert texts[0] == "a photo of a dog" and len(texts) == len(CLASS_TEMPLATES)


@pytest.mark.slow
def test_learns_held_out_retrieval_far_above_chance(tmp_path):
    """14 synthetic subjects, 2 held-out views each (28 images, 14 captions, chance 1/14).

    Bound: R@1 >= 3x chance, i.e. at least 6 of 28 right. A random ranker gets that with
    probability ~1.3% (binomial, p = 1/14), so passing is evidence of learning; the
    measured value is reported in metrics/pretrain_qformer.json, not asserted.
    """
    cfg = {"test_views_per_subject": 2,
           "synthetic": {"num_subjects": 14, "min_views": 6, "max_views": 6, "image_size": 64}}
    ingest.ingest_subjects(_params(cfg).ingest, tmp_path)
    metrics, _ = pretrain_qformer.run(_params(cfg, steps=600, warmup_steps=50, log_every=50,
                                              checkpoint_every=1000, batch_size=32), tmp_path)
    assert metrics["itc_images"] == 28 and metrics["itc_captions"] == 14
    assert metrics["itc_r1"] >= 3 * metrics["itc_r1_chance"], metrics
    # overfit: the loss on a fixed batch falls well below its start
    assert metrics["fixed_batch_loss_end"] < 0.5 * metrics["fixed_batch_loss_start"], metrics
