"""Batch prediction benchmark: `transferkit predict` (in-process onnxruntime) vs the same images through a real
`transferkit serve` process (`predict --server`, one request per batch), same model, same batch size, same run.

    .venv/bin/python bench/predict.py                    # ~2-4 min on 2 busy cores
    .venv/bin/python bench/predict.py --batch-sizes 1,32 --repeats 5

Model: Debian's openclipart at --size px (10 classes), a linear probe of the packaged ImageNet mobilenetv2_100
(no validate stage, so exported with force, which metadata.json records) in bench/.work/predict/. Images: every
image of the dataset folder (train, val, test; PNG), read from disk each pass. Both sides decode with
data.load_rgb and preprocess with serve.decode.preprocess; onnxruntime gets --threads intra-op threads on both
sides (the server process also gets OMP_NUM_THREADS=1, as in the serve tests). Each figure is images/s over a
whole pass (decode + inference; the server's also HTTP, base64 and JSON), mean +- sd over --repeats passes,
after one warm-up pass. The ratio is predict / server per batch size; CPU ms per image counts predict's
process, or the client's plus the server process's (what a loaded machine disturbs least); `agreement` is the
share of images where both give the same label.

Writes bench/results/predict.json and bench/results/predict.md and prints the table.
"""

from __future__ import annotations

import os.path
import sys

# bench/ holds select.py etc.: with this folder first on sys.path they would shadow the stdlib's modules
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
WORK = ROOT / "bench" / ".work" / "predict"


def build_repo(work: Path, size: int) -> tuple[Path, Path]:
    """clipart data, a linear probe, one export; reused when already there."""
    from transferkit.core.config import load_params
    from transferkit.data.builtin import write_builtin
    from transferkit.export.stage import run_export
    from transferkit.modelrepo.repository import list_versions
    from transferkit.train.stage import run_train

    data, run, repo = work / "clipart", work / "run", work / "repo"
    if list_versions(repo / "clipart"):
        return repo, data
    shutil.rmtree(work, ignore_errors=True)
    write_builtin("clipart", data, per_class=20, size=size, train_per_class=6, val_per_class=4, progress=False)
    p = load_params(
        None,
        {"data.image_size": size, "export.opset": 17, "export.int8": False, "export.name": "clipart"},
    )
    run_train(data, run, p, "mobilenetv2_100", "linear-probe", progress=False, baselines=False)
    run_export(run, repo, p, force=True, progress=False)
    return repo, data


def start_server(repo: Path, log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    """A real `transferkit serve` (ready on /readyz) at THREADS onnxruntime threads, one BLAS thread."""
    from transferkit.serve import launch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return launch.start(repo, log, "--poll-interval", "0.2", "--threads", str(threads), env=env)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (pid None) or of another one (/proc/PID/stat)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def passes(fn, repeats: int, n: int, server_pid: int | None = None) -> tuple[list[float], list[float], object]:
    """images/s and CPU ms per image (this process + the server's) of `repeats` timed passes after one warm-up
    pass; the last pass's result. CPU time is what a loaded machine disturbs least."""
    out = fn()
    rates, cpu = [], []
    for _ in range(repeats):
        c0 = cpu_seconds() + (cpu_seconds(server_pid) if server_pid else 0.0)
        t0 = time.perf_counter()
        out = fn()
        rates.append(n / (time.perf_counter() - t0))
        c1 = cpu_seconds() + (cpu_seconds(server_pid) if server_pid else 0.0)
        cpu.append(1000 * (c1 - c0) / n)
    return rates, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128, help="image and model input size (px)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads on both sides")
    a = ap.parse_args()

    from transferkit.tools.predict import collect_images, predict_local, predict_server, resolve_model

    WORK.mkdir(parents=True, exist_ok=True)
    repo, data = build_repo(WORK / f"{a.size}px", a.size)
    model = resolve_model("clipart", repo)
    files, _ = collect_images([data])
    proc, url = start_server(repo, WORK / "server.log", a.threads)
    rows = []
    try:
        for bs in [int(b) for b in a.batch_sizes.split(",")]:
            local, local_cpu, lr = passes(
                lambda bs=bs: predict_local(model, files, batch_size=bs, threads=a.threads, progress=False),
                a.repeats,
                len(files),
            )
            served, served_cpu, sr = passes(
                lambda bs=bs: predict_server(model, files, url, batch_size=bs, progress=False),
                a.repeats,
                len(files),
                proc.pid,
            )
            same = sum(x["label"] == y["label"] for x, y in zip(lr.rows, sr.rows)) / len(files)
            row = {
                "batch_size": bs,
                "predict_images_per_s": [round(r, 1) for r in local],
                "server_images_per_s": [round(r, 1) for r in served],
                "predict_mean": round(statistics.mean(local), 1),
                "predict_sd": round(statistics.stdev(local), 1) if len(local) > 1 else 0.0,
                "server_mean": round(statistics.mean(served), 1),
                "server_sd": round(statistics.stdev(served), 1) if len(served) > 1 else 0.0,
                "ratio": round(statistics.mean(local) / statistics.mean(served), 2),
                "predict_cpu_ms_per_image": round(statistics.mean(local_cpu), 2),
                "server_cpu_ms_per_image": round(statistics.mean(served_cpu), 2),  # client + server process
                "cpu_ratio": round(statistics.mean(served_cpu) / statistics.mean(local_cpu), 2),
                "agreement": same,
                "n_images": len(files),
                "skipped": len(lr.skipped) + len(sr.skipped),
            }
            rows.append(row)
            print(json.dumps(row))
    finally:
        proc.terminate()
        proc.wait(15)
    write(rows, a, model)


def write(rows: list[dict], a, model) -> None:
    res = ROOT / "bench" / "results"
    res.mkdir(parents=True, exist_ok=True)
    meta = {
        "what": "transferkit predict (in-process onnxruntime) vs predict --server (a real transferkit serve), images/s",
        "model": f"clipart linear probe of mobilenetv2_100 at {a.size} px, {model.path}",
        "threads": a.threads,
        "repeats": a.repeats,
        "load_average_at_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "measured on a shared 2-core machine while other jobs ran: wall-time figures are under load",
        "rows": rows,
    }
    (res / "predict.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [
        f"# predict vs server ({meta['model'].split(',')[0]}; {rows[0]['n_images'] if rows else 0} images; "
        f"ORT threads {a.threads}; mean +- sd of {a.repeats} passes; measured under load, "
        f"load average {meta['load_average_at_end'][0]:.1f} on {meta['cpus']} CPUs)",
        "",
        "| batch size | predict images/s | server images/s | predict / server | CPU ms/image predict | "
        "CPU ms/image server (+ client) | same label |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['predict_mean']} +- {r['predict_sd']} | {r['server_mean']} +- "
            f"{r['server_sd']} | {r['ratio']}x | {r['predict_cpu_ms_per_image']} | {r['server_cpu_ms_per_image']} | "
            f"{100 * r['agreement']:.1f}% |"
        )
    (res / "predict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
