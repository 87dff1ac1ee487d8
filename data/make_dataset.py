"""Write a Learn2Reg ``<TASK>_dataset.json`` for a folder of NIfTI images (and optional label / mask folders).

    python -m data.make_dataset my_images/ --labels my_labels/ --modality MR --val 4 \\
        --out my_task/Own_dataset.json

The JSON names the files where they are (paths relative to the JSON's folder; nothing is copied). Every image
is a ``training`` entry (with its ``label`` / ``mask`` named explicitly); the last ``--val`` images in sorted
order (or a seeded random choice with ``--shuffle``) form the ``registration_val`` pairs, each validation image
registered to the next one and the last to the first. :class:`data.datamodule.RegistrationDataModule` uses those
pairs for val and test and trains on the pairs of the other subjects (all ordered pairs of distinct images,
inter-subject). ``labels`` lists every label value found in the label maps.

Matching: a label map or mask belongs to the image with the same file name, or else with the same case id
(:func:`data.learn2reg_task.case_id`: ``0001`` for ``Task_0001_0000.nii.gz``, the file stem otherwise). Case ids
must be unique (they name the displacement files). Images without a label map are listed without one (and
counted in the summary).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .io import atomic_write_bytes
from .learn2reg_task import case_id
from .nifti import read_header
from .pair_files import file_ndim

__all__ = ["find_images", "main", "make_dataset", "write_dataset"]

log = logging.getLogger(__name__)

_EXTENSIONS = (".nii.gz", ".nii")


def find_images(folder: str | Path) -> list[Path]:
    """The ``.nii`` / ``.nii.gz`` files directly in ``folder``, sorted by name (hidden files skipped);
    ``FileNotFoundError`` / ``NotADirectoryError`` naming the folder."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith(_EXTENSIONS))


def _match(images: Sequence[Path], folder: Path | None, what: str) -> dict[Path, Path]:
    """``image -> companion`` for the files of ``folder`` (same file name, else same case id)."""
    if folder is None:
        return {}
    files = find_images(folder)
    if not files:
        raise ValueError(f"--{what} folder {folder} holds no .nii / .nii.gz files")
    by_name = {p.name: p for p in files}
    by_case: dict[str, list[Path]] = {}
    for p in files:
        by_case.setdefault(case_id(p), []).append(p)
    out = {}
    for img in images:
        if img.name in by_name:
            out[img] = by_name[img.name]
        elif len(by_case.get(case_id(img), [])) == 1:
            out[img] = by_case[case_id(img)][0]
    if not out:
        raise ValueError(f"no file in --{what} folder {folder} matches an image by file name or case id "
                         f"(e.g. image {images[0].name}, {what} {files[0].name})")
    return out


def make_dataset(
    images: str | Path,
    json_path: str | Path,
    *,
    labels: str | Path | None = None,
    masks: str | Path | None = None,
    name: str | None = None,
    modality: str = "MR",
    val: int = 2,
    shuffle: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """The Learn2Reg dataset dict for the images in ``images`` (see the module docstring).

    Args:
        images: folder of the images (all 2D or all 3D).
        json_path: where the JSON will be written (paths in it are relative to its folder).
        labels, masks: optional folders of label maps / masks.
        name: the task name (default: the JSON file name without ``_dataset.json``).
        modality: the JSON ``modality`` entry (``CT``, ``MR``, ...; ``intensity: auto`` normalises by it).
        val: images held out for the ``registration_val`` pairs (0: none; then the data module splits subjects
            by fraction).
        shuffle: choose the validation images at random (seeded by ``seed``) instead of the last ones.
    Returns:
        the JSON dict. ``ValueError`` names the problem: no images, mixed dimensionality, duplicate case ids,
        ``val`` out of range, companions that match no image or differ from their image's shape.
    """
    json_path = Path(json_path)
    files = find_images(images)
    if len(files) < 2:
        raise ValueError(f"{images}: need at least two .nii / .nii.gz images; found {len(files)}")
    ids: dict[str, list[str]] = {}
    for f in files:
        ids.setdefault(case_id(f), []).append(f.name)
    dupes = {k: v for k, v in ids.items() if len(v) > 1}
    if dupes:
        raise ValueError(f"case ids must be unique (they name the displacement files); clashes: {dupes}")
    if not 0 <= int(val) <= len(files) - 2 or int(val) == 1:
        raise ValueError(f"--val must be 0 or between 2 and {len(files) - 2} (images: {len(files)}); got {val}")
    ndim = file_ndim(files[0])
    headers = {}
    for f in files:
        try:
            headers[f] = read_header(f, ndim)
        except ValueError as exc:
            raise ValueError(f"{exc} (all images must be {ndim}D like {files[0].name})") from None
    label_of, mask_of = _match(files, _opt(labels), "labels"), _match(files, _opt(masks), "masks")
    root = json_path.parent.resolve()

    def rel(p: Path) -> str:
        return os.path.relpath(p.resolve(), root).replace(os.sep, "/")

    label_values: set[int] = set()
    training = []
    for f in files:
        entry = {"image": rel(f)}
        for key, table in (("label", label_of), ("mask", mask_of)):
            if f in table:
                shape = read_header(table[f], ndim)[0]
                if shape != headers[f][0]:
                    raise ValueError(f"{key} {table[f]} has shape {shape} but its image {f} has {headers[f][0]}")
                entry[key] = rel(table[f])
        if f in label_of:
            values = np.unique(np.asanyarray(nib.load(str(label_of[f])).dataobj))
            label_values.update(int(v) for v in values if float(v) == int(v))
        training.append(entry)
    order = list(range(len(files)))
    if shuffle:
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(files))]
    held = sorted(order[len(files) - int(val):]) if val else []
    pairs = [{"fixed": rel(files[held[i]]), "moving": rel(files[held[(i + 1) % len(held)]])}
             for i in range(len(held))]
    shapes = {headers[f][0] for f in files}
    task = {
        "name": name or json_path.name.replace("_dataset.json", "").replace(".json", ""),
        "description": f"written by python -m data.make_dataset from {Path(images)}",
        "tensorImageSize": {"0": f"{ndim}D"},
        "modality": {"0": modality},
        "labels": {str(v): ("background" if v == 0 else str(v)) for v in sorted(label_values | {0})}
        if label_values else {},
        "registration_direction": {"fixed": 0, "moving": 0},
        "pairings": "unpaired",
        "numTraining": len(training),
        "training": training,
        "numRegistration_val": len(pairs),
        "registration_val": pairs,
    }
    if len(shapes) == 1:
        task["tensorImageShape"] = {"0": list(next(iter(shapes)))}
    return task


