"""The loss options (class weights, avg_non_ignore, sigmoid BCE, naive Dice, per-sample weights,
one-channel binary segmentation) against the real mmseg 1.2.2: values and logit gradients of its
loss modules and of its decode head's `loss_by_feat`, computed by
`experiments/make_loss_fixtures.py` into `tests/data/mmseg_loss_options.npz`; their config
fields; the binary model's inference and evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import losses

FIXTURE = Path(__file__).parent / "data" / "mmseg_loss_options.npz"
F32_EPS = float(np.finfo(np.float32).eps)


def _load():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["meta"]))
    cases, offset = {}, 0
    for i, (name, m) in enumerate(meta["cases"].items()):
        shape = data[m["logits"]].shape
        size = int(np.prod(shape))
        grad = data["grads"][offset:offset + size].reshape(shape)
        offset += size
        cases[name] = dict(m, value=float(data["values"][i]), grad=grad,
                           value_err=float(data["value_errs"][i]),
                           grad_err=float(data["grad_errs"][i]))
    return data, cases


DATA, CASES = _load()


def ours(case: dict):
    """Our loss of `case` as a function of NHWC float32 logits."""
    opts = dict(case["opts"])
    labels = jnp.asarray(DATA[case["labels"]], jnp.int32)
    weight = jnp.asarray(DATA["sample_weight"], jnp.float32) if case["weighted"] else None
    kind = case["kind"]
    if kind == "head":
        cfg = _loss_cfg(**{**opts["ours"], "class_weight": tuple(opts["ours"].get(
            "class_weight", ()))})
        return lambda x: losses.segmentation_loss(x, None, labels, cfg)[0]
    if kind in ("ce", "torch_ce"):
        return lambda x: losses.cross_entropy(x, labels, weight=weight, **opts)
    if kind == "bce":
        pos = opts.pop("class_weight", None)
        return lambda x: losses.binary_cross_entropy(x, labels, pos_weight=pos, weight=weight,
                                                     **opts)
    return lambda x: losses.dice_loss_v1(x, labels, weight=weight, **opts)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_mmseg(name):
    """Value and gradient within 4x the reference's own float32 error (at least float32's
    rounding of the result): two float32 computations of one quantity, each within the
    reference's error of the exact value, in different orders of operations."""
    case = CASES[name]
    logits = jnp.asarray(DATA[case["logits"]], jnp.float32)
    value, grad = jax.value_and_grad(ours(case))(logits)
    ref_grad = case["grad"].astype(np.float64)
    value_tol = 4 * max(case["value_err"], F32_EPS * abs(case["value"]))
    grad_tol = 4 * max(case["grad_err"], F32_EPS * float(np.max(np.abs(ref_grad))))
    assert abs(float(value) - case["value"]) <= value_tol, (float(value), case["value"])
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, rtol=0, atol=grad_tol)


def test_fixture_covers_every_option():
    """The fixture exercises each option against mmseg (a regenerated file must keep them)."""
    opts = {(c["kind"], k) for c in CASES.values() for k in c["opts"]}
    assert {("ce", "class_weight"), ("ce", "avg_non_ignore"), ("bce", "class_weight"),
            ("bce", "avg_non_ignore"), ("dice", "naive_dice")} <= opts
    assert {c["logits"] for c in CASES.values() if c["kind"] == "head"} == {
        "logits3_half", "logits1_half"}
    weighted = {c["kind"] for c in CASES.values() if c["weighted"]}
    assert weighted == {"ce", "bce", "dice"}
    one_channel = {c["kind"] for c in CASES.values() if c["logits"].startswith("logits1")}
    assert one_channel == {"bce", "dice", "head"}


