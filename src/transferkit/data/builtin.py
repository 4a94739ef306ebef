"""`write_builtin`: materialise a built-in dataset as a byte-reproducible PNG tree: argument checks, the seeded per-class draw (labelled, unlabelled pool, optional train imbalance), the train/val/test plan, and the guarded rewrite of an earlier tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.data.arrays import BuiltinSource, UnusableSource, array_source
from transferkit.data.clipart import clipart_source
from transferkit.data.folder import UNLABELLED_DIR, DataError


def _draw(src: BuiltinSource, order: list, want: int | None, ready: dict) -> list:
    """The first `want` usable keys of `order` (all with None); file sources are decoded here."""
    if not src.from_files:
        return list(order if want is None else order[:want])
    drawn = []
    for key in order:
        if want is not None and len(drawn) == want:
            break
        try:
            ready[key] = src.encode(key)
        except UnusableSource as e:
            src.skipped.append({"path": str(key), "reason": str(e)})
            continue
        drawn.append(key)
    return drawn


def write_builtin(
    name: str,
    out: str | Path,
    per_class: int | None = None,
    size: int = 32,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
    unlabelled_per_class: int = 0,
    fit: bool = False,
    imbalance: float | None = None,
) -> dict:
    """Materialise a built-in dataset as PNGs, byte-for-byte the same on every run.

    With `train_per_class` the tree gets train/val/test folders: `train_per_class` images per class
    in train, `val_per_class` (default: same) in val, the rest of `per_class` in test.
    `unlabelled_per_class` further images per class (never among the labelled ones) go to
    OUT/unlabelled/, shuffled across classes and numbered so that no name or order gives a label away.
    Source files that cannot be used are listed in the result's `skipped` (path and reason).
    `fit` size-normalises each image (`fit_box`; the grey datasets only).
    `imbalance` (needs `train_per_class`): train class sizes decay geometrically from `train_per_class` to
    `train_per_class / imbalance` (transferkit.imbalance); val/test stay balanced, the same images as without.
    The result's `unlabelled_labels` (class name per OUT/unlabelled/ file, in name order) is for benchmarks.
    """
    _check_builtin_args(name, size, per_class, unlabelled_per_class, fit, imbalance, train_per_class)
    src = clipart_source(size) if name == "clipart" else array_source(name, size, fit)
    train_sizes = _imbalanced_train_sizes(imbalance, train_per_class, len(src.classes))
    out = Path(out)
    ready: dict = {}  # key -> PNG bytes made while drawing (file sources)
    rng = np.random.default_rng(seed)
    plan: list[tuple[Path, object]] = []
    pool: list = []
    pool_class: list[str] = []
    for c, cname in enumerate(src.classes):
        labelled, unlabelled = _draw_class(name, src, c, rng, per_class, unlabelled_per_class, ready)
        pool += unlabelled
        plan += _class_plan(name, src, cname, labelled, out, train_per_class, val_per_class, train_sizes, c)
        pool_class += [cname] * len(unlabelled)
    n_labelled = len(plan)
    pool_plan, pool_labels = _pool_plan(out, pool, pool_class, seed)
    plan += pool_plan

    _clear_builtin_out(out)
    _write_plan(name, src, plan, ready, progress)
    info = {
        "dataset": name,
        "out": str(out),
        "images": n_labelled,
        "unlabelled": len(pool),
        "classes": src.classes,
        "size": size,
        "fit": fit,
        "imbalance": imbalance,
        "skipped": src.skipped,
        "unlabelled_labels": pool_labels,
    }
    if src.from_files:
        info["sources"] = {p.relative_to(out).as_posix(): src.describe(k) for p, k in plan}
    return info


def _pool_plan(out: Path, pool: list, pool_class: list[str], seed: int) -> tuple[list, list[str]]:
    """(path, key) of the unlabelled pool and each one's class. One shuffle across classes: neither the names nor
    the order of OUT/unlabelled/ tell the label."""
    order = np.random.default_rng([seed, 1]).permutation(len(pool))
    plan = [(out / UNLABELLED_DIR / f"{j:05d}.png", pool[i]) for j, i in enumerate(order)]
    return plan, [pool_class[i] for i in order]


def _imbalanced_train_sizes(ratio: float | None, train_per_class: int | None, n_classes: int) -> list[int] | None:
    """Per-class train sizes of `--imbalance RATIO` (None: every class gets train_per_class)."""
    if ratio is None:
        return None
    if train_per_class is None:
        raise DataError("--imbalance needs --train-per-class (it decays the train split only)")
    if not ratio >= 1 or ratio > 1000:
        raise DataError(f"--imbalance must be a ratio from 1 to 1000 (largest / smallest train class), got {ratio}")
    from transferkit.core.imbalance import imbalanced_counts

    return imbalanced_counts(train_per_class, ratio, n_classes)


def _check_builtin_args(
    name: str, size: int, per_class: int | None, unlabelled_per_class: int, fit: bool, imbalance, train_per_class
) -> None:
    """Refuse bad arguments before reading any source."""
    if fit and name == "clipart":
        raise DataError("--fit applies to the grey datasets (mnist, digits, fashion-mnist), not clipart")
    _imbalanced_train_sizes(imbalance, train_per_class, 1)
    if size < 8 or size > 512:
        raise DataError(f"--size must be between 8 and 512 px, got {size}")
    if per_class is not None and per_class < 1:
        raise DataError(f"--per-class must be >= 1, got {per_class}")
    if unlabelled_per_class < 0:
        raise DataError(f"--unlabelled-per-class must be >= 0, got {unlabelled_per_class}")


def _draw_class(
    name: str, src: BuiltinSource, c: int, rng, per_class: int | None, n_unl: int, ready: dict
) -> tuple[list, list]:
    """Class `c`'s labelled keys and its share of the unlabelled pool, in the order `rng` gives.

    Without `per_class` every usable candidate is labelled except the last `n_unl`.
    """
    cands = src.candidates[c]
    order = [cands[j] for j in rng.permutation(len(cands))]
    before = len(src.skipped)
    drawn = _draw(src, order, None if per_class is None else per_class + n_unl, ready)
    n_lab = len(drawn) - n_unl if per_class is None else per_class
    if n_lab < 1 or len(drawn) < n_lab + n_unl:  # then every candidate was drawn
        asks = f"--per-class asks {per_class}" if per_class is not None else "1 labelled"
        bad = src.skipped[before:]
        raise DataError(
            f"{name}: class {src.classes[c]!r} has {len(drawn)} images, {asks}"
            + (f" + --unlabelled-per-class {n_unl}" if n_unl else "")
            + (f" ({len(bad)} more unusable, e.g. {bad[0]['path']}: {bad[0]['reason']})" if bad else "")
        )
    return drawn[:n_lab], drawn[n_lab : n_lab + n_unl]


def _class_plan(
    name: str,
    src: BuiltinSource,
    cname: str,
    labelled: list,
    out: Path,
    train_per_class: int | None,
    val_per_class: int | None,
    train_sizes: list[int] | None = None,
    c: int = 0,
) -> list[tuple[Path, object]]:
    """(path, key) for one class's labelled images: OUT/<class>/, or OUT/<split>/<class>/ with train_per_class
    (the first `train_sizes[c]` of its train images only, with --imbalance)."""
    if train_per_class is None:
        return [(out / cname / f"{src.stem(k)}.png", k) for k in labelled]
    n_val = train_per_class if val_per_class is None else val_per_class
    if train_per_class + n_val >= len(labelled):
        raise DataError(
            f"{name}: class {cname!r}: {len(labelled)} images cannot give {train_per_class} train + "
            f"{n_val} val and a non-empty test split"
        )
    parts = {
        "train": labelled[: train_per_class if train_sizes is None else train_sizes[c]],
        "val": labelled[train_per_class : train_per_class + n_val],
        "test": labelled[train_per_class + n_val :],
    }
    return [(out / split / cname / f"{src.stem(k)}.png", k) for split, keys in parts.items() for k in keys]


def _clear_builtin_out(out: Path) -> None:
    """Remove an earlier built-in tree at `out`; refuse a folder holding anything else."""
    if out.exists() and any(out.iterdir()):
        # Stale PNGs from a different --per-class would change the md5, so the tree is rewritten;
        # but only a tree that looks like ours (PNGs in class or split/class folders) is removed.
        import shutil

        foreign = [
            p for p in out.rglob("*") if p.is_file() and (p.suffix != ".png" or len(p.relative_to(out).parts) > 3)
        ]
        if foreign or not out.is_dir():
            raise DataError(
                f"refusing to overwrite {out}: it holds files that are not a built-in dataset "
                f"(e.g. {foreign[0] if foreign else out}); choose an empty or new --out"
            )
        shutil.rmtree(out)


def _write_plan(name: str, src: BuiltinSource, plan: list[tuple[Path, object]], ready: dict, progress: bool) -> None:
    from tqdm import tqdm

    for path, key in tqdm(plan, desc=f"writing {name}", unit="img", disable=not progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ready.pop(key) if key in ready else src.encode(key))
