"""How fast `transferkit --help` answers, against a bare interpreter start measured in the same run.

    .venv/bin/python bench/cli_startup.py [--repeats 10]

Heavy libraries (torch, timm, prefect, evidently) load lazily inside the commands; this checks the
promise that `--help` stays under 1 s. Writes bench/results/cli_startup.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    tk = str(Path(sys.executable).parent / "transferkit")
    cases = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "transferkit --help": [tk, "--help"],
        "transferkit train --help": [tk, "train", "--help"],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }
    timed(cases["transferkit --help"], 2)  # warm the OS file cache
    rows = []
    base = None
    for name, cmd in cases.items():
        ts = timed(cmd, args.repeats)
        med = statistics.median(ts)
        base = base or med
        rows.append(
            {"case": name, "median_s": round(med, 3), "max_s": round(max(ts), 3), "x_baseline": round(med / base, 2)}
        )
    res = {"benchmark": "cli startup", "repeats": args.repeats, "rows": rows, "target": "transferkit --help < 1 s"}
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "cli_startup.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# CLI startup", "", "| command | median s | max s | x baseline |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['median_s']} | {r['max_s']} | {r['x_baseline']} |" for r in rows]
    (results / "cli_startup.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
