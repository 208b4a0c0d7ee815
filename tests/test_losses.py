"""Losses against mmseg's recorded values (fixtures/mmseg/losses.npz) and hand compositions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unet_jax import losses as L
from unet_jax import recipe

RTOL = 1e-5  # README: float32 vs float64 of the same module <= 3.4e-7 abs


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture
def losses_npz(request):
    fixtures_dir = request.getfixturevalue("fixtures_dir")
    return dict(np.load(fixtures_dir / "losses.npz"))


@pytest.mark.parametrize("num_classes", [2, 19])
def test_losses_match_mmseg(losses_npz, num_classes):
    d = losses_npz
    logits = _nhwc(d[f"C{num_classes}_logits"])
    labels = jnp.asarray(d[f"C{num_classes}_labels"])
    got = {
        "ce": L.cross_entropy(logits, labels),
        "ce_avg_non_ignore": L.cross_entropy(logits, labels, avg_non_ignore=True),
        "dice": L.dice_loss_v1(logits, labels),
        "dice_w3": 3.0 * L.dice_loss_v1(logits, labels),
        "dice_legacy": L.dice_loss_legacy(logits, labels),
        "dice_legacy_w3": 3.0 * L.dice_loss_legacy(logits, labels),
    }
    for name, value in got.items():
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(float(value), float(d[f"C{num_classes}_{name}"]), rtol=RTOL,
                                   err_msg=f"C{num_classes}_{name}")
        np.testing.assert_allclose(float(value), float(d[f"C{num_classes}_{name}_f64"]), rtol=RTOL,
                                   err_msg=f"C{num_classes}_{name}_f64")
    per_pixel = L.cross_entropy_per_pixel(logits, labels)
    expected = d[f"C{num_classes}_ce_per_pixel"]
    np.testing.assert_allclose(np.asarray(per_pixel), expected, rtol=RTOL, atol=2e-6)
    ignored = np.asarray(labels) == 255
    assert ignored.any() and np.all(np.asarray(per_pixel)[ignored] == 0.0)


@pytest.mark.parametrize("num_classes", [2, 19])
def test_losses_float64_match_mmseg_float64(losses_npz, num_classes, x64):
    """float64 logits are reduced in float64 (the float64 reference model's losses)."""
    d = losses_npz
    logits = _nhwc(d[f"C{num_classes}_logits"].astype(np.float64))
    labels = jnp.asarray(d[f"C{num_classes}_labels"])
    got = {
        "ce": L.cross_entropy(logits, labels),
        "ce_avg_non_ignore": L.cross_entropy(logits, labels, avg_non_ignore=True),
        "dice": L.dice_loss_v1(logits, labels),
        "dice_legacy": L.dice_loss_legacy(logits, labels),
    }
    for name, value in got.items():
        assert value.dtype == jnp.float64
        # mmseg 1.2.2's dice casts the one-hot target with `.float()`, so its `sum(t*t) + eps`
        # term is float32 even for float64 logits: 1.6e-8 relative; the others are float64.
        rtol = 1e-7 if name == "dice" else 1e-12
        np.testing.assert_allclose(float(value), float(d[f"C{num_classes}_{name}_f64"]),
                                   rtol=rtol, err_msg=f"C{num_classes}_{name}_f64")


def test_auxhead_loss_and_accuracy(losses_npz):
    d = losses_npz
    aux = _nhwc(d["auxhead_logits"])
    labels = jnp.asarray(d["auxhead_labels"])
    up = L.resize_logits_to(aux, labels.shape[1:])
    assert up.shape == (2, 32, 40, 2)
    np.testing.assert_allclose(float(0.4 * L.cross_entropy(up, labels)),
                               float(d["auxhead_loss_ce"]), rtol=RTOL)
    np.testing.assert_allclose(float(L.pixel_accuracy(up, labels)),
                               float(d["auxhead_acc_seg"]), rtol=RTOL)
    # The same through segmentation_loss (aux term only differs by nothing but the head).
    cfg = recipe.unet_s5_d16("fcn", "ce").loss
    _, terms = L.segmentation_loss(up, aux, labels, cfg)
    np.testing.assert_allclose(float(terms["aux.loss_ce"]), float(d["auxhead_loss_ce"]), rtol=RTOL)
    np.testing.assert_allclose(float(terms["aux.acc_seg"]), float(d["auxhead_acc_seg"]), rtol=RTOL)


def _torch_bilinear_np(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Reference: torch F.interpolate(mode='bilinear', align_corners=False) on NHWC, in float64."""
    def axis_weights(n_in: int, n_out: int):
        scale = n_in / n_out
        src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        return i0, i1, lam

    x = x.astype(np.float64)
    h0, h1, lh = axis_weights(x.shape[1], out_hw[0])
    w0, w1, lw = axis_weights(x.shape[2], out_hw[1])
    rows = x[:, h0] * (1 - lh)[None, :, None, None] + x[:, h1] * lh[None, :, None, None]
    return rows[:, :, w0] * (1 - lw)[None, None, :, None] + rows[:, :, w1] * lw[None, None, :, None]


@pytest.mark.parametrize("out_hw", [(32, 40), (24, 30), (8, 10), (17, 23), (16, 20)])
def test_resize_matches_torch_bilinear(out_hw):
    x = np.random.default_rng(0).normal(size=(2, 16, 20, 3)).astype(np.float32)
    got = np.asarray(L.resize_logits_to(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(got, _torch_bilinear_np(x, out_hw), atol=5e-7)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_ce(logits: np.ndarray, labels: np.ndarray, avg_non_ignore: bool = False) -> float:
    logp = _np_log_softmax(logits)
    valid = labels != 255
    safe = np.where(valid, labels, 0)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0] * valid
    denom = valid.sum() if avg_non_ignore else labels.size
    return float(nll.sum() / denom)


def _np_dice_v1(logits: np.ndarray, labels: np.ndarray, eps: float = 1e-3) -> float:
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    c = logits.shape[-1]
    t = np.stack([(labels == k) for k in range(c)], -1).astype(np.float64)  # 255 -> all zero
    n = p.shape[0]
    p, t = p.reshape(n, -1), t.reshape(n, -1)
    dice = 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)
    return float(np.mean(1 - dice))


def _np_dice_legacy(logits: np.ndarray, labels: np.ndarray) -> float:
    p = np.exp(_np_log_softmax(logits))
    c = logits.shape[-1]
    t = np.stack([(np.clip(labels, 0, c - 1) == k) for k in range(c)], -1).astype(np.float64)
    v = (labels != 255)[..., None].astype(np.float64)
    num = 2 * (p * t * v).sum((1, 2)) + 1
    den = (p ** 2 + t ** 2).sum((1, 2)) + 1
    return float(np.mean(1 - num / den, axis=0).sum() / c)


def _synthetic(num_classes: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    dec = rng.normal(scale=2.0, size=(2, 12, 10, num_classes)).astype(np.float32)
    aux = rng.normal(scale=2.0, size=(2, 6, 5, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=(2, 12, 10)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.1] = 255
    return dec, aux, labels


def _loss_cfg(**fields) -> ml_collections.ConfigDict:
    """The recipe's loss section with `fields` set (the options tests/test_loss_options.py
    covers keep their defaults)."""
    cfg = recipe.unet_s5_d16("fcn", "ce").loss
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize("name,dice_form", [("ce", "legacy"), ("ce_dice", "legacy"),
                                            ("ce_dice", "v1")])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_segmentation_loss_hand_composition(name, dice_form, avg_non_ignore):
    dec, aux, labels = _synthetic()
    cfg = _loss_cfg(name=name, ce_weight=1.0, dice_weight=3.0, dice_form=dice_form,
                    aux_weight=0.4, avg_non_ignore=avg_non_ignore, ignore_index=255)
    total, terms = jax.jit(lambda d, a, y: L.segmentation_loss(d, a, y, cfg))(dec, aux, labels)

    aux_up = _torch_bilinear_np(aux, labels.shape[1:])
    expected = {
        "decode.loss_ce": _np_ce(dec, labels, avg_non_ignore),
        "aux.loss_ce": 0.4 * _np_ce(aux_up, labels, avg_non_ignore),
    }
    if name == "ce_dice":
        dice = _np_dice_legacy if dice_form == "legacy" else _np_dice_v1
        expected["decode.loss_dice"] = 3.0 * dice(dec, labels)
    valid = labels != 255
    expected["decode.acc_seg"] = 100.0 * ((dec.argmax(-1) == labels) & valid).sum() / valid.sum()
    expected["aux.acc_seg"] = 100.0 * ((aux_up.argmax(-1) == labels) & valid).sum() / valid.sum()

    assert set(terms) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(float(terms[key]), value, rtol=2e-5, err_msg=key)
    loss_sum = sum(v for k, v in expected.items() if "loss" in k)
    np.testing.assert_allclose(float(total), loss_sum, rtol=2e-5)


def test_segmentation_loss_without_aux_and_weights():
    dec, _, labels = _synthetic(num_classes=2, seed=3)
    cfg = _loss_cfg(name="ce_dice", ce_weight=0.5, dice_weight=2.0, dice_form="v1",
                    aux_weight=0.4, avg_non_ignore=False, ignore_index=255)
    total, terms = L.segmentation_loss(jnp.asarray(dec), None, jnp.asarray(labels), cfg)
    assert set(terms) == {"decode.loss_ce", "decode.loss_dice", "decode.acc_seg"}
    np.testing.assert_allclose(float(terms["decode.loss_ce"]), 0.5 * _np_ce(dec, labels), rtol=2e-5)
    np.testing.assert_allclose(float(terms["decode.loss_dice"]), 2.0 * _np_dice_v1(dec, labels),
                               rtol=2e-5)
    np.testing.assert_allclose(float(total),
                               float(terms["decode.loss_ce"] + terms["decode.loss_dice"]), rtol=1e-6)


def test_segmentation_loss_grad_and_bfloat16():
    dec, aux, labels = _synthetic()
    cfg = recipe.unet_s5_d16("fcn", "ce_dice").loss

    def f(d, a):
        return L.segmentation_loss(d, a, jnp.asarray(labels), cfg)[0]

    g_dec, g_aux = jax.jit(jax.grad(f, argnums=(0, 1)))(jnp.asarray(dec), jnp.asarray(aux))
    assert np.isfinite(np.asarray(g_dec)).all() and np.abs(np.asarray(g_aux)).sum() > 0
    # Gradient of CE at ignored pixels is zero for the decode head's CE-only loss.
    g_ce = jax.grad(lambda d: L.cross_entropy(d, jnp.asarray(labels)))(jnp.asarray(dec))
    assert np.all(np.asarray(g_ce)[labels == 255] == 0.0)

    total16, terms16 = L.segmentation_loss(jnp.asarray(dec, jnp.bfloat16),
                                           jnp.asarray(aux, jnp.bfloat16), jnp.asarray(labels), cfg)
    assert total16.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in terms16.values())
    total32, _ = L.segmentation_loss(jnp.asarray(dec), jnp.asarray(aux), jnp.asarray(labels), cfg)
    np.testing.assert_allclose(float(total16), float(total32), rtol=2e-2)


def test_shape_errors_name_values():
    dec, _, labels = _synthetic()
    with pytest.raises(ValueError, match=r"\(2, 12, 10\)"):
        L.cross_entropy(jnp.asarray(dec), jnp.asarray(labels[:, :6]))
