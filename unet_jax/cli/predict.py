"""Segment your own images with a converted mmseg checkpoint or a unet_jax run.

    python -m unet_jax.predict --config configs/drive.py:fcn,ce --checkpoint CKPT \\
        --input IMAGE_OR_FOLDER [MORE ...] --output DIR [--save_logits] [--noresize] \\
        [--isbi_submission FILE.tif] [--config.eval.tta=True] [--config.model.base_channels=8 ...]

CKPT is a weights folder (`python -m unet_jax.convert` output), an mmseg `.pth` read directly
(no torch needed), or a training workdir (its latest checkpoint). Inputs are image files or
folders, searched recursively for png/jpg/jpeg/tif/tiff/gif/ppm/bmp (skipping DIR when it lies
inside an input folder); any size and aspect ratio works. Every image goes through
`unet_jax.Segmenter.predict` (the Python API; same numbers).

For every image `<stem>` it writes to DIR:
* `<stem>.png`: the label map, a palette PNG whose pixel values are the class ids and whose
  palette is `config.data.palette`;
* `<stem>_overlay.png`: the label colours blended over the image (alpha 0.5);
* with --save_logits, `<stem>_logits.npy`: float32 H x W x C at the image's original size, the
  window-averaged logits; with `--config.eval.tta=True` the view-averaged softmax probabilities
  instead (mmseg merges TTA views in probability space).

With `--isbi_submission FILE.tif` it also writes the ISBI 2012 challenge's submission: ONE
multi-page 32-bit float TIFF holding P(cell) (the softmax of the logits, or the TTA-averaged
probability, of the class `eval.isbi.cell_class`, default 1) of every input, one page per image
in natural name order (2.png before 10.png: the stack's slice order). All inputs must have the
same size. Pillow writes it (mode 'F' pages, SampleFormat IEEE float): Pillow is already a
dependency and tifffile is not, and nothing beyond plain float pages is needed.

Safe outputs: every output path is computed before anything is written, and the run is refused
(nothing written, exit code 2, both paths named) if an output would be an input file (the same
path, or the same file through a link), if two outputs coincide (two inputs with the same stem;
`a.png` beside `a_overlay.png`; names that differ only in case, one file on macOS and Windows), if
DIR is an existing file, or if an output path holds something predict did not write (a link, a
folder, a PNG without the marker predict puts in its PNGs for that output of that stem, a `.npy`
that is not float32 H x W x C). Outputs of an earlier predict run with the same stems are
overwritten.

Images are decoded as mmseg decodes them (`unet_jax.io.images.read_rgb`: cv2 IMREAD_COLOR, EXIF
orientation applied, 16-bit to 8-bit as cv2 does, first frame of a GIF). A file that cannot be
read (or declares more than `unet_jax.io.images.MAX_PIXELS` pixels) is reported on stderr, one line
naming it, and skipped; the others are processed and the exit code is 1 with a summary line
"N of M images could not be read: ...".

Preprocessing is mmseg's test pipeline: keep-ratio resize of the image to `data.img_scale`
(cv2 bilinear; an identity at the dataset's native size, e.g. 584x565 for DRIVE; sides that
would round to 0 stay 1 pixel; `unet_jax.preprocess.test_image`), then slide or whole
inference per `config.eval`, logits resized back to the original size. `--noresize` runs at the image's own
size instead. Sides that are not multiples of 16 are zero-padded and cropped back (see
`unet_jax.inference`); mmseg would raise on those.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from unet_jax.cli import common
from unet_jax.errors import InputError, one_line, storage_error
from unet_jax.evaluate import overlay_image
from unet_jax.io import paths
from unet_jax.io.images import IMAGE_SUFFIXES, ImageReadError, read_rgb
from unet_jax.io.paths import as_path
from unet_jax.segmenter import Segmenter, full_palette

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "Outputs", "Report", "cell_probability",
           "check_submission_path", "full_palette", "list_images", "natural_key", "plan_outputs",
           "predict_files", "save_label_png", "save_submission", "write_predictions"]

# The text entries of every PNG predict writes: how a rerun knows which files it may replace
# ("Software" names predict, "Description" says which output of which stem the file is).
MARKER_KEY, MARKER, ROLE_KEY = "Software", "unet_jax.predict", "Description"
EXIT_SOME_UNREADABLE = 1


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files predict writes for one input image (`logits` None without --save_logits)."""

    input: Path
    label: Path
    overlay: Path
    logits: Path | None = None

    def paths(self) -> list[Path]:
        """The output paths, label first."""
        return [p for p in (self.label, self.overlay, self.logits) if p is not None]

    def roles(self) -> list[tuple[Path, str]]:
        """(path, role) of every output: "label map of <stem>", "overlay of <stem>", ..."""
        names = ("label map", "overlay", "logits")
        return [(p, f"{name} of {self.input.stem}")
                for p, name in zip((self.label, self.overlay, self.logits), names)
                if p is not None]


