"""Tiny retinal datasets written in the official archive layouts or as extracted folders (tests)."""
from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

H, W = 14, 18


def rgb(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """A random RGB uint8 image."""
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def mask(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """A random {0, 255} mask with at least one 255."""
    m = (rng.random((h, w)) > 0.75).astype(np.uint8) * 255
    m[0, 0] = 255
    return m


def enc(ext: str, rgb_or_grey: np.ndarray) -> bytes:
    """Encode an RGB (HxWx3) or grey (HxW) array with OpenCV, `ext` e.g. '.tif'."""
    a = rgb_or_grey[:, :, ::-1] if rgb_or_grey.ndim == 3 else rgb_or_grey
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(a))
    assert ok
    return buf.tobytes()


def pil_bytes(grey: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    """Encode a grey array with Pillow (GIF, 1-bit PNG, TIFF)."""
    im = Image.fromarray(grey)
    if mode == "1":
        im = im.convert("1")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


Files = dict[str, bytes]
# (archive name, which folder-form paths it holds, member name of a path, gzip members)
Rule = tuple[str, Callable[[str], bool], Callable[[str], str], bool]


def drive(rng: np.random.Generator) -> tuple[Files, list[Rule], dict[str, list[str]]]:
    files: Files = {}
    for part, ids in (("training", range(21, 41)), ("test", range(1, 21))):
        for i in ids:
            files[f"{part}/images/{i:02d}_{part}.tif"] = enc(".tif", rgb(rng))
            files[f"{part}/1st_manual/{i:02d}_manual1.gif"] = pil_bytes(mask(rng), "GIF")
            files[f"{part}/mask/{i:02d}_{part}_mask.gif"] = pil_bytes(mask(rng), "GIF")
            if part == "test":
                files[f"test/2nd_manual/{i:02d}_manual2.gif"] = pil_bytes(mask(rng), "GIF")
    rules = [(f"{p}.zip", (lambda q, p=p: q.startswith(p + "/")), (lambda q: q), False)
             for p in ("training", "test")]
    splits = {"train": [f"{i}" for i in range(21, 41)],
              "validation": [f"{i:02d}" for i in range(1, 21)]}
    return files, rules, splits


STARE_IDS = ["0001", "0002", "0003", "0004", "0005", "0044", "0077", "0081", "0082", "0139",
             "0162", "0163", "0235", "0236", "0239", "0240", "0255", "0291", "0319", "0324"]


def stare(rng: np.random.Generator) -> tuple[Files, list[Rule], dict[str, list[str]]]:
    files: Files = {}
    for i in STARE_IDS:
        files[f"stare-images/im{i}.ppm"] = enc(".ppm", rgb(rng))
        files[f"labels-ah/im{i}.ah.ppm"] = enc(".pgm", mask(rng))
        files[f"labels-vk/im{i}.vk.ppm"] = enc(".pgm", mask(rng))
    rules = [(f"{d}.tar", (lambda q, d=d: q.startswith(d + "/")),
              (lambda q: q.rsplit("/", 1)[1] + ".gz"), True)
             for d in ("stare-images", "labels-ah", "labels-vk")]
    names = [f"im{i}" for i in STARE_IDS]
    return files, rules, {"train": names[:10], "validation": names[10:]}


def chase(rng: np.random.Generator) -> tuple[Files, list[Rule], dict[str, list[str]]]:
    files: Files = {}
    names = [f"Image_{i:02d}{s}" for i in range(1, 15) for s in "LR"]
    for n in names:
        files[f"{n}.jpg"] = enc(".jpg", rgb(rng))
        files[f"{n}_1stHO.png"] = pil_bytes(mask(rng), "PNG", mode="1")
        files[f"{n}_2ndHO.png"] = pil_bytes(mask(rng), "PNG", mode="1")
    rules = [("CHASEDB1.zip", lambda q: True, lambda q: q, False)]
    return files, rules, {"train": names[:20], "validation": names[20:]}


HRF_CATEGORIES = (("healthy", "h", "jpg"), ("glaucoma", "g", "jpg"),
                  ("diabetic_retinopathy", "dr", "JPG"))


def hrf(rng: np.random.Generator) -> tuple[Files, list[Rule], dict[str, list[str]]]:
    files: Files = {}
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    rules: list[Rule] = []
    for cat, s, ext in HRF_CATEGORIES:
        names = [f"{i:02d}_{s}" for i in range(1, 16)]
        for n in names:
            files[f"images/{n}.{ext}"] = enc(".jpg", rgb(rng))
            files[f"manual1/{n}.tif"] = pil_bytes(mask(rng), "TIFF")
            files[f"mask/{n}_mask.tif"] = pil_bytes(mask(rng), "TIFF")
        splits["train"] += names[:5]
        splits["validation"] += names[5:]
        base = lambda q: q.rsplit("/", 1)[1]  # noqa: E731
        rules += [
            (f"{cat}.zip", (lambda q, s=s: q.startswith("images/") and f"_{s}." in q), base, False),
            (f"{cat}_manualsegm.zip", (lambda q, s=s: q.startswith("manual1/") and f"_{s}." in q),
             base, False),
            (f"{cat}_fovmask.zip", (lambda q, s=s: q.startswith("mask/") and f"_{s}_" in q),
             base, False),
        ]
    return files, rules, splits


MAKERS = {"drive": drive, "stare": stare, "chase_db1": chase, "hrf": hrf}


def write_folders(root: Path, files: Files) -> Path:
    """The extracted layout."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def write_archives(root: Path, files: Files, rules: list[Rule]) -> Path:
    """The official archives."""
    root.mkdir(parents=True, exist_ok=True)
    for name, holds, member, gz in rules:
        chosen = sorted(rel for rel in files if holds(rel))
        if name.endswith(".zip"):
            with zipfile.ZipFile(root / name, "w") as z:
                for rel in chosen:
                    z.writestr(member(rel), files[rel])
        else:
            with tarfile.open(root / name, "w") as t:
                for rel in chosen:
                    data = gzip.compress(files[rel]) if gz else files[rel]
                    info = tarfile.TarInfo(member(rel))
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return root


# The red-channel thresholds of the datasets without FOV masks (data/README.md).
RED_FOV_THRESHOLD = {"stare": 40, "chase_db1": 20}


def _binary(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return (np.asarray(im.convert("L")) >= 128).astype(np.uint8)


def expected_examples(files: Files, dataset: str
                      ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """name -> (RGB image as OpenCV decodes it, label 0/1, FOV 0/1) for the files of a fixture:
    the official mask (DRIVE, HRF) or red channel > RED_FOV_THRESHOLD (STARE, CHASE_DB1)."""
    out = {}
    for rel, data in files.items():
        base = rel.rsplit("/", 1)[-1]
        mask_rel = None
        if dataset == "drive" and "/images/" in rel:
            name, part = base.split("_")[0], rel.split("/", 1)[0]
            label_rel = f"{part}/1st_manual/{name}_manual1.gif"
            mask_rel = f"{part}/mask/{name}_{part}_mask.gif"
        elif dataset == "stare" and rel.startswith("stare-images/"):
            name = base[:-4]
            label_rel = f"labels-ah/{name}.ah.ppm"
        elif dataset == "chase_db1" and base.endswith(".jpg"):
            name = base[:-4]
            label_rel = f"{name}_1stHO.png"
        elif dataset == "hrf" and rel.startswith("images/"):
            name = base.rsplit(".", 1)[0]
            label_rel = f"manual1/{name}.tif"
            mask_rel = f"mask/{name}_mask.tif"
        else:
            continue
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        fov = (_binary(files[mask_rel]) if mask_rel else
               (image[:, :, 0] > RED_FOV_THRESHOLD[dataset]).astype(np.uint8))
        out[name] = (image, _binary(files[label_rel]), fov)
    return out
