"""The DVC workspace a run writes into: the pipeline's stage wiring, one writer at a time, and every
promotable model version recorded in DVC (and on its remote) before `latest` moves to it.

The stage wiring is one table (`pipeline`): for a target, a run folder, a model repository and an optional
reference it gives each stage's command (the CLI verb DVC runs), deps, params groups, outs, metrics and
plots. The repository's dvc.yaml is `pipeline("data/clipart", "runs/dvc", "models")` written out
(`transferkit dvc-yaml`; a test keeps them equal), and the Prefect flow writes into the same folders
(`stage_dirs`), so `dvc repro` and the flow cannot drift apart.

A run in a DVC workspace (a folder with .dvc/, git or `dvc init --no-scm` on a worker without a checkout)
holds DVC's own repository lock for its whole duration (`Workspace`): `dvc repro`, `dvc exp run`, another
`transferkit run` or a second deployment run in that workspace are refused, or wait (`wait_s`), instead of
interleaving writes into the same files. Inside the lock, DVC's Python API records what the flow made:
  - `commit_stages`: `dvc commit` of the dvc.yaml stages whose command and params this run reproduced
    exactly, so dvc.lock and the cache hold what the flow computed and `dvc status` is clean;
  - `record`: the model repository, by the dvc.yaml stage that declares it as an out, else `dvc add REPO`;
  - `push`: the cache behind both to the default remote.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from transferkit.core.errors import Busy, TransferkitError

# DVC's stages whose code deps are derived (`stage_code`): the stage's own subpackage and every project module
# it imports, directly or through others, at import time or inside a function (a lazy import still runs)
STAGES = ("drift", "select", "train", "validate", "export")
# where a stage's command enters beyond its subpackage: `transferkit select` makes the runner choice in the
# orchestration layer (flows/select.py), which then runs transferkit.select
_ENTRY = {"select": ("transferkit.flows.select",)}


def stage_code(stage: str) -> list[str]:
    """The source files a stage runs, as repository paths (`src/transferkit/...`, `flows/...`): its subpackage
    and the closure of their imports. Derived, not listed by hand, so that editing any of them makes `dvc status`
    report the stage. The CLI that parses the stage's arguments is left out: it decides nothing the stage computes."""
    from transferkit.orchestration.codegraph import closure, project_files, repo_path

    files = project_files()
    pkg = f"transferkit.{stage}"
    seeds = [m for m in files if m == pkg or m.startswith(pkg + ".")] + list(_ENTRY.get(stage, ()))
    return sorted(repo_path(files[m]) for m in closure(seeds, files, skip=("transferkit.cli",)))


class WorkspaceBusy(Busy):
    """Another DVC process (dvc repro, dvc exp run, a transferkit run) holds the workspace."""


class WorkspaceError(TransferkitError):
    """DVC could not record what the run made (the message names the stage or path and what to do)."""


def stage_dirs(out: str | Path) -> dict[str, Path]:
    """Where each stage writes inside a run folder (the flow and dvc.yaml agree through this)."""
    out = Path(out)
    return {"drift": out / "drift", "select": out / "select", "train": out / "train"}


def _drift_stage(reference: str, target: str, drift: str) -> dict[str, Any]:
    q = shlex.quote
    return {
        "cmd": f"transferkit drift --reference {q(reference)} --current {q(target)} --out {q(drift)} -q",
        "deps": [reference, target, *stage_code("drift")],
        "params": ["seed", "data", "drift"],
        "outs": [f"{drift}/drift.html"],
        "metrics": [{f"{drift}/drift.json": {"cache": False}}],
    }


def _select_stage(target: str, select: str) -> dict[str, Any]:
    q = shlex.quote
    return {
        "cmd": f"transferkit select --target {q(target)} --out {q(select)} -q",
        "deps": [target, *stage_code("select")],
        "params": ["seed", "data", "select", "train"],
        "metrics": [{f"{select}/ranking.json": {"cache": False}}],
    }


# the validate params the no-transfer baselines are fitted with (in the train stage, for its search's evidence)
NO_TRANSFER_PARAMS = [
    f"validate.{k}"
    for k in ("no_transfer", "pixel_size", "pixel_grid", "cnn_epochs", "cnn_lrs", "cnn_max_steps", "chance_alpha")
]


def _train_stage(target: str, ranking: str, drift_json: str | None, train: str) -> dict[str, Any]:
    q = shlex.quote
    return {
        "cmd": f"transferkit train --target {q(target)} --ranking {q(ranking)}"
        + (f" --drift {q(drift_json)}" if drift_json else "")
        + f" --out {q(train)} -q",
        "deps": [target, ranking, *([drift_json] if drift_json else []), *stage_code("train")],
        "params": ["seed", "data", "train", *NO_TRANSFER_PARAMS],
        "outs": [f"{train}/model.safetensors", f"{train}/no_transfer.json", f"{train}/test_logits.npz"],
        "metrics": [{f"{train}/metrics.json": {"cache": False}}],
        "plots": [{f"{train}/history.csv": {"cache": False}}],
    }