@dataclasses.dataclass
class Report:
    """What a predict run did: the outputs written, and the inputs skipped with the reason."""

    written: list[Outputs] = dataclasses.field(default_factory=list)
    failed: dict[Path, str] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ inputs
def _real(path: Path) -> Path:
    """A local path with its links resolved (what two names of one file share); a bucket URL
    as it is (an object store has no links)."""
    return path if paths.is_url(path) else as_path(os.path.realpath(path))


def _files_under(folder: Path) -> list[Path]:
    """Everything under `folder`, recursively (epath refuses `rglob` on a bucket)."""
    if not paths.is_url(folder):
        return list(folder.rglob("*"))
    return paths.files_under(folder)


def list_images(inputs: Sequence[str | Path], skip: str | Path | None = None) -> list[Path]:
    """Files as given plus the image files inside folders (recursive, sorted), each once.

    Files under `skip` (the output folder) are left out of the folder search when `skip` lies
    inside a searched folder, so a rerun does not take the previous run's outputs as inputs.
    """
    skip_dir = _real(as_path(skip)) if skip is not None else None
    files: list[Path] = []
    for item in inputs:
        path = as_path(item)
        if path.is_dir():
            root = _real(path)
            prune = skip_dir is not None and skip_dir != root and skip_dir.is_relative_to(root)
            found = sorted(p for p in _files_under(path)
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not (prune and _real(p).is_relative_to(skip_dir)))
            if not found:
                raise InputError(f"--input {path}: folder holds no image files "
                                 f"(expected suffixes {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--input {path}: no such file or folder")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(_real(f), f)
    return list(unique.values())


# ------------------------------------------------------------------------------ outputs
def plan_outputs(inputs: Sequence[str | Path], output: str | Path, *,
                 save_logits: bool = False) -> list[Outputs]:
    """The outputs of every input image, checked before anything is written (module docstring).

    Raises `InputError` naming both paths if an output would overwrite an input, a second
    output of the run, or a file that predict did not write; and if `output` is a file.
    """
    out_dir = as_path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output {out_dir}: is an existing file; give a folder (created if "
                         "absent)")
    plans = [Outputs(f, out_dir / f"{f.stem}.png", out_dir / f"{f.stem}_overlay.png",
                     out_dir / f"{f.stem}_logits.npy" if save_logits else None)
             for f in list_images(inputs, skip=out_dir)]
    check_outputs(plans)
    return plans


def _file_id(path: Path) -> tuple[int, int] | None:
    if paths.is_url(path):
        return None  # objects have no inode; their URL is their one name
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_outputs(plans: Sequence[Outputs]) -> None:
    """Refuse (InputError) outputs that are inputs, coincide, or would replace foreign files."""
    inputs_by_path = {str(_real(p.input)): p.input for p in plans}
    inputs_by_id = {_file_id(p.input): p.input for p in plans}
    inputs_by_id.pop(None, None)
    claimed: dict[str, tuple[Path, Path]] = {}
    for plan in plans:
        for out, role in plan.roles():
            resolved = str(_real(out))
            same = inputs_by_path.get(resolved)
            if same is None and (out.exists() or os.path.islink(out)):
                same = inputs_by_id.get(_file_id(out))
            if same is not None:
                raise InputError(f"{out} (an output of {plan.input}) would overwrite the input "
                                 f"{same}; choose an --output folder that holds no inputs")
            key = os.path.normcase(resolved).casefold()
            if key in claimed:
                other, other_out = claimed[key]
                raise InputError(f"inputs {other} and {plan.input} would both write "
                                 f"{other_out if other_out == out else f'{other_out} / {out}'}; "
                                 "predict them into different --output folders or rename one")
            claimed[key] = (plan.input, out)
            _check_replaceable(out, plan.input, role)


