"""Train a domain-related source model and register it in the local zoo, so `select` can rank it.

    transferkit data builtin mnist --out data/mnist --per-class 200 --size 32
    transferkit pretrain --data data/mnist --model mobilenetv2_100 --set data.image_size=64 --set train.epochs=3
    transferkit select --target data/target --candidates zoo:mobilenetv2_100-mnist,mobilenetv2_100,...

The source model is trained by `train.run_train` on the source dataset (ImageNet init, fine-tuning every
layer; or `scratch:ARCH`, random init) and keeps its source classification head, so LEEP applies to
it. The registry entry (`zoo.registry_dir()/NAME/`) holds model.safetensors, card.json (sha256 pin,
architecture, init weights, dataset path + md5 + classes, accuracies, train/data params) and card.md;
`zoo:NAME` loads only if the file still has the pinned sha256.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path

from transferkit.core.config import Params


def default_name(model: str, data: Path) -> str:
    """`<arch>-<dataset folder>`, e.g. mobilenetv2_100-mnist (scratch inits get a `-scratch` suffix)."""
    arch = model.split(":", 1)[1] if model.startswith("scratch:") else model
    from transferkit.modelrepo.repository import sanitize_name

    stem = sanitize_name(Path(data).resolve().name, lower=False, sep="-", default="data")
    return f"{arch}-{stem}" + ("-scratch" if model.startswith("scratch:") else "")


def run_pretrain(
    data: Path,
    model: str,
    params: Params,
    name: str | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train `model` on the labelled source dataset `data` and register it as `zoo:NAME`; returns the card.

    `out` keeps the full training run folder (metrics.json, history.csv, params.yaml, checkpoint);
    without it the run goes to a temporary folder and only the registry entry remains.
    """
    from transferkit.models import registry
    from transferkit.train.stage import run_train

    name, strategy = _check_request(model, data, name, force)
    tmp = None
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="transferkit-pretrain-"))
    run = Path(out) if out is not None else tmp
    try:
        m = run_train(Path(data), run, params, model, strategy=strategy, progress=progress)
        card = _card(model, strategy, Path(data), m, params, run if out is not None else None)
        card = registry.register(name, run / "model.safetensors", card, card_markdown, force=force)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    from transferkit.models.embed import source_model

    source_model.cache_clear()  # a re-registered name must not be served from this process's model memo
    return card


def _check_request(model: str, data: Path, name: str | None, force: bool) -> tuple[str, str]:
    """The registry name and training strategy; every refusal comes here, before any training."""
    from transferkit.models import catalog, registry, zoo

    name = registry.check_name(name or default_name(model, data))
    if (registry.registry_dir() / name / "card.json").is_file() and not force:
        raise registry.ZooError(
            f"zoo:{name} is already registered in {registry.registry_dir() / name}; choose another --name or pass --force"
        )
    init = zoo.parse_spec(model)
    if init.kind == "zoo":
        raise registry.ZooError(f"--model {model!r}: start from an ImageNet model, a timm name or scratch:ARCH")
    ok, detail = catalog.availability(model)
    if not ok:
        raise registry.ZooError(f"--model {model!r} is not available here: {detail}")
    return name, "scratch" if init.kind == "scratch" else "full"  # a source model needs its own features


def _card(model: str, strategy: str, data: Path, m: dict, params: Params, run: Path | None) -> dict:
    """The card fields known before registering (`zoo.register` adds name, arch and the weights' sha256).

    `run` is the kept run folder, None when the run was temporary.
    """
    return {
        "init": model,
        "init_sha256": m.get("source_sha256") or _init_sha(model),
        "strategy": strategy,
        "trained_on": {
            "dataset": data.resolve().name,
            "path": str(data.resolve()),
            "data_md5": m["data_md5"],
            "classes": m["classes"],
            "n_train": m["n_train"],
            "n_val": m["n_val"],
            "n_test": m["n_test"],
        },
        "image_size": m["image_size"],
        "accuracy": {"train": m["train_accuracy"], "val": m["val_accuracy"], "test": m["test_accuracy"]},
        "epochs": m["epochs"],
        "best_epoch": m["best_epoch"],
        "seconds": m["seconds"],
        "params": {
            "seed": params.seed,
            "data": params.data.model_dump(mode="json"),
            "train": params.train.model_dump(mode="json"),
        },
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "git_rev": _git_rev(),
        "run": str(run) if run is not None else None,
    }


def _init_sha(model: str) -> str | None:
    from transferkit.models import registry

    entry = registry.PACKAGED.get(model)
    return entry.sha256 if entry else None


def _git_rev() -> str | None:
    from transferkit.core.io import git_rev

    return git_rev(Path(__file__).resolve().parent)


def card_markdown(card: dict) -> str:
    t, acc = card["trained_on"], card["accuracy"]
    init = "random init" if card["strategy"] == "scratch" else f"`{card['init']}` (ImageNet weights)"
    return (
        f"# zoo:{card['name']}\n\n"
        f"Source model registered by `transferkit pretrain`: `{card['arch']}` from {init}, trained on "
        f"**{t['dataset']}** ({len(t['classes'])} classes: {', '.join(t['classes'])}) at {card['image_size']} px.\n\n"
        f"| field | value |\n|---|---|\n"
        f"| weights | `model.safetensors`, sha256 `{card['sha256']}` |\n"
        f"| data | `{t['path']}`, md5 `{t['data_md5']}`, {t['n_train']} train / {t['n_val']} val / {t['n_test']} test images |\n"
        f"| accuracy | train {acc['train']:.4f}, val {acc['val']:.4f}, test {acc['test']:.4f} |\n"
        f"| training | {card['strategy']}, {card['epochs']} epochs (best {card['best_epoch']}), {card['seconds']:.0f} s |\n"
        f"| created | {card['created']} (git {card.get('git_rev') or 'unknown'}) |\n\n"
        "It keeps its source classification head, so `select` scores it with LEEP as well as LogME and kNN. "
        "Use it as a candidate with `zoo:" + card["name"] + "`.\n"
    )
