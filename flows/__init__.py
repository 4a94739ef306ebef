"""The Prefect entry points (flows and deployments), installed as transferkit.flows: `python -m transferkit.flows.pipeline`."""