def _check_replaceable(out: Path, source: Path, role: str) -> None:
    if os.path.islink(out):
        raise InputError(f"{out} (an output of {source}) is a symbolic link; predict does not "
                         "write through links: remove it or choose another --output")
    if not out.exists():
        return
    if not out.is_file():
        raise InputError(f"{out} (an output of {source}) exists and is not a file; remove it or "
                         "choose another --output")
    if not written_by_predict(out, role):
        raise InputError(f"{out} (an output of {source}) exists and was not written by "
                         f"unet_jax.predict as the {role}; predict only replaces its own earlier "
                         "outputs of the same stems: move it or choose another --output")


def written_by_predict(path: str | Path, role: str | None = None) -> bool:
    """Whether `path` is a predict output: a PNG with predict's marker (and, if given, `role`,
    e.g. "overlay of a"), or a `.npy` whose header carries the marker (`save_logits`); only the
    header is read."""
    path = as_path(path)
    try:
        if path.suffix == ".npy":
            with path.open("rb") as fh:
                head = fh.read(_NPY_HEADER)
            return head.startswith(np.lib.format.MAGIC_PREFIX) and _NPY_MARK in head
        with path.open("rb") as fh, Image.open(fh) as img:
            return (img.format == "PNG" and img.info.get(MARKER_KEY) == MARKER
                    and (role is None or img.info.get(ROLE_KEY) == role))
    except Exception:  # noqa: BLE001 -- unreadable or not an image: not ours
        return False


# A .npy has no metadata field, so `save_logits` ends the header's dict literal with a Python
# comment naming predict (the header is parsed with `ast.literal_eval`, which ignores it; np.load
# reads the file as any other).
_NPY_MARK, _NPY_HEADER = f"}} # {MARKER}".encode(), 256


def save_logits(path: str | Path, scores: np.ndarray) -> None:
    """Write float32 H x W x C `scores` as a version 1.0 `.npy` marked as predict's."""
    scores = np.ascontiguousarray(scores, dtype="<f4")
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': %r" % (scores.shape,)
    header += _NPY_MARK.decode()
    prefix = len(np.lib.format.MAGIC_PREFIX) + 2 + 2  # magic, version, header length
    header += " " * (-(prefix + len(header) + 1) % np.lib.format.ARRAY_ALIGN) + "\n"
    with open(path, "wb") as fh:
        fh.write(np.lib.format.magic(1, 0) + len(header).to_bytes(2, "little"))
        fh.write(header.encode("latin1"))
        fh.write(scores.tobytes())