def _validate_stage(target: str, train: str) -> dict[str, Any]:
    # --record: a refused gate is a recorded verdict (validation.json "passed": false), not a failed stage;
    # export --skip-refused then publishes nothing, so `dvc exp run -S validate.max_gap=...` compares verdicts
    return {
        "cmd": f"transferkit validate --run {shlex.quote(train)} --record -q",
        "deps": [
            f"{train}/model.safetensors",
            f"{train}/metrics.json",
            f"{train}/no_transfer.json",
            f"{train}/test_logits.npz",
            target,
            *stage_code("validate"),
        ],
        "params": ["seed", "data", "validate", "train"],
        "metrics": [{f"{train}/validation.json": {"cache": False}}, {f"{train}/report.json": {"cache": False}}],
        "plots": [
            {f"{train}/confusion.csv": {"cache": False}},
            {f"{train}/reliability.csv": {"cache": False}},
            {f"{train}/plots": {"cache": False}},
        ],
    }


def _export_stage(target: str, train: str, repo: str) -> dict[str, Any]:
    q = shlex.quote
    return {
        "cmd": f"transferkit export --run {q(train)} --repo {q(repo)} --skip-refused -q",
        # parity runs on the target's test split, int8 calibrates on its train split
        "deps": [
            f"{train}/model.safetensors",
            f"{train}/validation.json",
            f"{train}/test_logits.npz",
            target,
            *stage_code("export"),
        ],
        "params": ["data", "export"],
        "outs": [{repo: {"persist": True}}],  # the model repository: every version, latest, history
    }


def _plots(train: str) -> list[Any]:
    """dvc.yaml's top-level plots: learning curves, confusion and reliability from train's CSVs, and the PNGs."""
    return [
        {"learning-curve-accuracy": {"x": "epoch", "y": {f"{train}/history.csv": ["train_accuracy", "val_accuracy"]}}},
        {"learning-curve-loss": {"x": "epoch", "y": {f"{train}/history.csv": ["train_loss", "val_loss"]}}},
        {
            "confusion-test": {
                "template": "confusion",
                "x": "predicted",
                "y": {f"{train}/confusion.csv": "actual"},
            }
        },
        {"reliability": {"x": "confidence", "y": {f"{train}/reliability.csv": "accuracy"}}},
        *(f"{train}/plots/{p}.png" for p in ("confusion", "reliability", "learning_curves")),
    ]


def pipeline(target: str, out: str, repo: str = "models", reference: str | None = None) -> dict[str, Any]:
    """The dvc.yaml document for one target: stages drift (only with a reference), select, train, validate,
    export. Paths are kept as given (relative to the DVC root in the repository's own dvc.yaml)."""
    d = {k: str(v) for k, v in stage_dirs(out).items()}
    ranking = f"{d['select']}/ranking.json"
    drift_json = f"{d['drift']}/drift.json" if reference else None
    stages: dict[str, Any] = {}
    if reference:
        stages["drift"] = _drift_stage(reference, target, d["drift"])
    stages["select"] = _select_stage(target, d["select"])
    stages["train"] = _train_stage(target, ranking, drift_json, d["train"])
    stages["validate"] = _validate_stage(target, d["train"])
    stages["export"] = _export_stage(target, d["train"], repo)
    return {"stages": stages, "plots": _plots(d["train"])}


HEADER = (
    "# Generated by `transferkit dvc-yaml` from transferkit.orchestration.workspace.pipeline: the same stage wiring the\n"
    "# Prefect flow uses (tests/orchestration/test_dvc.py keeps this file equal to it). `make repro` = `dvc repro`;\n"
    "# `dvc exp run -S validate.max_gap=0.1` re-runs the stages that declare that params group.\n"
)


def dvc_yaml_text(target: str, out: str, repo: str = "models", reference: str | None = None) -> str:
    import yaml

    return HEADER + yaml.safe_dump(pipeline(target, out, repo, reference), sort_keys=False, width=120)


# --------------------------------------------------------------------------- the workspace and its lock


