"""Converter: mmseg .pth (1.x and released 0.x layouts) <-> unet_jax weights, strict and safe."""
import json
import os
import re
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURE_MODELS, tiny_config
from unet_jax.io import weights
from unet_jax.cli.convert import export_mmseg, import_mmseg
from unet_jax.errors import InputError
from unet_jax.models import build_model
from unet_jax.models.mmseg import StateDictMismatchError, extract_state_dict, load_state_dict
from unet_jax.errors import UnsafeCheckpointError
from unet_jax.io.pth import load_pth


def _config(name):
    dataset, head = FIXTURE_MODELS[name]
    return tiny_config(f"configs/{dataset}.py:{head}")


@pytest.mark.parametrize("name", sorted(FIXTURE_MODELS))
def test_both_layouts_give_the_same_state_dict_and_keys(fixtures_dir, name):
    new = load_pth(fixtures_dir / "models" / f"{name}.pth")
    old = load_pth(fixtures_dir / "models" / f"{name}_published.pth")
    assert set(new) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    assert set(old) == {"meta", "state_dict"}
    a, b = extract_state_dict(new), extract_state_dict(old)
    keys = json.loads((fixtures_dir / "models" / "keys.json").read_text())[name]
    assert list(a) == [k for k, _, _ in keys]
    assert all(list(a[k].shape) == shape for k, _, shape in keys)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bare_and_module_prefixed_state_dicts(fixtures_dir):
    sd = extract_state_dict(load_pth(fixtures_dir / "models" / "fcn_drive_published.pth"))
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    assert extract_state_dict(wrapped).keys() == sd.keys()
    assert extract_state_dict(dict(sd)).keys() == sd.keys()


def test_convert_roundtrip_gives_mmseg_logits_and_identical_pth(fixtures_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="--to-mmseg needs the torch extra")
    config = _config("deeplabv3_drive")
    src = fixtures_dir / "models" / "deeplabv3_drive_published.pth"
    import_mmseg(config, src, tmp_path / "ckpt")
    model = build_model(config.model)
    meta = weights.load(model, tmp_path / "ckpt")
    assert meta["classes"] == ["background", "vessel"] and meta["layout"] == "mmseg-0.x"
    model.eval()
    x = np.load(fixtures_dir / "models" / "inputs.npz")["x48x80"].transpose(0, 2, 3, 1)
    ref = np.load(fixtures_dir / "models" / "deeplabv3_drive_outputs.npz")["x48x80_decode"]
    out = np.asarray(model.predict(jnp.asarray(x))).transpose(0, 3, 1, 2)
    assert np.abs(out - ref).max() <= 3e-4

    export_mmseg(config, tmp_path / "ckpt", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)   # loads without any allowlist
    orig = extract_state_dict(load_pth(src))
    assert set(back["state_dict"]) == set(orig)
    for k, v in orig.items():
        assert back["state_dict"][k].dtype == (torch.int64 if k.endswith("tracked") else torch.float32)
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back["state_dict"][k].numpy(), v)
    assert back["meta"]["dataset_meta"]["classes"] == ("background", "vessel")


def test_cli_end_to_end(fixtures_dir, tmp_path):
    cmd = [sys.executable, "-m", "unet_jax.convert", "--config", "configs/drive.py:fcn",
           "--config.model.base_channels=8",
           "--checkpoint", str(fixtures_dir / "models" / "fcn_drive.pth"),
           "--output", str(tmp_path / "fcn")]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "fcn" / "model").is_dir()
    bad = cmd[:-2] + ["--output", str(tmp_path / "bad")]
    bad[bad.index(str(fixtures_dir / "models" / "fcn_drive.pth"))] = str(
        fixtures_dir / "models" / "fcn_cityscapes.pth")
    done = subprocess.run(bad, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "conv_seg.weight: expected (2, 8, 1, 1), found (19, 8, 1, 1)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "configs/cityscapes.py" in done.stderr and "Traceback" not in done.stderr


def test_mismatch_is_one_short_line_with_the_hint_first(fixtures_dir):
    model = build_model(_config("fcn_drive").model)
    sd = extract_state_dict(load_pth(fixtures_dir / "models" / "pspnet_drive.pth"))
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict(model, sd, source="pspnet_drive.pth")
    text = str(err.value)
    hint = "pspnet decode head (4 channels) with 2 classes and base_channels 8"
    assert "\n" not in text and len(text) < 800, text
    assert text.index(hint) < text.index(" missing, ")
    assert re.search(r"\b\d+ missing, \d+ unexpected, \d+ mis-shaped keys, e\.g\. ", text), text
    assert "missing decode_head.convs.0.bn.bias" in text and "(+28 more)" in text, text


class _Payload:
    """Pickles into a call of os.system that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "x": _Payload(marker)},
                                                     protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(UnsafeCheckpointError, match=r"refused as unsafe.*(posix|os)\.system"):
        load_pth(path)
    assert not marker.exists()


def test_export_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match=r"pip install -e \.\[torch\]"):
        export_mmseg(_config("fcn_drive"), tmp_path, tmp_path / "x.pth")


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path):
    """A weights folder (convert's output) that cannot fit: refused before orbax starts, with
    the folder, the OS error and the sizes; no temporary folder is left on the disk."""
    from conftest import TINY, small_disk
    from unet_jax.errors import CheckpointError

    model = build_model(tiny_config(TINY).model)  # 0.3 MiB of weights
    with small_disk(tmp_path) as disk:
        with pytest.raises(CheckpointError, match=r"disk/w: cannot write the checkpoint: No space "
                                                  r"left on device \(needs 0\.\d MiB"):
            weights.save(disk / "w", model, {"classes": ["a", "b"]})
        assert not list(disk.iterdir())
