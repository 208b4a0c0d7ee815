"""Model structure and parity with mmsegmentation's forward outputs (../shared/fixtures/mmseg)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURE_MODELS, fixture_model, tiny_config
from unet_jax.models import build_model, count_params
from unet_jax.errors import ConfigError
from unet_jax.models.heads import ASPPHead, FCNHead, PSPHead
from unet_jax.models import layers
from unet_jax.models.layers import adaptive_pool_matrix
from unet_jax.models.unet import UNet
from unet_jax.config import load_config


@pytest.mark.parametrize("dataset,head,expected", [
    ("drive", "fcn", 29_060_676), ("drive", "pspnet", 29_046_276),
    ("drive", "deeplabv3", 29_064_996), ("cityscapes", "fcn", 29_062_886)])
def test_parameter_counts_full_width(dataset, head, expected):
    model = nnx.eval_shape(lambda: build_model(load_config(f"configs/{dataset}.py:{head}").model))
    assert count_params(model) == expected
    assert count_params(model.backbone) == 28_949_568


def test_backbone_shapes_full_width():
    def forward():
        model = build_model(load_config("configs/drive.py:fcn").model)
        x = jnp.zeros((2, 64, 64, 3))
        return model.extract_feat(x), model(x, dropout_key=jax.random.key(0))

    feats, (dec, aux) = nnx.eval_shape(forward)
    assert [f.shape for f in feats] == [(2, 4, 4, 1024), (2, 8, 8, 512), (2, 16, 16, 256),
                                        (2, 32, 32, 128), (2, 64, 64, 64)]
    assert dec.shape == (2, 64, 64, 2) and aux.shape == (2, 32, 32, 2)


def test_indivisible_input_error_names_size_and_fix():
    model = build_model(_tiny("fcn"))
    with pytest.raises(ValueError, match=r"h=50, w=64.*divisible.*16.*Pad or crop.*slide"):
        model(jnp.zeros((1, 50, 64, 3)))


def _tiny(head):
    return tiny_config(f"configs/drive.py:{head}", {"model.base_channels": 4}).model


def test_unet_general_options():
    unet = UNet(base_channels=4, num_stages=4, strides=(1, 2, 1, 1), enc_num_convs=(1, 2, 3, 2),
                dec_num_convs=(2, 1, 2), downsamples=(False, True, True),
                enc_dilations=(1, 2, 1, 1), dec_dilations=(1, 1, 2), rngs=nnx.Rngs(0))
    assert unet.downsample_rate == 8
    outs = unet(jnp.zeros((1, 32, 24, 3)))
    assert [o.shape for o in outs] == [(1, 4, 3, 32), (1, 8, 6, 16), (1, 16, 12, 8), (1, 32, 24, 4)]
    assert len(unet.encoder[2][1].convs) == 3 and not hasattr(unet.decoder[0].upsample, "conv")
    with pytest.raises(ValueError, match="dec_num_convs must have 4 entries.*found 3"):
        UNet(dec_num_convs=(2, 2, 2), rngs=nnx.Rngs(0))



@pytest.mark.parametrize("build,message", [
    (lambda r: FCNHead(4, 4, 2, in_index=0, num_convs=-1, rngs=r),
     r"num_convs must be an int >= 0, got -1"),
    (lambda r: FCNHead(4, 4, 2, in_index=0, dilation=0, rngs=r),
     r"dilation must be an int > 0, got 0"),
    (lambda r: FCNHead(8, 4, 2, in_index=0, num_convs=0, concat_input=False, rngs=r),
     r"in_channels \(8\) must equal channels \(4\)"),
    (lambda r: PSPHead(4, 4, 2, in_index=0, pool_scales=1, rngs=r), r"pool_scales .* got 1$"),
    (lambda r: PSPHead(4, 4, 2, in_index=0, pool_scales=(1, 0), rngs=r), r"got \(1, 0\)$"),
    (lambda r: ASPPHead(4, 4, 2, in_index=0, dilations=1, rngs=r), r"dilations .* got 1$"),
    (lambda r: ASPPHead(4, 4, 2, in_index=0, dilations=(), rngs=r), r"got \(\)$")])
def test_heads_refuse_bad_arguments_in_one_line(build, message):
    """As mmseg's asserts, at construction (not at the first forward), as one ConfigError line."""
    with pytest.raises(ConfigError, match=message) as err:
        build(nnx.Rngs(0))
    assert "\n" not in str(err.value)


