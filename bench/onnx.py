"""ONNX benchmark: torch eager vs onnxruntime fp32 vs onnxruntime int8, on CPU, measured in one run.

    .venv/bin/python bench/onnx.py                                  # demo model (models/target/<latest>) + mobilenetv2_100 @ 224
    .venv/bin/python bench/onnx.py --model-dir models/target/2 --iters 100 --threads 2
    .venv/bin/python bench/onnx.py --skip-full                      # demo model only (~1 min)

Two models: (a) the demo model, an exported version folder (--model-dir; default: the `latest` of
models/target, else a quick linear probe of mobilenetv2_100 on sklearn digits is trained and exported
into a temp folder), and (b) the full-size packaged mobilenetv2_100 at 224 px with a 10-class head
fitted as a linear probe on the same digits train split (so its accuracy means something).
For each: latency p50/p95 at batch 1, throughput at batch 32, and test accuracy, for torch eager,
ORT fp32 and ORT int8 (static QDQ, per-channel, calibrated on training images, high-resolution Convs
left float32, exactly as `transferkit export` does), plus a contrast row with every Conv int8 and a
fragility probe (fp32 top-1 agreement under 1% Gaussian input noise). Every number in a table comes from the same process, same input tensors,
same thread count; each measurement warms up first and stops at --iters or --max-seconds.
Writes bench/results/onnx.json and bench/results/onnx.md and prints the table.

Targets (issue 7): ORT fp32 >= 1.25x torch eager at batch 1; ORT int8 >= 1.5x ORT fp32 with <= 1 point
accuracy loss. Misses are reported as misses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# This file is called onnx.py: with its folder on sys.path (as `python bench/onnx.py` puts it),
# `import onnx` would import this script instead of the onnx package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

FP32_TARGET, INT8_TARGET, MAX_DROP = 1.25, 1.5, 0.01
INT8_ALL = "ORT int8, every Conv"  # contrast row: export.int8_fp32_resolution = 0


# --------------------------------------------------------------------------- timing


def _time_calls(fn, warmup: int, iters: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + max_seconds
    while len(times) < iters and (not times or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def measure(engines: dict, args) -> dict:
    """p50/p95 latency (ms) of batch-1 calls and images/s of batch-32 calls, for every engine.

    Round-robin: each round times a slice of every engine in turn, so load from other jobs on a shared
    machine falls on all engines alike instead of on whichever happened to run then.
    """
    rounds = 10
    t1 = {k: [] for k in engines}
    t32 = {k: [] for k in engines}
    for fn1, fn32 in engines.values():
        _time_calls(fn1, args.warmup, 0, 0)
        _time_calls(fn32, max(1, args.warmup // 5), 0, 0)
    per1, per32 = max(1, args.iters // rounds), max(1, args.iters // 5 // rounds)
    budget = args.max_seconds / rounds  # per engine and round
    for _ in range(rounds):
        for k, (fn1, fn32) in engines.items():
            t1[k] += _time_calls(fn1, 0, per1, budget)
            t32[k] += _time_calls(fn32, 0, per32, budget)
    return {
        k: {
            "p50_ms_b1": 1e3 * float(np.percentile(t1[k], 50)),
            "p95_ms_b1": 1e3 * float(np.percentile(t1[k], 95)),
            "n_b1": len(t1[k]),
            "throughput_b32": args.batch * len(t32[k]) / float(np.sum(t32[k])),
            "n_b32": len(t32[k]),
        }
        for k in engines
    }


# --------------------------------------------------------------------------- engines


def torch_engine(model):
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def ort_engine(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # the CPU comparison
    return lambda x: sess.run(["logits"], {"input": x})[0]


def accuracy(run, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((run(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def bench_model(
    label: str,
    torch_model,
    fp32: Path,
    int8: Path,
    test_batches,
    x1,
    x32,
    args,
    int8_info: dict,
    int8_all: Path | None = None,
) -> dict:
    """`int8` is the export recipe; `int8_all` (optional) the same with every Conv quantized, for contrast."""
    engines = {
        "torch eager": torch_engine(torch_model),
        "ORT fp32": ort_engine(fp32, args.threads),
        "ORT int8": ort_engine(int8, args.threads) if int8 and int8.is_file() else None,
    }
    if int8_all is not None and int8_all.is_file():
        engines[INT8_ALL] = ort_engine(int8_all, args.threads)
    live = {name: run for name, run in engines.items() if run is not None}
    print(f"[{label}] timing {', '.join(live)} (round-robin) ...", flush=True)
    rows = measure({name: (lambda r=run: r(x1), lambda r=run: r(x32)) for name, run in live.items()}, args)
    for name, run in engines.items():
        if run is None:
            rows[name] = {"error": int8_info.get("reason")}
        else:
            rows[name]["test_accuracy"] = accuracy(run, test_batches)
    rows = {name: rows[name] for name in engines}
    noise = fp32_noise_agreement(engines["ORT fp32"], test_batches)
    t, f, q = rows["torch eager"], rows["ORT fp32"], rows["ORT int8"]
    ratios = {
        "fp32_vs_torch_b1": t["p50_ms_b1"] / f["p50_ms_b1"],
        "fp32_vs_torch_b32": f["throughput_b32"] / t["throughput_b32"],
    }
    if "p50_ms_b1" in q:
        ratios |= {
            "int8_vs_fp32_b1": f["p50_ms_b1"] / q["p50_ms_b1"],
            "int8_vs_fp32_b32": q["throughput_b32"] / f["throughput_b32"],
            "int8_vs_torch_b1": t["p50_ms_b1"] / q["p50_ms_b1"],
            "int8_accuracy_drop": f["test_accuracy"] - q["test_accuracy"],
        }
    if INT8_ALL in rows:
        a = rows[INT8_ALL]
        ratios |= {
            "int8_all_vs_fp32_b1": f["p50_ms_b1"] / a["p50_ms_b1"],
            "int8_all_accuracy_drop": f["test_accuracy"] - a["test_accuracy"],
        }
    targets = {
        "fp32_1.25x_torch_b1": ratios["fp32_vs_torch_b1"] >= FP32_TARGET,
        "int8_1.5x_fp32_b1": ratios.get("int8_vs_fp32_b1", 0) >= INT8_TARGET,
        "int8_drop_le_1pt": "int8_accuracy_drop" in ratios and ratios["int8_accuracy_drop"] <= MAX_DROP + 1e-9,
    }
    for v in rows.values():
        for m in ("p50_ms_b1", "p95_ms_b1", "throughput_b32", "test_accuracy"):
            if m in v:
                v[m] = round(v[m], 4)
    return {
        "rows": rows,
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "targets": targets,
        "int8": int8_info,
        "n_test": sum(len(y) for _, y in test_batches),
        "fp32_top1_agreement_under_1pct_input_noise": round(noise, 4),
    }


def fp32_noise_agreement(run, batches, rel: float = 0.01) -> float:
    """Top-1 agreement of fp32 with itself when Gaussian noise of `rel` x the input's std is added.

    A fragility probe that needs no quantizer: int8 rounding is noise of about this size (8 bits over a
    range of ~4.5 std), so a model that flips many predictions here cannot lose < 1 point in int8.
    """
    rng = np.random.default_rng(0)
    agree = total = 0
    for x, _ in batches:
        noisy = (x + rng.standard_normal(x.shape).astype(np.float32) * rel * float(x.std())).astype(np.float32)
        agree += int((run(noisy).argmax(1) == run(x).argmax(1)).sum())
        total += len(x)
    return agree / total


# --------------------------------------------------------------------------- the two models


def _batches(samples, transform, batch_size=32):
    from transferkit.data.loader import make_loader

    return [(x.numpy(), y.numpy()) for x, y in make_loader(samples, transform, batch_size=batch_size)]


def _inputs(test_batches, batch: int):
    allx = np.concatenate([x for x, _ in test_batches])
    reps = -(-batch // len(allx))
    return np.ascontiguousarray(allx[:1]), np.ascontiguousarray(np.concatenate([allx] * reps)[:batch])


def _int8(fp32: Path, out: Path, train, test, transform, fp32_acc: float, fp32_resolution: float | None = None) -> dict:
    """Quantize exactly as the export stage does, but always write the file (bound 100 points) so it is
    measured; whether `export` would keep it (1 point) is reported separately. `fp32_resolution=0`:
    every Conv int8 (the contrast row)."""
    from transferkit.core.config import load_params
    from transferkit.export.quantize import quantize_int8

    over = {"export.int8_max_drop": 1.0}
    if fp32_resolution is not None:
        over["export.int8_fp32_resolution"] = fp32_resolution
    ep = load_params(None, over).export  # the export defaults (config.py = params.yaml)
    info = quantize_int8(fp32, out, train, test, transform, fp32_acc, ep)
    info["kept_by_export_rule"] = info["drop"] is not None and info["drop"] <= MAX_DROP + 1e-9
    return info


def demo_model(args, work: Path) -> tuple[dict, list]:
    import torch

    from transferkit.core.config import load_params
    from transferkit.core.io import read_json, sha256_file
    from transferkit.data.folder import load_with_params
    from transferkit.export.quantize import onnx_accuracy
    from transferkit.modelrepo.repository import INT8_FILE, latest_version
    from transferkit.models import zoo

    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        v = latest_version(ROOT / "models" / "target")
        model_dir = ROOT / "models" / "target" / str(v) if v else None
    if model_dir is None or not (model_dir / "metadata.json").is_file():
        model_dir = _train_demo(work)
    meta = read_json(model_dir / "metadata.json")
    run = Path(meta["run"]) if Path(meta["run"]).is_absolute() else ROOT / meta["run"]
    ckpt = run / "model.safetensors"
    if sha256_file(ckpt) != meta["checkpoint_sha256"]:
        raise SystemExit(f"{ckpt} is not the checkpoint {model_dir} was exported from (sha256 differs)")
    loaded = zoo.create_model(f"file:{ckpt}")
    rp = load_params(run / "params.yaml") if (run / "params.yaml").is_file() else load_params()
    metrics = read_json(run / "metrics.json")
    target = Path(metrics["target"]) if Path(metrics["target"]).is_absolute() else ROOT / metrics["target"]
    ds = load_with_params(target, rp, seed=int(metrics.get("seed", rp.seed)))
    tf = zoo.eval_transform(loaded.data_config)
    test = ds.splits["test"]
    fp32 = model_dir / "model.onnx"
    if (model_dir / INT8_FILE).is_file():
        int8, info = model_dir / INT8_FILE, dict(meta.get("int8") or {}, source="exported with the model")
    else:
        fp32_acc, _ = onnx_accuracy(fp32, test, tf, providers=["CPUExecutionProvider"])
        int8 = work / "demo.int8.onnx"
        info = _int8(fp32, int8, ds.splits["train"], test, tf, fp32_acc) | {"source": "quantized by the benchmark"}
    fp32_acc, _ = onnx_accuracy(fp32, test, tf, providers=["CPUExecutionProvider"])
    print("[demo] quantizing every Conv (contrast) ...", flush=True)
    _int8(fp32, work / "demo.int8-all.onnx", ds.splits["train"], test, tf, fp32_acc, fp32_resolution=0.0)
    batches = _batches(test, tf)
    x1, x32 = _inputs(batches, args.batch)
    label = f"demo: {meta['source_model']} {meta['strategy']} @ {meta['input_size'][-1]} px ({model_dir.name} of {model_dir.parent})"
    torch.manual_seed(0)
    res = bench_model(
        "demo", loaded.model.eval(), fp32, int8, batches, x1, x32, args, info, work / "demo.int8-all.onnx"
    )
    return {"label": label, "model_dir": str(model_dir), **res}, ds


def _train_demo(work: Path) -> Path:
    """No exported model: a quick linear probe on digits, validated-by-force, exported to a temp repo."""
    from transferkit.core.config import load_params
    from transferkit.core.io import write_json
    from transferkit.data.builtin import write_builtin
    from transferkit.export.stage import run_export
    from transferkit.train.stage import run_train

    data = work / "digits"
    write_builtin("digits", data, per_class=60, size=32, train_per_class=20, val_per_class=10, progress=False)
    p = load_params(None, {"data.image_size": 96, "train.strategy": "linear-probe", "train.epochs": 10})
    run_train(data, work / "train", p, "mobilenetv2_100", progress=False)
    write_json(work / "train" / "validation.json", {"passed": True, "reasons": ["benchmark: not validated"]})
    return Path(run_export(work / "train", work / "models", p, progress=False)["path"])


def full_model(args, work: Path, ds) -> dict:
    """mobilenetv2_100 (packaged ImageNet weights) at 224 px, head fitted by logistic regression."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from transferkit.export.convert import export_onnx
    from transferkit.export.quantize import onnx_accuracy
    from transferkit.models import zoo

    loaded = zoo.create_model("mobilenetv2_100", num_classes=len(ds.classes), image_size=224)
    model = loaded.model.eval()
    tf = zoo.eval_transform(loaded.data_config)
    print("[full] fitting the 10-class head on train features ...", flush=True)
    feats, labels = [], []
    with torch.inference_mode():
        for x, y in _batches(ds.splits["train"], tf):
            feats.append(model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True).numpy())
            labels.append(y)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(np.concatenate(feats), np.concatenate(labels))
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.from_numpy(clf.coef_).float())
        model.get_classifier().bias.copy_(torch.from_numpy(clf.intercept_).float())
    test = ds.splits["test"]
    batches = _batches(test, tf)
    x1, x32 = _inputs(batches, args.batch)
    print("[full] exporting (dynamo, opset 18) ...", flush=True)
    (work / "full").mkdir()
    fp32 = work / "full" / "model.onnx"
    how = export_onnx(model, torch.from_numpy(x32[:2]), fp32, 18)
    fp32_acc, _ = onnx_accuracy(fp32, test, tf, providers=["CPUExecutionProvider"])
    print("[full] quantizing ...", flush=True)
    info = _int8(fp32, work / "full.int8.onnx", ds.splits["train"], test, tf, fp32_acc) | {"exporter": how["exporter"]}
    _int8(fp32, work / "full.int8-all.onnx", ds.splits["train"], test, tf, fp32_acc, fp32_resolution=0.0)
    res = bench_model(
        "full", model, fp32, work / "full.int8.onnx", batches, x1, x32, args, info, work / "full.int8-all.onnx"
    )
    return {"label": "full: mobilenetv2_100 (ImageNet) + 10-class linear probe @ 224 px", **res}


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    env = result["env"]
    out = [
        "# ONNX benchmark (bench/onnx.py)",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores, "
        + (
            f"load average {env['load_before']} when the run started"
            if "load_before" in env
            else "**shared with other jobs while measured**"
        )
        + "), "
        f"{env['threads']} thread(s) for torch and ORT; torch {env['torch']}, onnxruntime {env['onnxruntime']}; "
        f"{result['created']}. Batch-1 latency over up to {result['args']['iters']} calls, batch-{result['args']['batch']} "
        "throughput; accuracy on the digits test split.",
        "",
    ]
    for m in result["models"]:
        out += [
            f"## {m['label']}",
            "",
            f"| engine | p50 ms (b1) | p95 ms (b1) | img/s (b{result['args']['batch']}) | test acc ({m['n_test']}) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in m["rows"].items():
            if "p50_ms_b1" not in r:
                out.append(f"| {name} | n/a | n/a | n/a | n/a ({r.get('error')}) |")
                continue
            out.append(
                f"| {name} | {r['p50_ms_b1']:.2f} | {r['p95_ms_b1']:.2f} | {r['throughput_b32']:.1f} | "
                f"{100 * r['test_accuracy']:.1f}% |"
            )
        ra, tg = m["ratios"], m["targets"]
        yes = {True: "met", False: "**MISSED**"}
        out += [
            "",
            f"- ORT fp32 vs torch eager: {ra['fp32_vs_torch_b1']:.2f}x at batch 1 (target {FP32_TARGET}x: "
            f"{yes[tg['fp32_1.25x_torch_b1']]}), {ra['fp32_vs_torch_b32']:.2f}x throughput at batch {result['args']['batch']}",
        ]
        if "int8_vs_fp32_b1" in ra:
            out += [
                f"- ORT int8 vs ORT fp32: {ra['int8_vs_fp32_b1']:.2f}x at batch 1 (target {INT8_TARGET}x: "
                f"{yes[tg['int8_1.5x_fp32_b1']]}), {ra['int8_vs_fp32_b32']:.2f}x throughput; accuracy "
                f"{-100 * ra['int8_accuracy_drop']:+.1f} points (target <= 1 point lost: {yes[tg['int8_drop_le_1pt']]}; "
                f"export would {'keep' if tg['int8_drop_le_1pt'] else 'refuse'} model.int8.onnx)",
            ]
        q = m.get("int8") or {}
        if q.get("fp32_nodes") is not None:
            out.append(
                f"- int8 recipe: QDQ, {q.get('activation_type')} activations / int8 per-channel weights, "
                f"reduce_range={q.get('reduce_range')}, {q.get('calibration')} calibration on "
                f"{q.get('calibration_images')} train images; {len(q['fp32_nodes'])} Conv nodes kept float32 "
                f"(input map >= {q.get('fp32_resolution')} of the image side)"
            )
        if "int8_all_accuracy_drop" in ra:
            out.append(
                f"- Contrast, every Conv int8: {ra['int8_all_vs_fp32_b1']:.2f}x at batch 1, accuracy "
                f"{-100 * ra['int8_all_accuracy_drop']:+.1f} points"
            )
        if "fp32_top1_agreement_under_1pct_input_noise" in m:
            out.append(
                f"- Fragility probe: fp32 with Gaussian input noise of 1% of the input std keeps "
                f"{100 * m['fp32_top1_agreement_under_1pct_input_noise']:.1f}% of its top-1 predictions"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="an exported version folder (default: models/target/<latest>)")
    ap.add_argument("--iters", type=int, default=100, help="batch-1 calls timed (batch 32: a fifth)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="per measurement, after warm-up")
    ap.add_argument("--batch", type=int, default=32)
    # 1 by default: on a shared 2-core box torch's OpenMP threads spin against other jobs (batch-1 latency
    # went from ~20 ms to >1 s with 2 threads); pass --threads N on a quiet machine.
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    ap.add_argument("--skip-full", action="store_true", help="only the demo model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        demo, ds = demo_model(args, Path(tmp))
        models = [demo]
        if not args.skip_full:
            models.append(full_model(args, Path(tmp), ds))
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if Path("/proc/cpuinfo").exists() else open(os.devnull) as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.perf_counter() - t0, 1),
        "args": vars(args),
        "env": {
            "cpu": names[0] if names else cpu,
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_before": load0,  # 1-min load average when the run started
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
        "targets": {"fp32_vs_torch_b1": FP32_TARGET, "int8_vs_fp32_b1": INT8_TARGET, "int8_max_drop": MAX_DROP},
        "models": models,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result)
    (out / "onnx.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
