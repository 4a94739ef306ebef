"""The Prefect event names and resource ids transferkit emits and its deployments' triggers match.

transferkit.dataset.updated  resource transferkit.dataset.<dataset>  `transferkit data add`, `transferkit watch`
transferkit.drift.detected   resource transferkit.model.<model>      the serving monitor (flows/monitor.py)
"""

from __future__ import annotations

EVENT_DATASET_UPDATED = "transferkit.dataset.updated"
EVENT_DRIFT_DETECTED = "transferkit.drift.detected"


def dataset_resource(name: str) -> str:
    """The resource id of dataset NAME (the folder name unless `--name` says otherwise)."""
    return f"transferkit.dataset.{name}"


def model_resource(name: str) -> str:
    """The resource id of model NAME in the repository."""
    return f"transferkit.model.{name}"