def test_initialisation_matches_mmseg():
    cfg = load_config("configs/drive.py:fcn").model
    cfg.base_channels = 16
    model = build_model(cfg, seed=3)
    kernel = np.asarray(model.backbone.encoder[4][1].convs[1].conv.kernel[...])  # 3x3, 256 out
    assert kernel.std() == pytest.approx(np.sqrt(2.0 / (256 * 9)), rel=0.02)
    assert abs(kernel.mean()) < 1e-3
    bn = model.backbone.encoder[4][1].convs[1].bn
    assert np.all(np.asarray(bn.scale[...]) == 1) and np.all(np.asarray(bn.bias[...]) == 0)
    seg = np.asarray(model.decode_head.conv_seg.kernel[...])
    assert seg.std() == pytest.approx(0.01, rel=0.2)
    assert np.all(np.asarray(model.decode_head.conv_seg.bias[...]) == 0)


def test_one_random_path_eager_jit_and_eval_shape():
    """The same seed gives bit-identical weights eagerly and under jax.jit; eval_shape agrees on
    the structure (so `jax.jit(init, out_shardings=...)` starts a sharded run with them)."""
    cfg = _tiny("pspnet")
    eager = nnx.state(build_model(cfg, seed=3))
    jitted = jax.jit(lambda: nnx.state(build_model(cfg, seed=3)))()
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg, seed=3)))
    flat = lambda s: dict(nnx.to_flat_state(s))
    e, j, a = flat(eager), flat(jitted), flat(abstract)
    assert e.keys() == j.keys() == a.keys() and len(e) > 100
    for k in e:
        np.testing.assert_array_equal(np.asarray(e[k][...]), np.asarray(j[k][...]), err_msg=str(k))
        assert (a[k].shape, a[k].dtype) == (e[k][...].shape, e[k][...].dtype)
    other = nnx.state(build_model(cfg, seed=4))
    kernel = ("backbone", "encoder", 0, 0, "convs", 0, "conv", "kernel")
    assert not np.array_equal(np.asarray(flat(other)[kernel][...]), np.asarray(e[kernel][...]))


@pytest.mark.parametrize("length,bins,expected", [
    (64, 3, [(0, 22), (21, 43), (42, 64)]),
    (64, 6, [(0, 11), (10, 22), (21, 32), (32, 43), (42, 54), (53, 64)]),
    (256, 6, [(0, 43), (42, 86), (85, 128), (128, 171), (170, 214), (213, 256)])])
def test_adaptive_pool_bins_overlap_like_torch(length, bins, expected):
    mat = np.asarray(adaptive_pool_matrix(length, bins))
    got = [(int(np.flatnonzero(r)[0]), int(np.flatnonzero(r)[-1]) + 1) for r in mat]
    assert got == expected
    np.testing.assert_allclose(mat.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(FIXTURE_MODELS))
def test_forward_parity_with_mmseg(fixtures_dir, name):
    _, model = fixture_model(name)
    inputs = np.load(fixtures_dir / "models" / "inputs.npz")
    ref = np.load(fixtures_dir / "models" / f"{name}_outputs.npz")
    worst = 0.0
    for tag in ("x64x64", "x48x80"):
        x = jnp.asarray(inputs[tag].transpose(0, 2, 3, 1))
        feats = model.extract_feat(x)
        decode, aux = model(x)
        pairs = [(f, ref[f"{tag}_backbone_{i}"]) for i, f in enumerate(feats)]
        pairs += [(decode, ref[f"{tag}_decode"]), (aux, ref[f"{tag}_aux"])]
        for ours, theirs in pairs:
            ours = np.asarray(ours).transpose(0, 3, 1, 2)
            assert ours.shape == theirs.shape
            worst = max(worst, float(np.abs(ours - theirs).max()))
        np.testing.assert_array_equal(np.asarray(model.predict(x)), np.asarray(decode))
    assert worst <= 3e-4, f"{name}: max abs error {worst:.2e} > 3e-4"


def test_bfloat16_option_runs_close(fixtures_dir):
    config, model = fixture_model("fcn_drive")
    config.model.dtype = "bfloat16"
    bf = build_model(config.model)
    nnx.update(bf, nnx.state(model))
    bf.eval()
    x = jnp.asarray(np.load(fixtures_dir / "models" / "inputs.npz")["x64x64"].transpose(0, 2, 3, 1))
    ref, _ = model(x)
    out, _ = bf(x)
    assert out.dtype == jnp.float32
    agree = np.mean(np.argmax(np.asarray(out), -1) == np.argmax(np.asarray(ref), -1))
    assert agree > 0.95


