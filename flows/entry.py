"""The one style of entry point of the flow modules: `python -m transferkit.flows.<module> [FLOW] --param value ...`.

Each flow module ends in `if __name__ == "__main__": main(<its flows>)`. The flags are the flow's own
parameters (`monitor_dir` -> `--monitor-dir`), so they cannot drift from the signature that deployments and
`transferkit` call; values are YAML like `transferkit --set` values (`3`, `true`, `null`, `{"train.epochs": 3}`),
except for `str` parameters, which take the text as it is. The flow's return value is printed as JSON.
Expected failures (transferkit's errors) print one line and exit with their code from
`transferkit.core.errors.EXIT_CODES`; a run the validation gate refused completes, prints its result and exits 3.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any


def _parser(ap: argparse.ArgumentParser, flow) -> argparse.ArgumentParser:
    for name, p in inspect.signature(flow.fn).parameters.items():
        required = p.default is inspect.Parameter.empty
        ann = str(p.annotation)
        ap.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            required=required,
            default=None if required else p.default,
            type=str if ann in ("str", "str | None") else _value,
            help=f"{ann}" + ("" if required else f" (default: {p.default!r})"),
        )
    return ap


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not a YAML value: {text!r} ({e})") from None


def main(*flows, argv: list[str] | None = None) -> None:
    """Run one of FLOWS with ARGV as its parameters and print the result; with several flows the first
    argument names which (the flow function's name)."""
    from transferkit.core.errors import EXIT_REFUSED, TransferkitError, exit_code

    doc = sys.modules[flows[0].fn.__module__].__doc__ or ""
    ap = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    if len(flows) == 1:
        _parser(ap, flows[0]).set_defaults(fn=flows[0])
    else:
        sub = ap.add_subparsers(dest="flow", required=True)
        for f in flows:
            _parser(sub.add_parser(f.fn.__name__, help=(f.description or "").split("\n")[0]), f).set_defaults(fn=f)
    args = vars(ap.parse_args(argv))
    chosen = args.pop("fn")
    args.pop("flow", None)
    try:
        result = chosen(**args)
    except (TransferkitError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(exit_code(e))
    print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("refused"):  # the pipeline's summary and retrain's result carry it
        sys.exit(EXIT_REFUSED)