def test_binary_dice_foreground_target():
    """`binary_target="foreground"` on one channel is V-Net's Dice of the sigmoid against
    label == 1 (written out here), not mmseg's background target."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 5, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, (2, 4, 5)), jnp.int32)
    fg = losses.dice_loss_v1(x, y, binary_target="foreground")
    p = jax.nn.sigmoid(x)[..., 0]
    t = (y == 1).astype(jnp.float32)
    a = jnp.sum(p * t, axis=(1, 2))
    b = jnp.sum(p * p, axis=(1, 2)) + 1e-3
    c = jnp.sum(t * t, axis=(1, 2)) + 1e-3
    expected = jnp.mean(1 - 2 * a / (b + c))
    np.testing.assert_allclose(float(fg), float(expected), rtol=4 * F32_EPS)
    assert abs(float(fg) - float(losses.dice_loss_v1(x, y))) > 1e-2


# ------------------------------------------------------------------------------ the config
def _config(overrides: dict):
    from conftest import tiny_config
    from unet_jax.config import check_config
    return check_config(tiny_config(overrides=overrides))


@pytest.mark.parametrize("overrides,match", [
    ({"model.out_channels": 3}, "model.out_channels: expected 0"),
    ({"loss.class_weight": (1.0,)}, "loss.class_weight: expected .* 2 values, one per class"),
    ({"loss.class_weight": (1.0, -1.0)}, "loss.class_weight"),
    ({"loss.class_weight": (0.0, 0.0)}, "loss.class_weight"),
    ({"loss.use_sigmoid": True, "loss.class_weight": (1.0, 2.0)},
     "loss.class_weight: expected \\(\\) with loss.use_sigmoid and one channel per class"),
    ({"model.out_channels": 1, "loss.class_weight": (1.0, 2.0)},
     "loss.class_weight: expected .*one value \\(the foreground's pos_weight\\)"),
    ({"loss.naive_dice": True}, "loss.naive_dice: expected False with loss.dice_form='legacy'"),
    ({"loss.dice_binary_target": "vessel"}, "loss.dice_binary_target: expected one of"),
    ({"eval.threshold": 1.0}, "eval.threshold"),
])
def test_config_refuses(overrides, match):
    from unet_jax.errors import ConfigError
    with pytest.raises(ConfigError, match=match):
        _config(overrides)


def test_config_accepts_the_options():
    c = _config({"loss.class_weight": (1.0, 4.0), "loss.avg_non_ignore": True,
                 "loss.naive_dice": True, "loss.dice_form": "v1", "loss.name": "ce_dice"})
    assert c.loss.class_weight == (1.0, 4.0)
    # one channel: sigmoid CE and the v1 Dice whatever use_sigmoid and dice_form say
    _config({"model.out_channels": 1, "loss.class_weight": (3.0,), "loss.naive_dice": True})
    _config({"model.out_channels": 2, "loss.use_sigmoid": True})


# ------------------------------------------------------------------------------ wiring
def _loss_cfg(**fields):
    from unet_jax import recipe
    cfg = recipe.unet_s5_d16("fcn", "ce_dice").loss
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize("channels,fields", [
    (3, dict(class_weight=(0.5, 1.0, 3.0), avg_non_ignore=True, dice_form="v1",
             naive_dice=True)),
    (3, dict(use_sigmoid=True, dice_form="v1")),
    (1, dict(class_weight=(2.5,), dice_binary_target="foreground")),
])
def test_segmentation_loss_composes_the_options(channels, fields):
    """Each term is the option's loss of the resized logits, weights and sample weights applied
    (decode: CE + Dice; aux: CE with the same options)."""
    rng = np.random.default_rng(1)
    dec = jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.float32)
    aux = jnp.asarray(rng.normal(size=(2, 4, 4, channels)), jnp.float32)
    labels = rng.integers(0, max(channels, 2), (2, 8, 8))
    labels[0, 0, :3] = 255
    labels = jnp.asarray(labels, jnp.int32)
    w = jnp.asarray([0.5, 2.0], jnp.float32)
    cfg = _loss_cfg(**fields)
    total, terms = losses.segmentation_loss(dec, aux, labels, cfg, sample_weight=w)
    aux_up = losses.resize_logits_to(aux, (8, 8))
    cw = tuple(cfg.class_weight) or None
    if channels == 1 or cfg.use_sigmoid:
        def ce(x):
            return losses.binary_cross_entropy(x, labels, avg_non_ignore=cfg.avg_non_ignore,
                                               pos_weight=cw, weight=w)
    else:
        def ce(x):
            return losses.cross_entropy(x, labels, avg_non_ignore=cfg.avg_non_ignore,
                                        class_weight=cw, weight=w)
    dice = losses.dice_loss_v1(dec, labels, naive_dice=cfg.naive_dice, weight=w,
                               binary_target=cfg.dice_binary_target)
    expected = {"decode.loss_ce": ce(dec), "aux.loss_ce": 0.4 * ce(aux_up),
                "decode.loss_dice": 3.0 * dice}
    for key, value in expected.items():
        np.testing.assert_allclose(float(terms[key]), float(value), rtol=8 * F32_EPS,
                                   err_msg=key)
    np.testing.assert_allclose(float(total), float(sum(expected.values())), rtol=8 * F32_EPS)


# ------------------------------------------------------------------------------ binary model
def _binary_config(**overrides):
    from conftest import tiny_config
    return tiny_config(overrides={"model.out_channels": 1, "eval.threshold": 0.4,
                                  **overrides})


@jax.jit
def _fake_apply(x: jax.Array) -> jax.Array:
    """A stand-in model: one logit per pixel from its normalised red and green values."""
    return x[..., :1] - 0.5 * x[..., 1:2]


def _samples():
    rng = np.random.default_rng(2)
    out = []
    for k, (h, w) in enumerate([(24, 40), (32, 32)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = (rng.random((h, w)) < 0.3).astype(np.uint8)
        label[0, :4] = 255
        out.append({"image": image, "label": label, "name": f"b{k}".encode(),
                    "fov": np.ones((h, w), np.uint8)})
    return out


def test_binary_model_has_one_output_channel():
    from unet_jax.models import build_model
    model = build_model(_binary_config().model)
    assert model.decode_head.conv_seg.kernel.shape[-1] == 1
    assert model.auxiliary_head.conv_seg.kernel.shape[-1] == 1


@pytest.mark.parametrize("tta", [False, True])
def test_binary_inference_and_evaluation_threshold_the_sigmoid(tta):
    """mmseg's postprocess_result / SegTTAModel for out_channels 1: label 1 where the sigmoid
    (TTA: the view-averaged sigmoid) exceeds the threshold; the metrics and the FOV metrics
    count that prediction."""
    from unet_jax import inference as inf
    from unet_jax.evaluate import evaluate
    config = _binary_config(**{"eval.tta": tta, "eval.tta_scales": (1.0, 0.5)})
    samples = _samples()
    preds = []
    for s in samples:
        scores, pred = inf.segment(_fake_apply, s["image"], config)
        scores = np.asarray(scores)
        assert scores.shape == (*s["image"].shape[:2], 1)
        fg = scores[..., 0] if tta else np.asarray(jax.nn.sigmoid(scores[..., 0]))
        assert 0.0 <= fg.min() and fg.max() <= 1.0
        np.testing.assert_array_equal(np.asarray(pred), (fg > 0.4).astype(np.int32))
        assert 0 < np.mean(np.asarray(pred)) < 1
        preds.append(np.asarray(pred))
    summary = evaluate(_fake_apply, samples, config, progress=False).summary
    tp = sum(int(np.sum((p == 1) & (s["label"] == 1))) for p, s in zip(preds, samples))
    fn = sum(int(np.sum((p == 0) & (s["label"] == 1))) for p, s in zip(preds, samples))
    assert summary["fov"]["Se"] == round(100 * tp / (tp + fn), 2)
    inter = tp
    union = sum(int(np.sum(((p == 1) | (s["label"] == 1)) & (s["label"] != 255)))
                for p, s in zip(preds, samples))
    assert summary["IoU"]["vessel"] == round(100 * inter / union, 2)


@pytest.mark.parametrize("tta", [False, True])
def test_binary_export_thresholds_the_sigmoid(tta):
    """The SavedModel's TensorFlow part labels a one-channel model's scores as
    `inference.labels_of` does (with a stand-in for the converted JAX pipeline)."""
    tf = pytest.importorskip("tensorflow")
    from unet_jax import inference as inf
    from unet_jax import serving
    config = _binary_config(**{"eval.tta": tta, "eval.tta_scales": (1.0, 0.5)})
    image = _samples()[0]["image"]

    def scores_fn(view, image, flip):
        return tf.cast(image[..., :1], tf.float32) / 64.0 - 2.0

    scores, labels = serving.segment(scores_fn, tf.constant(image), config)
    logits = image[..., :1].astype(np.float32) / 64.0 - 2.0
    expected_scores = np.asarray(jax.nn.sigmoid(logits)) if tta else logits
    # four views summed and divided: a few float32 roundings of values <= 1
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=0, atol=4 * F32_EPS)
    expected = inf.labels_of(jnp.asarray(expected_scores), probs=tta, threshold=0.4)
    np.testing.assert_array_equal(labels.numpy(), np.asarray(expected, np.uint8))
    assert labels.dtype == tf.uint8 and 0 < labels.numpy().mean() < 1
