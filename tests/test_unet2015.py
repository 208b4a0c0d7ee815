"""The original 2015 U-Net: parameter count, sizes, the up-convolution and the size check."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unet_jax.models import unet2015
from unet_jax.models.unet2015 import UNet2015, up_conv


def _abstract(in_channels: int = 1, num_classes: int = 2) -> UNet2015:
    return nnx.eval_shape(lambda: UNet2015(in_channels, num_classes, rngs=nnx.Rngs(0)))


def _out_shape(height: int, width: int) -> jax.ShapeDtypeStruct:
    """The forward's output shape for a (1, height, width, 1) input, computing nothing."""
    graphdef, state = nnx.split(_abstract())
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                          jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32))


def test_parameter_count_is_the_papers():
    """31,030,658 for 1 input channel and 2 classes, biases included (computed from Fig. 1:
    sum over the 23 convolutions of k*k*in*out + out)."""
    by_hand = 0
    ins = (1, 64, 128, 256, 512)
    for i, o in zip(ins, unet2015.CHANNELS):           # contracting: two 3x3 convs per level
        by_hand += 9 * i * o + o + 9 * o * o + o
    for k in range(4):                                 # expanding: up-conv + two 3x3 convs
        c = unet2015.CHANNELS[k]
        by_hand += 4 * 2 * c * c + c + 9 * 2 * c * c + c + 9 * c * c + c
    by_hand += 64 * 2 + 2                              # 1x1 classifier
    assert by_hand == 31_030_658
    params = nnx.state(_abstract(), nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 31_030_658


def test_output_size_572_to_388():
    out = _out_shape(572, 572)
    assert out.shape == (1, 388, 388, 2) and out.dtype == jnp.float32
    assert unet2015.output_size(572) == 388 and unet2015.output_size(700) == 516
    assert 572 - 388 == 2 * unet2015.CONTEXT


@pytest.mark.parametrize("size, near", [(512, "508 / 524"), (100, "188"), (573, "572 / 588")])
def test_refuses_sizes_that_do_not_pool_evenly(size, near):
    with pytest.raises(ValueError) as err:
        _out_shape(size, 572)
    message = str(err.value)
    assert "\n" not in message and f"{size} x 572" in message and near in message, message
    for s in unet2015.valid_input_sizes(size):
        unet2015.check_input_size(s, s)  # the named sizes are valid


def test_upconv_is_torchs_transposed_conv_k2_s2():
    """y[2i + a, 2j + b] = x[i, j] @ W[a, b] + bias: ConvTranspose2d(kernel 2, stride 2) by its
    definition (each input pixel scatters one 2x2 block), in float64 numpy."""
    layer = up_conv(3, 5, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    kernel, bias = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...])
    want, magnitude = np.zeros((2, 8, 6, 5)), np.zeros((2, 8, 6, 5))
    for i in range(4):
        for j in range(3):
            for a in range(2):
                for b in range(2):
                    want[:, 2 * i + a, 2 * j + b] = x[:, i, j].astype(np.float64) @ kernel[a, b]
                    magnitude[:, 2 * i + a, 2 * j + b] = np.abs(x[:, i, j]) @ np.abs(kernel[a, b])
    got = np.asarray(layer(jnp.asarray(x)))
    # Inputs and kernel are float32 values (exact in float64); 3 products summed plus the bias in
    # float32, in any order, err at most gamma_4 = 4u / (1 - 4u) times the sum of magnitudes.
    u = np.finfo(np.float32).eps / 2
    bound = 4 * u / (1 - 4 * u) * (magnitude + np.abs(bias))
    assert np.all(np.abs(got - (want + bias)) <= bound), np.abs(got - (want + bias)).max()


def test_init_std_is_sqrt_2_over_fan_in():
    model = UNet2015(1, 2, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.down[2].conv2.kernel[...])   # 3x3 over 256 channels: fan_in 2304
    # 589,824 draws: the sample std is within 4 standard errors (std / sqrt(2n)) of the target.
    target = np.sqrt(2 / 2304)
    assert abs(kernel.std() - target) < 4 * target / np.sqrt(2 * kernel.size)
    assert not np.asarray(model.down[2].conv2.bias[...]).any()