def find_root(path: str | Path) -> Path | None:
    """The DVC repository (folder with .dvc/) that contains PATH, or None."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def under_dvc_stage() -> bool:
    """True inside a `dvc repro`/`dvc exp run` stage command (DVC sets DVC_STAGE and holds the lock)."""
    return bool(os.environ.get("DVC_STAGE"))


def _norm(cmd: str) -> list[str]:
    return shlex.split(cmd)


class Workspace:
    """DVC's repository lock held from enter to exit, and the DVC records a run makes inside it.

    wait_s = 0: a held lock raises WorkspaceBusy at once (after DVC's own ~3 s of retries); > 0: poll
    every `poll_s`, saying so through `log`, for up to wait_s seconds (a queued deployment run).
    """

    def __init__(self, root: Path, wait_s: float = 0, poll_s: float = 5, log: Callable[[str], None] = print):
        self.root = Path(root).resolve()
        self.wait_s, self.poll_s, self.log = wait_s, poll_s, log
        self._stack = ExitStack()
        self.repo = None

    def __enter__(self) -> Workspace:
        from dvc.lock import LockError
        from dvc.repo import Repo, lock_repo

        self.repo = self._stack.enter_context(Repo(str(self.root)))
        t0, said = time.monotonic(), False
        while True:
            try:
                self._stack.enter_context(lock_repo(self.repo))
                return self
            except LockError:
                waited = time.monotonic() - t0
                if waited >= self.wait_s:
                    self._stack.close()
                    raise WorkspaceBusy(
                        f"the DVC workspace {self.root} is in use by another DVC process (dvc repro, dvc exp run "
                        f"or another transferkit run){f' after waiting {waited:.0f} s' if waited > 5 else ''}: "
                        "runs in one workspace are serialised so that they never write the same files; "
                        "retry when it has finished, or run in another workspace (a separate clone)"
                    ) from None
                if not said:
                    self.log(f"waiting for the DVC workspace {self.root}: another DVC process holds it")
                    said = True
                time.sleep(min(self.poll_s, max(0.1, self.wait_s - waited)))

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self.repo = None

    def rel(self, path: str | Path) -> str:
        p = Path(path)
        p = p if p.is_absolute() else Path.cwd() / p
        return os.path.relpath(p.resolve(), self.root)

    def _stages(self) -> dict[str, Any]:
        return {s.name: s for s in self.repo.index.stages if getattr(s, "cmd", None)}

    def owner_of(self, path: str | Path) -> str | None:
        """The dvc.yaml stage that declares PATH (or a folder above it) as an out."""
        rel = self.rel(path)
        for name, stage in self._stages().items():
            for o in stage.outs:
                d = os.path.relpath(o.fs_path, self.root)
                if rel == d or rel.startswith(d + os.sep):
                    return name
        return None

    def matching_stages(self, commands: dict[str, str]) -> list[str]:
        """Stages of dvc.yaml whose command is exactly the one given (paths relative to the root)."""
        have = self._stages()
        return [n for n, c in commands.items() if n in have and _norm(have[n].cmd) == _norm(c)]

    def _commit(self, name: str) -> None:
        from dvc.exceptions import DvcException

        try:
            self.repo.commit(f"{self.root / 'dvc.yaml'}:{name}", force=True)
            self.repo._reset()  # the next call (push) must see the new lock, not the cached index
        except DvcException as e:
            raise WorkspaceError(
                f"dvc commit {name} in {self.root}: {e} (the stage's deps must exist: `dvc pull` or `dvc repro` "
                "first, or export to a model repository that no dvc.yaml stage owns)"
            ) from None

    def commit_stages(self, names: list[str]) -> list[str]:
        """`dvc commit -f NAME...`: dvc.lock records the stages' current deps, params and outs (outs cached)."""
        for n in names:
            self._commit(n)
        return list(names)

    def record(self, path: str | Path) -> str | None:
        """Cache PATH (the model repository) and record it: by its owning stage, else PATH.dvc. None when git
        ignores PATH: DVC refuses to track it, and the exported model must not fail the run at its last step."""
        owner = self.owner_of(path)
        if owner:
            self._commit(owner)
            return f"dvc.lock stage {owner}"
        rel = self.rel(path)
        if self.repo.scm.is_ignored(str(self.root / rel)):
            return None
        self.repo.add(str(self.root / rel))
        self.repo._reset()
        return f"{rel}.dvc"

    def push(self, remote: str | None = None) -> int:
        """`dvc push` of everything the workspace tracks; returns how many files were sent."""
        return int(self.repo.push(remote=remote) or 0)


def relative_commands(root: Path, target: str, out: str, repo: str, reference: str | None) -> dict[str, str]:
    """The stage commands dvc.yaml would hold for this run, with paths as DVC sees them from ROOT."""

    def rel(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p)
        q = q if q.is_absolute() else Path.cwd() / q
        return os.path.relpath(q.resolve(), root)

    doc = pipeline(rel(target), rel(out), rel(repo), rel(reference))
    return {n: s["cmd"] for n, s in doc["stages"].items()}
