"""CPU cost per image of each backbone family at its native input size, against MobileNetV2 in the same run.

    .venv/bin/python bench/backbones.py                 # every family, 5 rounds, batch 4, 1 thread
    .venv/bin/python bench/backbones.py --repeats 3 --threads 2 --batch 8   # an idle machine

Random weights (`timm.create_model(..., pretrained=False)`): compute per image does not depend on the values of
the weights, so no download is needed. For each model: forward (eval, no grad) and one train step (train mode,
forward + cross-entropy + backward + AdamW step, every parameter trainable: a full fine-tune) on a batch of
random images at the model's pretrained input size (timm's pretrained config), ms per image as mean +- sd and
median over `--repeats` rounds (round robin over the models after one warm-up call each), and the ratio of
medians to MobileNetV2-100 at 224 px measured in the same process. DINOv2 is measured at its native 518 px and
at 224 px (timm resamples its position embedding), the side a user would pick to make it affordable.
Wall-clock figures: the machine may be shared; the 1-minute load average before and after is recorded.
Writes bench/results/backbones.json and bench/results/backbones.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/select.py would shadow the standard library's `select` with this folder first on sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

BASELINE = "mobilenetv2_100"
# (label, timm name, side or None for the pretrained config's own)
MODELS = (
    ("MobileNetV2 (baseline, packaged)", BASELINE, None),
    ("ViT-Ti/16", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", None),
    ("DINOv2 ViT-S/14 reg4 (native)", "vit_small_patch14_reg4_dinov2.lvd142m", None),
    ("DINOv2 ViT-S/14 reg4 @224", "vit_small_patch14_reg4_dinov2.lvd142m", 224),
    ("ConvNeXt-Atto", "convnext_atto.d2_in1k", None),
    ("TinyCLIP ViT-XS/16 tower", "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", None),
    ("CLIP ViT-B/16 tower (OpenAI)", "vit_base_patch16_clip_224.openai", None),
)


def build(name: str, side: int | None, batch: int) -> dict:
    """The model at its side with a random batch, and its two timed calls (forward; a full fine-tune step)."""
    import timm
    import torch

    from transferkit.models.arch import native_side, size_kwargs

    side = side or native_side(name) or 224
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **size_kwargs(name, side))
    x = torch.randn(batch, 3, side, side)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        model.eval()
        with torch.inference_mode():
            model(x)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    n = sum(p.numel() for p in model.parameters())
    return {"side": side, "params_m": round(n / 1e6, 2), "calls": {"forward": forward, "train_step": train_step}}


def measure(batch: int, repeats: int) -> list[dict]:
    """ms per image, mean +- sd over `repeats` rounds; each round times every model once (round robin after one
    warm-up call each), so a change in the machine's load falls on every model alike, the baseline included."""
    models = []
    for label, name, side in MODELS:
        m = {"label": label, "model": name, **build(name, side, batch)}
        for fn in m["calls"].values():
            fn()  # warm-up: allocator, oneDNN kernels
        models.append(m)
    times = {(m["label"], k): [] for m in models for k in m["calls"]}
    for r in range(repeats):
        for m in models:
            for k, fn in m["calls"].items():
                t0 = time.perf_counter()
                fn()
                times[(m["label"], k)].append((time.perf_counter() - t0) * 1000 / batch)
        print(f"round {r + 1}/{repeats} done", flush=True)
    rows = []
    for m in models:
        row = {k: v for k, v in m.items() if k != "calls"}
        for k in m["calls"]:
            t = times[(m["label"], k)]
            sd = statistics.stdev(t) if len(t) > 1 else 0.0
            row[f"{k}_ms"] = {"mean": statistics.mean(t), "sd": sd, "median": statistics.median(t), "n": len(t)}
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| model | side | params (M) | forward ms/img mean +- sd (median) | x MobileNetV2 (medians) "
        "| train step ms/img mean +- sd (median) | x MobileNetV2 (medians) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, t = r["forward_ms"], r["train_step_ms"]
        out.append(
            f"| {r['label']} | {r['side']} | {r['params_m']} | {f['mean']:.1f} +- {f['sd']:.1f} ({f['median']:.1f}) | "
            f"{r['forward_ratio']:.2f} | {t['mean']:.1f} +- {t['sd']:.1f} ({t['median']:.1f}) | {r['train_ratio']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    # one thread: with 2 OpenMP threads on the shared 2 cores, MobileNetV2's many small ops collapsed under
    # oversubscription (its forward slower than ViT-Ti's) and the ratios measured the load, not the models
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # set deliberately: the same for every model
    load_before = os.getloadavg()[0]
    rows = measure(args.batch, args.repeats)
    base = rows[0]
    for r in rows:
        # medians: a burst of load on the shared machine inflates one round's mean, not the middle round
        r["forward_ratio"] = r["forward_ms"]["median"] / base["forward_ms"]["median"]
        r["train_ratio"] = r["train_step_ms"]["median"] / base["train_step_ms"]["median"]
    doc = {
        "what": "CPU ms per image at each model's native input size, random weights; ratios vs MobileNetV2 "
        "measured in the same run",
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "note": "wall time measured on a shared machine: absolute figures carry its load; the ratios are the result",
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backbones.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = table(rows)
    (args.out / "backbones.md").write_text(
        f"# Backbone CPU cost per image (batch {args.batch}, {args.threads} threads, {args.repeats} repeats; "
        f"load average {load_before:.1f} -> {doc['load_average_1min']['after']:.1f}: measured under load)\n\n"
        + md
        + "\n"
    )
    print(md)


if __name__ == "__main__":
    main()