def test_forward_is_deterministic_without_key_and_dropout_changes_it():
    model = UNet2015(1, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 188, 188, 1)), jnp.float32)
    a, b = model(x), model(x)
    assert a.shape == (1, 4, 4, 2) and np.array_equal(np.asarray(a), np.asarray(b))
    c = model(x, dropout_key=jax.random.key(0))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# ------------------------------------------------------------------------------ wiring
def _config(**eval_fields):
    from tests.tiny_config import get_config
    from unet_jax import recipe
    config = recipe.unet2015(get_config())
    config.model.base_channels = 2
    config.data.crop_size = (188, 188)
    config.eval.crop_size = (188, 188)
    config.eval.update(eval_fields)
    return config


def test_model_name_selects_the_original_unet_with_one_grey_channel():
    from unet_jax.config import check_config
    from unet_jax.models.segmentor import Original2015, build_model
    config = check_config(_config())
    model = build_model(config.model)
    assert isinstance(model, Original2015) and model.net.dropout_rate == 0.5
    grey = np.random.default_rng(0).standard_normal((1, 188, 188, 1)).astype(np.float32)
    rgb = jnp.asarray(np.repeat(grey, 3, axis=-1))
    logits, aux = model(rgb)
    assert aux is None and logits.shape == (1, 4, 4, 2)
    assert np.array_equal(np.asarray(model.predict(rgb)), np.asarray(model.net(grey)))


@pytest.mark.parametrize("field, value, words", [
    ("data.crop_size", (512, 512), ["data.crop_size", "508 / 524"]),
    ("eval.crop_size", (572, 573), ["eval.crop_size", "572 / 588"]),
    ("eval.mode", "slide", ["eval.mode", "overlap_tile"]),
    ("model.aux", True, ["model.aux"]),
])
def test_config_refuses_what_the_original_unet_cannot_run(field, value, words):
    from unet_jax.config import check_config, set_field
    from unet_jax.errors import ConfigError
    config = _config()
    set_field(config, field, value)
    with pytest.raises(ConfigError) as err:
        check_config(config)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


# ------------------------------------------------------------------------------ overlap-tile
@pytest.fixture(scope="module")
def tiny_apply():
    from unet_jax.inference import make_apply_fn
    from unet_jax.models.segmentor import build_model
    config = _config()
    return config, make_apply_fn(build_model(config.model, seed=3))


def test_overlap_tile_on_one_tile_is_the_plain_forward_of_the_mirrored_image(tiny_apply):
    from unet_jax.inference import inference
    config, apply_fn = tiny_apply
    image = np.random.default_rng(1).standard_normal((4, 3, 3)).astype(np.float32)
    got = np.asarray(inference(apply_fn, image, config.eval, 2))
    mirrored = np.pad(image, ((92, 92), (92, 93), (0, 0)), mode="reflect")  # 3 -> 4 wide tile
    from unet_jax.inference import slide_batch
    tail = slide_batch(1, config.eval.batch_windows, 1)[1]  # the one tile's batch, dummy-filled
    want = np.asarray(apply_fn(np.stack([mirrored] * tail)))[0, :4, :3]
    assert got.shape == (4, 3, 2) and np.array_equal(got, want)


def test_overlap_tile_output_tiles_do_not_overlap_and_cover_any_size(tiny_apply):
    """A 9 x 6 image on 4 x 4 output tiles: 3 x 2 tiles, each the forward of its own mirrored
    context; the tiles run in batches of 4 (the last one dummy-filled), so each is compared
    with the forward of a batch of 4 (the same compiled program, the same bits)."""
    from unet_jax.inference import overlap_tile_inference
    _, apply_fn = tiny_apply
    image = np.random.default_rng(2).standard_normal((9, 6, 3)).astype(np.float32)
    got = np.asarray(overlap_tile_inference(apply_fn, image, (188, 188), 2, batch_windows=4))
    padded = np.pad(image, ((92, 92 + 3), (92, 92 + 2), (0, 0)), mode="reflect")
    for ty in range(3):
        for tx in range(2):
            window = padded[4 * ty:4 * ty + 188, 4 * tx:4 * tx + 188]
            want = np.asarray(apply_fn(np.stack([window] * 4)))[0]
            tile = got[4 * ty:4 * ty + 4, 4 * tx:4 * tx + 4]
            np.testing.assert_array_equal(tile, want[:tile.shape[0], :tile.shape[1]])


