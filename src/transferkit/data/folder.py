"""The validating ImageFolder reader: DIR/{train,val,test}/<class>/<image>, DIR/<class>/<image> or a flat unlabelled folder, scanned into a `Dataset` with skipped files and their reasons, missing val/test split off train (stratified, seeded), and `DataError` for input that cannot be used. The module docstring's contract table belongs here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import TransferkitError
from transferkit.core.io import files_md5
from transferkit.data.images import IMAGE_EXTENSIONS, check_image

SPLITS = ("train", "val", "test")
UNLABELLED_DIR = "unlabelled"  # top-level pool of images without labels (never a class)


class DataError(TransferkitError, ValueError):
    """Input data that cannot be used; the message names the offending path."""


# --------------------------------------------------------------------------- reading folders


@dataclass
class Dataset:
    """A validated image folder. Samples are (path, label); label is -1 when unlabelled."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    skipped: list[dict] = field(default_factory=list)
    md5: str = ""
    labelled: bool = True
    split_source: dict[str, str] = field(default_factory=dict)  # split -> "folder" | "split off train"
    unlabelled: list[Path] = field(default_factory=list)  # DIR/unlabelled/*: for self-training, never a split

    def all_samples(self) -> list[tuple[Path, int]]:
        return [s for name in SPLITS for s in self.splits.get(name, [])]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, samples in self.splits.items():
            labels = np.array([y for _, y in samples], dtype=np.int64)
            if self.labelled:
                out[name] = {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}
            else:
                out[name] = {"unlabelled": len(samples)}
        return out

    def min_per_class(self, split: str = "train") -> int:
        return min(self.counts()[split].values()) if self.labelled else 0

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "md5": self.md5,
            "labelled": self.labelled,
            "classes": self.classes,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "split_source": self.split_source,
            "unlabelled": len(self.unlabelled),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped[:50],
        }


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _undecodable(p: Path) -> bool:
    """A name whose bytes are not UTF-8 (Python carries them as surrogates that cannot be encoded)."""
    try:
        p.name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(p: Path) -> str:
    """The path as printable text: undecodable bytes as \\xNN (plain paths are unchanged)."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _scan_images(folder: Path, skipped: list[dict], report_folders: bool = False) -> list[Path]:
    good = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if report_folders:
                skipped.append({"path": _shown(p), "reason": "folder inside a flat image folder (not read)"})
            continue
        if _undecodable(p):
            skipped.append({"path": _shown(p), "reason": "file name is not valid UTF-8"})
            continue
        if _is_hidden(p) or p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": _shown(p), "reason": "not an image file (extension)"})
            continue
        if not p.is_file():  # opening a named pipe would block for ever
            skipped.append({"path": _shown(p), "reason": "not a regular file (named pipe, socket or device)"})
            continue
        reason = check_image(p)
        if reason:
            skipped.append({"path": _shown(p), "reason": reason})
        else:
            good.append(p)
    return good


def _scan_classes(split_dir: Path, skipped: list[dict], top: bool = False) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    real: dict[Path, str] = {}  # resolved folder -> class: a link to another class would label its images twice
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p)):
        if top and d.name == UNLABELLED_DIR:
            continue  # the unlabelled pool, read by load_dataset
        if d.resolve() in real:
            raise DataError(
                f"{split_dir}: class folders {real[d.resolve()]!r} and {d.name!r} are one folder (a link): "
                "its images would carry two labels"
            )
        real[d.resolve()] = d.name
        if _undecodable(d):
            skipped.append({"path": _shown(d), "reason": "folder name is not valid UTF-8 (not used as a class)"})
            continue
        imgs = _scan_images(d, skipped)
        if not imgs:
            raise DataError(f"class folder has no readable images: {d}")
        classes[d.name] = imgs
    for p in split_dir.iterdir():  # stray files next to class folders
        if p.is_file():
            skipped.append({"path": _shown(p), "reason": "file outside any class folder"})
    return classes


def load_with_params(root: str | Path, params, *, seed: int | None = None, **kwargs) -> Dataset:
    """`load_dataset` with the split of PARAMS (`seed`, `data.val_fraction`, `data.test_fraction`): every stage
    must split a folder the same way. `seed` overrides params.seed (a run's recorded seed); kwargs pass on."""
    return load_dataset(
        root,
        seed=params.seed if seed is None else seed,
        val_fraction=params.data.val_fraction,
        test_fraction=params.data.test_fraction,
        **kwargs,
    )


def load_dataset(
    root: str | Path,
    *,
    require_labels: bool = True,
    min_classes: int = 2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_missing: bool = True,
) -> Dataset:
    """Scan and validate an image folder; split off val/test when missing (stratified, seeded).

    `split_missing=False` keeps every image in the splits found (drift needs no val/test).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    skipped: list[dict] = []
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p)} - {UNLABELLED_DIR}
    pool_dir = root / UNLABELLED_DIR
    pool = _scan_images(pool_dir, skipped, report_folders=True) if pool_dir.is_dir() else []
    if not subdirs:
        return _flat_dataset(root, skipped, pool, require_labels)

    per_split = _scan_labelled(root, subdirs, skipped)
    classes = _train_classes(root, per_split, subdirs, min_classes)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(p, index[c]) for c in sorted(cl) for p in cl[c]] for s, cl in per_split.items()}
    source = {s: "folder" for s in splits}
    missing = [s for s in ("val", "test") if s not in splits]
    if missing and split_missing:
        fractions = {"val": val_fraction, "test": test_fraction}
        splits.update(_stratified_split(splits, missing, fractions, classes, seed, root))
        source.update({s: "split off train" for s in missing})
    all_paths = [p for samples in splits.values() for p, _ in samples]
    ds = Dataset(root, classes, splits, skipped, labelled=True, split_source=source, unlabelled=pool)
    ds.md5 = files_md5(all_paths + pool, root)
    return ds


def _flat_dataset(root: Path, skipped: list[dict], pool: list[Path], require_labels: bool) -> Dataset:
    """Images directly in `root`: one unlabelled train split (valid for drift only)."""
    imgs = _scan_images(root, skipped)
    if not imgs:
        raise DataError(f"no readable images in {root} ({len(skipped)} files skipped)")
    if require_labels:
        raise DataError(f"{root} holds images but no class folders: labelled data must be DIR/<class>/<image>")
    ds = Dataset(
        root,
        [],
        {"train": [(p, -1) for p in imgs]},
        skipped,
        labelled=False,
        split_source={"train": "folder"},
        unlabelled=pool,
    )
    ds.md5 = files_md5(imgs + pool, root)
    return ds


def _scan_labelled(root: Path, subdirs: set[str], skipped: list[dict]) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> images, for DIR/{train,val,test}/<class>/ or DIR/<class>/ (taken as train)."""
    if not subdirs & set(SPLITS):
        return {"train": _scan_classes(root, skipped, top=True)}
    per_split = {s: _scan_classes(root / s, skipped) for s in SPLITS if (root / s).is_dir()}
    for p in root.iterdir():
        if p.is_file():
            skipped.append({"path": _shown(p), "reason": "file outside the split folders"})
    if "train" not in per_split:
        raise DataError(f"{root} has {sorted(per_split)} split folders but no train/")
    return per_split


def _train_classes(
    root: Path, per_split: dict[str, dict[str, list[Path]]], subdirs: set[str], min_classes: int
) -> list[str]:
    """The sorted classes of train; every other split must use only these, and there must be enough."""
    classes = sorted(per_split["train"])
    if not classes:
        raise DataError(f"no class folders with images in {root / 'train' if 'val' in subdirs else root}")
    for s, cl in per_split.items():
        extra = sorted(set(cl) - set(classes))
        if extra:
            raise DataError(f"{root / s}: classes {extra} do not appear in train")
    if len(classes) < min_classes:
        raise DataError(f"{root}: found {len(classes)} class(es) {classes}; at least {min_classes} are needed")
    return classes


def _stratified_split(
    splits: dict[str, list[tuple[Path, int]]],
    missing: list[str],
    fractions: dict[str, float],
    classes: list[str],
    seed: int,
    root: Path,
) -> dict[str, list[tuple[Path, int]]]:
    rng = np.random.default_rng(seed)
    train = splits["train"]
    new_train: list[tuple[Path, int]] = []
    parts: dict[str, list[tuple[Path, int]]] = {s: [] for s in missing}
    for ci, cname in enumerate(classes):
        items = [s for s in train if s[1] == ci]
        need = len(missing) + 1
        if len(items) < need:
            raise DataError(
                f"{root}: class {cname!r} has {len(items)} image(s); splitting off {'/'.join(missing)} "
                f"needs at least {need} (or provide {'/'.join(missing)} folders)"
            )
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        start = 0
        for s in missing:
            n = min(max(1, round(fractions[s] * len(items))), len(items) - start - 1)
            parts[s] += items[start : start + n]
            start += n
        new_train += items[start:]
    return {"train": new_train, **parts}