def _png_info(role: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(MARKER_KEY, MARKER)
    if role:
        info.add_text(ROLE_KEY, role)  # iTXt when not latin-1
    return info


def save_label_png(path: str | Path, label_map: np.ndarray,
                   palette: Sequence[Sequence[int]], *, role: str = "") -> None:
    """Write a label map as a palette ('P') PNG: values are class ids, colours the palette.

    The PNG carries predict's marker (and `role`, e.g. "label map of a") as text entries.
    """
    label_map = np.asarray(label_map)
    if label_map.max(initial=0) > 255 or label_map.min(initial=0) < 0:
        raise ValueError(f"{path}: label ids must fit in uint8; found range "
                         f"[{label_map.min()}, {label_map.max()}]")
    img = Image.fromarray(label_map.astype(np.uint8))
    flat = [v for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path, pnginfo=_png_info(role))


# ------------------------------------------------------------------------------ the command
def write_predictions(segmenter: Segmenter, plans: Sequence[Outputs], *, resize: bool = True,
                      progress: bool = True, submission: Path | None = None) -> Report:
    """Segment every planned input and write its outputs; unreadable inputs are skipped. With
    `submission` (checked by `check_submission_path`), also the ISBI submission TIFF of the
    images read (module docstring)."""
    cells: dict[Path, np.ndarray] = {}
    report = Report()
    if plans:
        plans[0].label.parent.mkdir(parents=True, exist_ok=True)
    palette = segmenter.palette
    for plan in tqdm(plans, desc="predict", unit="img", disable=not progress):
        try:
            image = read_rgb(plan.input)
        except ImageReadError as err:
            report.failed[plan.input] = one_line(err)
            continue
        labels, scores = segmenter.predict(image, resize=resize)
        (_, label_role), (_, overlay_role) = plan.roles()[:2]
        overlay = Image.fromarray(overlay_image(image, labels, palette, alpha=0.5))
        writes = [(plan.label, lambda p: save_label_png(p, labels, palette, role=label_role)),
                  (plan.overlay, lambda p: overlay.save(p, pnginfo=_png_info(overlay_role)))]
        if plan.logits is not None:
            writes.append((plan.logits, lambda p: save_logits(p, scores)))
        for path, write in writes:
            _write(path, write)
        if submission is not None:
            cells[plan.input] = cell_probability(scores, segmenter.config)
        report.written.append(plan)
    if submission is not None and cells:
        save_submission(submission, [cells[p] for p in sorted(cells, key=natural_key)])
    return report


# ------------------------------------------------------------------------------ ISBI submission
TIFF_SUFFIXES = (".tif", ".tiff")


def natural_key(path: Path) -> list[Any]:
    """Sort key of a file name with its digit runs compared as numbers ("2.png" < "10.png")."""
    return [int(t) if t.isdigit() else t.casefold() for t in re.split(r"(\d+)", path.name)]


def check_submission_path(path: str | Path, plans: Sequence[Outputs]) -> Path:
    """The --isbi_submission path, refused (InputError) unless it ends in .tif/.tiff, is no
    input or other output of the run, and is absent or a TIFF that predict wrote."""
    if paths.is_url(str(path)):
        raise InputError(f"--isbi_submission {path}: expected a local file (the submission is "
                         "uploaded to the challenge by hand)")
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        raise InputError(f"--isbi_submission {path}: expected a .tif or .tiff file name")
    resolved = os.path.normcase(path.resolve()).casefold()
    for plan in plans:
        for other in (plan.input, *plan.paths()):
            if paths.is_url(str(other)):
                continue
            if os.path.normcase(Path(other).resolve()).casefold() == resolved:
                raise InputError(f"--isbi_submission {path}: is also {other} (an input or output "
                                 "of this run); choose another file name")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InputError(f"--isbi_submission {path}: exists and is not a plain file")
    if path.exists() and not _submission_by_predict(path):
        raise InputError(f"--isbi_submission {path}: exists and was not written by "
                         "unet_jax.predict; move it or choose another file name")
    return path


def _submission_by_predict(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            return img.format == "TIFF" and img.tag_v2.get(_TIFF_SOFTWARE) == MARKER
    except Exception:  # noqa: BLE001 -- unreadable or not an image: not ours
        return False


_TIFF_SOFTWARE, _TIFF_DESCRIPTION = 305, 270  # TIFF tags Software, ImageDescription


def cell_probability(scores: np.ndarray, config: Any) -> np.ndarray:
    """P(cell) (H, W) float32 from predict's scores: softmax of the logits (sigmoid of a single
    binary channel), or with `eval.tta` the averaged probabilities themselves; the cell class is
    `eval.isbi.cell_class` when the config has that section, else 1."""
    scores = np.asarray(scores, np.float64)
    if scores.shape[-1] == 1:
        prob = scores[..., 0] if config.eval.tta else 1.0 / (1.0 + np.exp(-scores[..., 0]))
        return prob.astype(np.float32)
    cell = int(config.eval.isbi.cell_class) if "isbi" in config.eval else 1
    if config.eval.tta:
        return scores[..., cell].astype(np.float32)
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (shifted[..., cell] / shifted.sum(axis=-1)).astype(np.float32)


def save_submission(path: str | Path, pages: Sequence[np.ndarray]) -> None:
    """Write float32 (H, W) `pages` as one multi-page 32-bit float TIFF marked as predict's."""
    sizes = {p.shape for p in pages}
    if len(sizes) != 1:
        raise InputError(f"--isbi_submission {path}: the images differ in size "
                         f"({', '.join('x'.join(map(str, s[::-1])) for s in sorted(sizes))}); "
                         "a TIFF stack needs one size")
    images = [Image.fromarray(np.ascontiguousarray(p, np.float32)) for p in pages]
    info = {_TIFF_SOFTWARE: MARKER, _TIFF_DESCRIPTION: "P(cell), one page per slice"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write(Path(path), lambda p: images[0].save(p, format="TIFF", save_all=True,
                                                 append_images=images[1:], tiffinfo=info))


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)`; an OS error (a full disk, ...) removes the partial file and is one
    `InputError` naming the path (a write error of its own names no file). A bucket object is
    written locally first and uploaded whole (`paths.staged`: PIL and numpy write local files)."""
    try:
        with paths.staged(path) as local:
            write(local)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write: {storage_error(err)}") from err


def predict_files(segmenter: Segmenter, inputs: Sequence[str | Path], output: str | Path, *,
                  save_logits: bool = False, resize: bool = True, progress: bool = True
                  ) -> Report:
    """Plan (and check) the outputs of every input image, then segment and write them."""
    plans = plan_outputs(inputs, output, save_logits=save_logits)
    return write_predictions(segmenter, plans, resize=resize, progress=progress)


def main(config: Any, argv: Sequence[str]) -> int:
    """Segment the --input images with `config` and --checkpoint; 1 if some were unreadable."""
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    inputs = list(f.input or []) + list(argv[1:])  # `--input a.png b.png` leaves b.png in argv
    if not inputs:
        raise InputError("give at least one --input image or folder")
    plans = plan_outputs(inputs, f.output, save_logits=f.save_logits)  # before loading anything
    submission = (check_submission_path(f.isbi_submission, plans)
                  if f.isbi_submission else None)
    from ml_collections import config_flags
    segmenter = Segmenter.load(config, f.checkpoint,
                               overridden=config_flags.get_override_values(f["config"]))
    report = write_predictions(segmenter, plans, resize=f.resize, submission=submission)
    what = "label maps + overlays" + (" + logits" if f.save_logits else "")
    print(f"wrote {what} of {len(report.written)} image(s) to {paths.to_path(f.output)}")
    if submission is not None and report.written:
        print(f"wrote the ISBI submission (P(cell) of {len(report.written)} image(s) in name "
              f"order) to {submission.absolute()}")
    if not report.failed:
        return 0
    for reason in report.failed.values():
        print(f"unet_jax.predict: skipped {reason}", file=sys.stderr)
    names = [str(p) for p in report.failed]
    shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    print(f"unet_jax.predict: {len(names)} of {len(plans)} images could not be read: {shown}",
          file=sys.stderr)
    return EXIT_SOME_UNREADABLE


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None,
                        "mmseg .pth, weights folder (unet_jax.convert) or training workdir")
    flags.DEFINE_multi_string("input", None, "image file or folder (repeatable; extra "
                              "positional paths are inputs too)")
    flags.DEFINE_string("output", None, "output folder")
    flags.DEFINE_bool("save_logits", False, "also write <stem>_logits.npy (float32 H x W x C)")
    flags.DEFINE_string("isbi_submission", None, "also write P(cell) of every input as one "
                        "32-bit float TIFF stack in name order (the ISBI 2012 submission)")
    flags.DEFINE_bool("resize", True, "keep-ratio resize to data.img_scale as mmseg's test "
                      "pipeline (--noresize: run at the image's own size)")
    flags.mark_flags_as_required(["checkpoint", "output"])


def run() -> None:
    """`python -m unet_jax.predict` / the `unet-jax-predict` console entry."""
    common.run(main, prog="unet_jax.predict", define_flags=_define_flags,
               positionals="IMAGE_OR_FOLDER ... (more --input paths)")


if __name__ == "__main__":
    run()
