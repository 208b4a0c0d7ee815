"""configs/isbi2012.py: the original U-Net's recipe on ISBI 2012 (accelerator and ":cpu")."""
from __future__ import annotations

import pytest

from conftest import REPO, require_shared
from unet_jax.config import ConfigError, check_config, load_config
from unet_jax.models import unet2015

CONFIG = str(REPO / "configs" / "isbi2012.py")


@pytest.fixture(scope="module", params=["", ":cpu"])
def config(request):
    return check_config(load_config(CONFIG + request.param))


def test_both_arguments_load_the_papers_recipe_on_the_folder_dataset(config):
    assert config.model.name == "unet2015" and config.model.in_channels == 1
    assert config.model.num_classes == 2 and config.loss.name == "ce"
    assert config.train.batch_size == 1 and config.train.momentum == 0.99
    d = config.data
    assert d.name == "folder" and d.root == "../shared/data/ISBI2012"
    assert (d.train_images, d.train_labels) == ("train/image", "train/label")
    assert tuple(d.val_stems) == (20, 21, 22, 23)
    assert tuple(d.classes) == ("membrane", "cell") and tuple(d.label_values) == (0, 255)
    assert config.data.weight_map.cell_class == 1 == config.eval.isbi.cell_class
    assert config.eval.mode == "overlap_tile" and config.eval.metric == "v_rand"
    assert config.eval.tta_mode == "dihedral"


def test_tiles_are_valid_and_evaluation_tiles_do_not_overlap(config):
    for size in (config.data.crop_size, config.eval.crop_size):
        unet2015.check_input_size(*size)
    out = unet2015.output_size(config.eval.crop_size[0])
    assert tuple(config.eval.stride) == (out, out) and out >= 512  # one tile per 512 slice


def test_the_accelerator_config_is_the_papers_size_and_cpu_a_smaller_one():
    paper, cpu = (load_config(CONFIG + arg) for arg in ("", ":cpu"))
    assert paper.model.base_channels == 64 and tuple(paper.data.crop_size) == (572, 572)
    assert cpu.model.base_channels < 64 and cpu.data.crop_size[0] < 572
    assert cpu.train.num_steps < paper.train.num_steps
    assert cpu.train.eval_every == cpu.train.num_steps  # one evaluation, at the end


def test_the_data_root_is_the_shared_isbi_folder_beside_the_repo():
    root = REPO / load_config(CONFIG).data.root
    require_shared(root)
    stems = sorted(int(p.stem) for p in (root / "train" / "image").glob("*.png"))
    assert stems == list(range(24)) and (root / "train" / "label" / "23.png").exists()


def test_an_unknown_argument_is_refused():
    with pytest.raises((ConfigError, ValueError), match="isbi2012"):
        load_config(CONFIG + ":gpu")


def test_export_refuses_the_dihedral_tta_in_one_line(tmp_path):
    """The SavedModel runs mmseg's TTA only: dihedral TTA is refused before anything is read or
    written (the checkpoint need not exist); without TTA the config passes the check."""
    from unet_jax.cli import export
    from unet_jax.errors import InputError
    config = load_config(CONFIG + ":cpu")
    export.check_exportable(config)  # eval.tta off: the plain forward exports
    config.eval.tta = True
    with pytest.raises(InputError, match=r"^eval.tta_mode 'dihedral': export runs mmseg's TTA"
                                         r"[^\n]*$"):
        export.export_checkpoint(config, tmp_path / "missing", tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