# ------------------------------------------------------------------------------ 8-fold TTA
def _pointwise(x):
    """A per-pixel 'model' (C = 2): equivariant under every rotation and flip."""
    return jnp.stack([x[..., 0] * 2.0 - x[..., 1], x[..., 2] * 0.5], axis=-1)


def test_dihedral_tta_maps_every_view_back_onto_the_image():
    """With an equivariant forward each of the 8 views, mapped back, is the plain logits, so
    the average is their softmax (8 float32 additions and a division by 8: rtol 8 eps)."""
    from unet_jax import inference as inf
    config = _config(mode="whole", tta=True, tta_mode="dihedral")
    config.data.img_scale = (13, 7)
    image = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    plain = np.asarray(inf.whole_inference(_pointwise, inf.test_image(image, config.data), 2,
                                           size_divisor=1))
    views = list(inf.dihedral_views(lambda x: _pointwise(x), image, config))
    assert len(views) == 8
    for view in views:
        np.testing.assert_allclose(np.asarray(view), plain, rtol=1e-6, atol=1e-5)
    probs = np.asarray(inf.segment(_pointwise, image, config)[0])
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(plain, -1)),
                               rtol=8 * np.finfo(np.float32).eps, atol=1e-7)


def test_dihedral_views_are_the_eight_rotations_and_flips():
    from unet_jax import inference as inf
    assert len(set(inf.DIHEDRAL)) == 8
    image = np.arange(12).reshape(3, 4)
    seen = {np.rot90(image, t)[:, ::-1 if f else 1].tobytes() for t, f in inf.DIHEDRAL}
    assert len(seen) == 8


def test_evaluation_reports_the_isbi_scores_of_p_cell(tiny_apply):
    from unet_jax import isbi_metrics
    from unet_jax.evaluate import evaluate
    from unet_jax.inference import segment
    config, apply_fn = tiny_apply
    config = config.copy_and_resolve_references()
    config.data.img_scale = (10, 9)  # keep the 10 x 9 slices as they are: 3 x 3 tiles each
    rng = np.random.default_rng(5)
    data = []
    for k in range(2):
        label = np.ones((10, 9), np.uint8)
        label[:, 4] = 0
        label[3 + k] = 0
        data.append({"image": rng.integers(0, 256, (10, 9, 3), dtype=np.uint8), "label": label,
                     "name": f"s{k}"})
    summary = evaluate(apply_fn, data, config, progress=False).summary
    probs = [np.asarray(jax.nn.softmax(segment(apply_fn, d["image"], config)[0], -1))[..., 1]
             for d in data]
    want = isbi_metrics.isbi_scores(probs, [d["label"] == 1 for d in data])
    assert summary["isbi"] == pytest.approx(want, rel=1e-6)


def test_training_run_of_the_original_recipe_on_the_tiny_set(tmp_path, train_config):
    """The whole loop with model.name unet2015: elastic samples with weight maps, the weighted
    loss, overlap-tile evaluation with the ISBI scores in the summary."""
    from unet_jax import recipe
    from unet_jax.config import check_config
    from unet_jax.train import train_and_evaluate
    config = recipe.unet2015(train_config(num_steps=2, eval_every=2, checkpoint_every=2,
                                          batch_size=1))
    config.model.base_channels = 2
    config.data.crop_size = (188, 188)
    config.eval.crop_size = (252, 252)   # one 68 x 68 output tile covers a 64 x 64 image
    config.eval.max_images = 1
    summary = train_and_evaluate(check_config(config), tmp_path / "run")
    assert set(summary["isbi"]) >= {"pixel_error", "rand_error", "v_rand", "v_info"}
    assert 0.0 <= summary["isbi"]["v_rand"] == summary["v_rand"] <= 1.0