def test_float64_option_needs_x64():
    config = load_config("configs/drive.py:fcn")
    config.model.base_channels = 8
    config.model.dtype = "float64"
    with pytest.raises(ValueError, match="jax_enable_x64"):
        build_model(config.model)


def test_float64_option_is_float64_throughout(fixtures_dir, x64):
    config, model = fixture_model("fcn_drive", dtype="float64")
    leaves = jax.tree_util.tree_leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    assert leaves and all(leaf.dtype == jnp.float64 for leaf in leaves)
    x = np.load(fixtures_dir / "models" / "inputs.npz")["x64x64"].transpose(0, 2, 3, 1)
    decode, aux = model(jnp.asarray(x))
    assert decode.dtype == jnp.float64 and aux.dtype == jnp.float64
    ref = np.load(fixtures_dir / "models" / "fcn_drive_outputs.npz")
    # The fixture is torch float32: its own error (vs float64) is 1.1e-4 for fcn_drive.
    np.testing.assert_allclose(np.asarray(decode).transpose(0, 3, 1, 2), ref["x64x64_decode"],
                               atol=3e-4, rtol=0)


def test_with_cp_and_norm_eval_options():
    def loss_and_grads(**opts):
        cfg = _tiny("fcn")  # a 3-stage UNet keeps the three compiles short
        cfg.update(num_stages=3, strides=(1, 1, 1), enc_num_convs=(2, 2, 2), dec_num_convs=(2, 2),
                   downsamples=(True, True), enc_dilations=(1, 1, 1), dec_dilations=(1, 1))
        for k, v in opts.items():
            cfg[k] = v
        model = build_model(cfg, seed=0)
        model.train()
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.mean(m(x, dropout_key=jax.random.key(0))[0] ** 2)
        return jax.jit(jax.value_and_grad(f))(params), model

    (plain, g1), _ = loss_and_grads()
    (cp, g2), _ = loss_and_grads(with_cp=True)
    assert float(plain) == pytest.approx(float(cp), rel=1e-6)
    k = lambda g: np.asarray(g["backbone"]["encoder"][0][0]["convs"][0]["conv"]["kernel"][...])
    np.testing.assert_allclose(k(g1), k(g2), rtol=1e-5, atol=1e-7)
    (_, _), model = loss_and_grads(norm_eval=True)
    bn = model.backbone.encoder[0][0].convs[0].bn
    assert bn.frozen and float(np.abs(np.asarray(bn.mean[...])).max()) == 0.0
    assert not model.decode_head.convs[0].bn.frozen


def test_adaptive_pool_matrix_takes_a_symbolic_length():
    """Shape-polymorphic export (unet_jax.export): the bins follow a symbolic length, and the
    weights are 1 / width rounded once, as the concrete matrix."""
    (length,) = jax.export.symbolic_shape("16*h")
    exported = jax.export.export(jax.jit(lambda x: adaptive_pool_matrix(x.shape[0], 6)))(
        jax.ShapeDtypeStruct((length,), jnp.float32))
    for n in (16, 64, 112):
        got = np.asarray(exported.call(jnp.zeros((n,), jnp.float32)))
        np.testing.assert_array_equal(got, np.asarray(adaptive_pool_matrix(n, 6)))
        starts, ends = (np.arange(6) * n) // 6, -((-(np.arange(6) + 1) * n) // 6)
        widths = np.float32(1.0) / (ends - starts).astype(np.float64)
        np.testing.assert_array_equal(got.max(1), widths.astype(np.float32))


@pytest.mark.parametrize("padding,dilation,kernel", [(1, 1, 3), (2, 2, 3), (0, 1, 3), (0, 1, 1)])
def test_conv_formulations_have_lax_conv_values_and_gradients(x64, padding, dilation, kernel):
    """`conv2d_gemm` and `conv2d_wgrad_gemm` are lax.conv with other summation orders: in
    float64 their values and both gradients agree with it to rounding (each output sums
    k*k*C <= 72 products, each weight-gradient entry N*H*W <= 540: relative error far below
    1e-12), so a wrong tap, offset or transpose shows at order 1."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 15, 18, 8)))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 8, 6)))

    def grads(conv):
        def loss(a, b):
            return jnp.sum(jnp.sin(conv(a, b, padding, dilation)))
        return (conv(x, w, padding, dilation), *jax.grad(loss, (0, 1))(x, w))

    want = grads(layers._lax_conv)
    for conv in (layers.conv2d_gemm, layers.conv2d_wgrad_gemm):
        for got, ref in zip(grads(conv), want):
            assert got.dtype == jnp.float64 and got.shape == ref.shape
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0,
                                       atol=1e-12 * float(jnp.abs(ref).max()))