def _opt(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path)


def write_dataset(task: dict[str, Any], json_path: str | Path, overwrite: bool = False) -> Path:
    """Write ``task`` to ``json_path`` atomically; an existing file is refused (``FileExistsError``) unless
    ``overwrite``."""
    json_path = Path(json_path)
    if json_path.exists() and not overwrite:
        raise FileExistsError(f"--out {json_path} exists; pass --overwrite to replace it")
    return atomic_write_bytes(json_path, (json.dumps(task, indent=2) + "\n").encode())


def _summary(task: dict[str, Any], json_path: Path, shapes: set[tuple[int, ...]]) -> str:
    n = len(task["training"])
    n_lab = sum("label" in e for e in task["training"])
    n_mask = sum("mask" in e for e in task["training"])
    lines = [f"wrote {json_path}: {n} images ({n_lab} with labels, {n_mask} with masks), "
             f"{len(task['registration_val'])} validation pairs, labels {sorted(int(k) for k in task['labels'])}"]
    if len(shapes) > 1:
        lines.append(f"the images have {len(shapes)} different shapes: set data.target_shape (e.g. "
                     f"{list(max(shapes))}) or data.target_spacing in the training config to resample them")
    if any(int(v) % 16 for shape in shapes for v in shape):
        lines.append("some image axes are not multiples of 16, which the semantic U-Net of "
                     "configs/hippocampus3d.yaml needs: set data.target_shape (e.g. [64, 64, 64]) for that recipe")
    if n_lab < n:
        lines.append(f"{n - n_lab} images have no label map: label-supervised training needs labels on every "
                     "training image (data.require_labels: true refuses pairs without)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m data.make_dataset``: returns the exit status (0 written, 2 refused with a message)."""
    p = argparse.ArgumentParser(prog="python -m data.make_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of .nii / .nii.gz images")
    p.add_argument("--out", required=True, help="the JSON to write, e.g. my_task/Own_dataset.json")
    p.add_argument("--labels", help="folder of label maps (same file names or case ids as the images)")
    p.add_argument("--masks", help="folder of masks")
    p.add_argument("--name", help="task name (default: from --out)")
    p.add_argument("--modality", default="MR", help="CT, MR, ... (default MR)")
    p.add_argument("--val", type=int, default=2, help="images held out for validation pairs (default 2)")
    p.add_argument("--shuffle", action="store_true", help="pick the validation images at random (--seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
        task = make_dataset(args.images, out, labels=args.labels, masks=args.masks, name=args.name,
                            modality=args.modality, val=args.val, shuffle=args.shuffle, seed=args.seed)
        write_dataset(task, out, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"make_dataset: error: {exc}\n")
        return 2
    ndim = int(task["tensorImageSize"]["0"][0])
    shapes = {read_header(out.parent / e["image"], ndim)[0] for e in task["training"]}
    sys.stdout.write(_summary(task, out, shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
