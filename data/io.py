"""Learn2Reg displacement files: ``disp_<fixed>_<moving>.nii.gz``, shape ``(*S, n)`` channel-last, voxel
units, on the fixed grid, with the fixed image's affine; and the atomic file writing every output uses.

Atomic writes (:func:`atomic_write_bytes`): the content goes to a hidden temporary file in the target folder,
named ``.<name>.<random>.tmp`` (never ``*.nii.gz``, so no reader globbing for results picks it up), which gets
the permissions the umask allows (as a plain ``open`` would) and is then renamed over the target. A reader
never sees a partial file; a temporary left by an interrupted run is removed by
:func:`remove_stale_temporaries` at the start of the next one.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write_bytes",
    "check_unique_disp_names",
    "disp_filename",
    "displacement_array",
    "gzip_bytes",
    "nifti_bytes",
    "read_displacement",
    "read_displacement_grid",
    "remove_stale_temporaries",
    "write_displacement",
    "write_nifti",
    "write_pair_displacement",
]

#: uncompressed bytes per gzip member of :func:`gzip_bytes` (fixed, so the file does not depend on the threads)
GZIP_MEMBER_BYTES = 8 << 20

#: suffix of the temporary files of :func:`atomic_write_bytes` (hidden: their names start with ``.``)
TEMP_SUFFIX = ".tmp"


def disp_filename(fixed_id: str, moving_id: str) -> str:
    """``disp_<fixed>_<moving>.nii.gz`` (Learn2Reg naming, e.g. ``disp_0001_0002.nii.gz``)."""
    return f"disp_{fixed_id}_{moving_id}.nii.gz"


def check_unique_disp_names(pairs: Sequence[tuple[str, str, str]]) -> None:
    """Refuse a list of pairs ``(fixed_id, moving_id, source)`` in which two pairs would write the same
    displacement file (e.g. two images with the same file name in different folders get the same case id, and
    the second file would overwrite the first): ``ValueError`` naming the file name and the pairs' sources."""
    seen: dict[str, list[str]] = {}
    for fixed_id, moving_id, source in pairs:
        seen.setdefault(disp_filename(fixed_id, moving_id), []).append(source)
    clashes = {name: sources for name, sources in seen.items() if len(sources) > 1}
    if clashes:
        lines = "; ".join(f"{name} <- {' and '.join(src)}" for name, src in list(clashes.items())[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        raise ValueError(
            f"{len(clashes)} displacement file name(s) would be written by more than one pair, so results would "
            f"overwrite each other: {lines}{more}. Case ids come from the file names "
            "(<TASK>_<case>_<modality>.nii.gz): give the images distinct names"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring), creating parent folders; the file
    gets mode ``0o666 & ~umask``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(folders: Iterable[str | Path]) -> list[Path]:
    """Delete the temporaries an interrupted :func:`atomic_write_bytes` (or an older version's
    ``.<name>.<random>.tmp.nii.gz``) left in ``folders`` (not recursive); returns what was removed."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.name.startswith(".") and f.is_file() and (
                    f.name.endswith(TEMP_SUFFIX) or f.name.endswith(".tmp.nii.gz")):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def write_displacement(
    path: str | Path,
    u: torch.Tensor | np.ndarray,
    affine: torch.Tensor | np.ndarray | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write a displacement ``u`` ``(n, *S)`` or ``(1, n, *S)`` (voxel units, fixed grid) as ``(*S, n)``
    NIfTI.

    Args:
        path: the output file (``.nii.gz``); parent folders are created.
        u: the field, channel ``i`` along array axis ``i``.
        affine: ``(4, 4)`` affine of the fixed image (identity when ``None``).
        half: 16-bit storage. NIfTI-1 has no float16 type, so the field is stored as int16 with a
            ``scl_slope`` of ``max|u| / 32767`` (an absolute error below ``max|u| / 65534`` voxels; readers
            that apply the header scaling, as nibabel does, get float values back). Default float32.
    Returns:
        the written path. The file appears atomically (:func:`atomic_write_bytes`), so a reader never sees a
        partial file.
    """
    path = Path(path)
    arr = displacement_array(u)
    if not np.isfinite(arr).all():
        raise ValueError(f"displacement for {path} holds non-finite values")
    data = np.ascontiguousarray(np.moveaxis(arr.astype(np.float32), 0, -1))
    aff = (
        np.eye(4)
        if affine is None
        else np.asarray(
            affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64
        )
    )
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4); got {aff.shape}")
    if half:
        slope = max(float(np.abs(data).max()), 1e-12) / 32767.0
        img = nib.Nifti1Image(np.round(data / slope).astype(np.int16), aff)
        img.header.set_slope_inter(slope, 0.0)
    else:
        img = nib.Nifti1Image(data, aff)
    return atomic_write_bytes(path, nifti_bytes(img, path))


def gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """``data`` as a gzip file: members of :data:`GZIP_MEMBER_BYTES` uncompressed bytes each, compressed in
    parallel (``torch.get_num_threads()`` threads; zlib releases the GIL) and concatenated, which RFC 1952
    (§2.2) allows and every gzip reader decompresses to ``data`` (Python's ``gzip``, zlib's ``gzread`` used by
    ITK and FSL, ``gunzip``). No time stamps: the same ``data`` gives the same bytes whatever the threads."""
    view = memoryview(data)
    chunks = [view[i:i + GZIP_MEMBER_BYTES] for i in range(0, len(view), GZIP_MEMBER_BYTES)] or [view]
    workers = min(len(chunks), max(torch.get_num_threads(), 1))
    if workers == 1:
        return b"".join(gzip.compress(c, compresslevel=level, mtime=0) for c in chunks)
    with ThreadPoolExecutor(workers) as pool:
        return b"".join(pool.map(lambda c: gzip.compress(c, compresslevel=level, mtime=0), chunks))


def nifti_bytes(img: nib.Nifti1Image, path: str | Path) -> bytes:
    """The bytes of ``img`` as a file named ``path`` (units set to mm; gzip-compressed for ``.gz`` names,
    level 1 as nibabel does, by :func:`gzip_bytes`: in parallel, no time stamp, so identical runs write
    identical files)."""
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip_bytes(data)
    return data


def write_nifti(
    path: str | Path,
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    *,
    intent: int | None = None,
) -> Path:
    """Write ``array`` (any shape nibabel stores, in its dtype; e.g. an image ``(*S)`` or an ITK vector field
    ``(X, Y, Z, 1, 3)``) with the voxel-to-world ``affine`` ``(4, 4)`` (mm) to a NIfTI file, atomically
    (:func:`atomic_write_bytes`). ``intent``: the NIfTI intent code to record (e.g. 1007, vector).
    Returns ``path``."""
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    aff = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine,
                     dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine for {path} must be (4, 4); got {aff.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype in (np.int64, np.uint64):  # nibabel refuses 64-bit integers by default; labels fit in 32 bits
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"values for {path} do not fit in int32: [{arr.min()}, {arr.max()}]")
        arr = arr.astype(np.int32)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
    if intent is not None:
        img.header["intent_code"] = int(intent)
    return atomic_write_bytes(path, nifti_bytes(img, path))


def write_pair_displacement(
    out_dir: str | Path,
    u: torch.Tensor | np.ndarray,
    fixed_id: str,
    moving_id: str,
    affine: torch.Tensor | np.ndarray | None = None,
    *,
    half: bool = False,
) -> Path:
    """:func:`write_displacement` to ``out_dir / disp_<fixed_id>_<moving_id>.nii.gz``; returns the path."""
    return write_displacement(Path(out_dir) / disp_filename(fixed_id, moving_id), u, affine, half=half)


def displacement_array(u: torch.Tensor | np.ndarray) -> np.ndarray:
    """A displacement ``(n, *S)`` or ``(1, n, *S)`` (tensor or array, voxel units) as a NumPy array ``(n, *S)``;
    ``ValueError`` for any other shape."""
    arr = u.detach().cpu().numpy() if isinstance(u, torch.Tensor) else np.asarray(u)
    if arr.ndim >= 3 and arr.shape[0] == 1 and arr.shape[1] == arr.ndim - 2:
        arr = arr[0]
    n = arr.ndim - 1
    if n not in (2, 3) or arr.shape[0] != n:
        raise ValueError(f"u must be (n, *S) or (1, n, *S) with n = 2 or 3; got shape {tuple(arr.shape)}")
    return arr


def read_displacement(path: str | Path) -> torch.Tensor:
    """Read a Learn2Reg displacement file ``(*S, n)`` -> ``(n, *S)`` float32 tensor in voxel units."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"displacement file not found: {path}")
    img = nib.load(str(path))
    shape = img.shape
    if len(shape) not in (3, 4) or shape[-1] != len(shape) - 1:
        raise ValueError(
            f"{path}: a displacement must have shape (*S, n) with n = len(S); got {tuple(shape)}"
        )
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))


def read_displacement_grid(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`read_displacement` plus the file's affine: ``(u (n, *S) float32 voxel units, (4, 4) float64
    voxel-to-world affine of the fixed grid)``."""
    u = read_displacement(path)
    return u, np.asarray(nib.load(str(path)).affine, dtype=np.float64)
