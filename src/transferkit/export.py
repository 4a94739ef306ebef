"""Export: a validated train run -> one ONNX file in a versioned model repository, behind a parity gate.

    transferkit export --run runs/demo/train --repo models        # -> models/<name>/<version>/

What a successful export guarantees (tests/test_export.py checks each point):
  - the run passed validation (RUN/validation.json "passed": true), or `force=True` was given and the
    metadata says "forced": true;
  - model.onnx is one self-contained file (weights inside, no external .data), passes
    `onnx.checker.check_model(full_check=True)`, takes "input" float32 [N, 3, H, W] (RGB, scaled to 0..1,
    then (x - mean) / std) and returns "logits" [N, num_classes], with N dynamic;
  - onnxruntime agrees with torch on the run's *real* test split at batch 1 and batch 32: max abs logit
    difference <= export.parity_atol and top-1 agreement >= export.min_top1_agreement. If not, the
    repository is left exactly as it was;
  - REPO/<name>/<version>/ {model.onnx, metadata.json, model_card.md} appears in one os.rename (it is
    built in a hidden temp folder next to it), versions count 1, 2, 3, ... per name, and REPO/<name>/latest
    (the version number as text, which is also valid JSON) moves only once the new version is complete;
  - int8 (export.int8, on by default): quant_pre_process + quantize_static (QDQ, uint8 activations,
    7-bit per-channel int8 weights, MinMax calibration on up to export.int8_calibration_images *training*
    images of the target, eval preprocessing), with the high-resolution Convs (input map >=
    export.int8_fp32_resolution of the image side: the stem and first blocks) left float32, because
    their rounding noise costs most of the accuracy (see high_resolution_convs). model.int8.onnx joins the
    version folder only if its test accuracy is within export.int8_max_drop of the fp32 file's;
    metadata.json "int8" records the decision either way. A
    quantization failure never fails the export: the reason is recorded and fp32 ships alone;
  - onnxruntime providers are an explicit list (execution_providers): TensorRT and CUDA only when torch
    sees a GPU (onnxruntime-gpu lists them on CPU-only machines too), CPU last; "provider" records the
    one that actually ran the parity check;
  - REPO/<name>/config.pbtxt is a Triton onnxruntime-backend config (dynamic batching, version_policy
    pinned to the promoted version), rewritten with every export. Triton's layout is ours:
    REPO/<name>/<version>/model.onnx (see deploy/triton/README.md).

Exporter and opset (torch 2.14, onnxscript 0.7, onnx 1.23, onnxruntime 1.31, checked on mobilenetv2):
  - `export.exporter: torchscript` (default): torch.onnx.export(dynamo=False) emits the requested opset (13, 17
    and 18 checked), an order of magnitude faster than the dynamo exporter (torch.export based) for the same
    graph and the same parity (docs/stages.md, Export).
  - `export.exporter: dynamo`: opset >= 18 only (it has no implementations below 18; it warns, its down-
    conversion fails and it silently keeps 18). 18, 20, 21 and 23 export and match torch to ~1e-5.
  - if the chosen exporter raises (or cannot emit the opset), the other is tried; "exporter" and
    "fallback_reason" record it. The file's real opset must equal the requested one, or export fails.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transferkit.config import ConfigError, Params, load_params
from transferkit.errors import TransferkitError
from transferkit.io import atomic_write_text, git_rev, read_json, sha256_file, write_json
from transferkit.promote import promote
from transferkit.repository import (
    INPUT_NAME,
    INT8_FILE,
    OUTPUT_NAME,
    REFERENCE_FILE,
    TRITON_CONFIG,
    list_versions,
    next_version,
    open_staging,
    publish,
    repo_lock,
    sanitize_name,
    write_triton_config,
)
from transferkit.runtime import execution_providers, ort_session

log = logging.getLogger("transferkit.export")


class ExportError(TransferkitError, ValueError):
    """An export that must not ship: failed gate, unloadable checkpoint, exporter or parity failure."""


DYNAMO_MIN_OPSET = 18  # the dynamo exporter cannot emit anything older (see the module note)
PARITY_BATCH = 32
PARITY_SINGLES = 8  # images also compared one at a time (batch 1)
REFERENCE_IMAGES = 4


# --------------------------------------------------------------------------- reading the run


def _read_run(run: Path) -> tuple[dict, Path, Params | None]:
    if not run.is_dir():
        raise ExportError(f"run folder not found: {run}")
    ckpt = run / "model.safetensors"
    if not ckpt.is_file():
        raise ExportError(f"run {run} has no checkpoint: {ckpt} not found (run `transferkit train` first)")
    try:
        metrics = read_json(run / "metrics.json")
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"run {run}: {e}") from None
    run_params = None
    if (run / "params.yaml").is_file():
        try:
            run_params = load_params(run / "params.yaml")
        except ConfigError as e:
            raise ExportError(f"run {run}: {e}") from None
    return metrics, ckpt, run_params


def _gate(run: Path) -> tuple[dict | None, str | None]:
    """(validation.json contents or None, why the gate is closed or None)."""
    path = run / "validation.json"
    if not path.is_file():
        return None, f"run {run} has not been validated ({path} not found; run `transferkit validate --run {run}`)"
    try:
        validation = read_json(path)
    except ValueError as e:
        return None, f"cannot read the validation result: {e}"
    if not isinstance(validation, dict) or validation.get("passed") is not True:
        reasons = validation.get("reasons") if isinstance(validation, dict) else None
        why = "; ".join(str(r) for r in reasons) if reasons else "no reasons given"
        return validation if isinstance(validation, dict) else None, f"run {run} failed validation ({why})"
    return validation, None


# --------------------------------------------------------------------------- exporting


def export_onnx(model, example, path: Path, opset: int, exporter: str = "torchscript") -> dict[str, Any]:
    """Write `model` as ONNX with a dynamic batch dim; returns {"exporter", "fallback_reason"}.

    `exporter` is tried first and the other one if it fails (dynamo only at opset >= DYNAMO_MIN_OPSET).
    `example` should have batch >= 2 so that no exporter specialises the batch dim to 1.
    """
    order = ["dynamo", "torchscript"] if exporter == "dynamo" else ["torchscript", "dynamo"]
    reasons = []
    for name in order:
        if name == "dynamo" and opset < DYNAMO_MIN_OPSET:
            reasons.append(f"opset {opset} requested; the dynamo exporter emits opset >= {DYNAMO_MIN_OPSET} only")
            continue
        try:
            (_export_dynamo if name == "dynamo" else _export_torchscript)(model, example, path, opset)
        except Exception as e:
            reasons.append(f"{name} exporter failed: {type(e).__name__}: {str(e)[:500]}")
            shutil.rmtree(path.parent)  # whatever it left half-written
            path.parent.mkdir()
            continue
        reason = "; ".join(reasons) or None
        if reason:
            log.warning("exported with the %s exporter: %s", "TorchScript" if name == "torchscript" else name, reason)
        return {"exporter": name, "fallback_reason": reason}
    raise ExportError(f"ONNX export failed with both exporters ({'; '.join(reasons)})")


def _export_dynamo(model, example, path: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),  # positional: independent of forward()'s argument name
            optimize=True,
            verbose=False,
            report=False,
        )
    program.save(str(path), external_data=False)


def _export_torchscript(model, example, path: Path, opset: int) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its DeprecationWarning says what the module note says
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )


def _check_graph(proto, opset: int, num_classes: int) -> int:
    """The file's default-domain opset, after checking names and the dynamic batch dim."""
    found = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    actual = found[0] if found else -1
    if actual != opset:
        raise ExportError(f"the exporter wrote opset {actual}, not the requested {opset}")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(f"exported graph has inputs {inputs} / outputs {outputs}, expected input/logits")
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise ExportError(f"exported graph has a fixed batch size ({dim0.dim_value}), expected a dynamic one")
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2 and out_dims[1].dim_value not in (0, num_classes):
        raise ExportError(f"exported graph outputs {out_dims[1].dim_value} logits, expected {num_classes}")
    return actual


# --------------------------------------------------------------------------- parity


def parity_check(
    model, onnx_path: Path, samples: list, transform, progress: bool = False, reference=None
) -> dict[str, Any]:
    """Compare torch (CPU) and onnxruntime logits on real images at batch 1 and PARITY_BATCH.

    `reference`: the checkpoint's torch logits of `samples` already computed (train's OUT/test_logits.npz, which
    validate checked against the checkpoint): onnxruntime is compared with them, and torch does not run again."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from transferkit.data import make_loader

    sess, provider = ort_session(onnx_path)
    diffs, scale, agree, compared, correct_onnx, correct_torch = [0.0], 0.0, 0, 0, 0, 0
    passes = [(1, samples[:PARITY_SINGLES]), (PARITY_BATCH, samples)]
    total = sum(-(-len(s) // b) for b, s in passes)
    with tqdm(total=total, desc="parity torch vs onnxruntime", unit="batch", disable=not progress) as bar:
        for bs, subset in passes:
            for i, (x, y) in enumerate(make_loader(subset, transform, batch_size=bs)):
                if reference is not None:
                    ref = np.asarray(reference[i * bs : (i + 1) * bs], np.float32)
                else:
                    with torch.inference_mode():
                        ref = model(x).float().numpy()
                out = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
                if out.shape != ref.shape:
                    raise ExportError(f"onnxruntime returned shape {out.shape} for batch {bs}, torch {ref.shape}")
                diffs.append(float(np.max(np.abs(out - ref))) if out.size else 0.0)
                scale = max(scale, float(np.max(np.abs(ref))) if ref.size else 0.0)
                agree += int((out.argmax(1) == ref.argmax(1)).sum())
                compared += len(out)
                if bs == PARITY_BATCH:
                    correct_onnx += int((out.argmax(1) == y.numpy()).sum())
                    correct_torch += int((ref.argmax(1) == y.numpy()).sum())
                bar.update()
    n = len(samples)
    return {
        "max_abs_diff": float(np.max(diffs)),  # NaN propagates, and fails the gate
        "top1_agreement": agree / compared if compared else 0.0,
        "max_abs_logit": scale,  # float32 error grows with it: about 5e-6 of this on CPU
        "n_images": n,
        "batch_sizes": [1, PARITY_BATCH],
        "n_compared": compared,
        "provider": provider,
        "onnx_test_accuracy": correct_onnx / n if n else None,
        "torch_test_accuracy": correct_torch / n if n else None,
        "torch_logits": "train's test_logits.npz" if reference is not None else "computed",
    }


# --------------------------------------------------------------------------- int8


class _CalibrationReader:
    """Feeds onnxruntime's calibrator batches of preprocessed training images ({"input": NCHW})."""

    def __init__(self, samples: list, transform, batch_size: int = 32):
        from transferkit.data import make_loader

        self._batches = iter(make_loader(samples, transform, batch_size=batch_size))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0].numpy()}

    def rewind(self) -> None:  # the CalibrationDataReader protocol; calibration reads once
        pass


def onnx_accuracy(path: Path, samples: list, transform, providers: list | None = None) -> tuple[float, str]:
    """Top-1 accuracy of an ONNX classifier on (path, label) samples, and the provider that ran."""
    import numpy as np

    from transferkit.data import make_loader

    sess, provider = ort_session(path, providers)
    correct = 0
    for x, y in make_loader(samples, transform, batch_size=PARITY_BATCH):
        out = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
    return correct / len(samples), provider


def high_resolution_convs(model_path: Path, fraction: float) -> list[str]:
    """Names of the Conv nodes whose input feature map is at least `fraction` of the image side.

    These stay float32 in model.int8.onnx. Measured on mobilenetv2_100 (224 px, linear probe on sklearn
    digits, 150 test images, fp32 95.3%): int8 on the stem conv alone -> 66.0%, on the first depthwise
    conv alone -> 38.0%, on any single conv from the 28x28 stage on -> >= 94.0%. All convs int8: 25%
    on 700 images (fp32 86.6%); the five convs at >= 112 px kept float32: 84.6%. The fp32 model is
    itself fragile on these smooth upscaled images (Gaussian input noise of 1% of the input std flips
    91% of its predictions): rounding noise at high resolution looks like fine texture, which ImageNet
    features respond to strongly. The low-resolution layers keep most of the int8 speed-up.
    """
    import onnx

    if fraction <= 0:
        return []
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    dims = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*proto.graph.input, *proto.graph.value_info)
    }
    image = dims.get(INPUT_NAME, [])
    if len(image) != 4 or not all(image[2:]):
        return []
    side = min(image[2:])
    out = []
    for node in proto.graph.node:
        shape = dims.get(node.input[0], []) if node.op_type == "Conv" else []
        if node.name and len(shape) == 4 and all(shape[2:]) and min(shape[2:]) >= fraction * side:
            out.append(node.name)
    return out


def quantize_int8(
    fp32_path: Path, out_path: Path, calibration: list, test: list, transform, fp32_accuracy: float, ep, seed: int = 0
) -> dict[str, Any]:
    """Static QDQ int8 from `fp32_path`; writes `out_path` only if it keeps accuracy. Never raises.

    Returns the metadata "int8" object: kept, test_accuracy, fp32_test_accuracy, drop, reason, sha256
    (filled in once the published file is final) and how it was made. Accuracy is measured on CPU:
    that is where int8 pays off (CUDA runs QDQ graphs but gains nothing from them).
    """
    import time

    info = _int8_record(fp32_accuracy, ep)
    if not ep.int8:
        info["reason"] = "disabled (export.int8 = false)"
        return info
    t0 = time.perf_counter()
    work = out_path.parent / "int8-work"
    try:
        if not calibration:
            raise ExportError("the target has no training images to calibrate on")
        if fp32_accuracy is None:
            raise ExportError("no fp32 test accuracy to compare with")
        work.mkdir()
        int8_path = _quantize_static(fp32_path, work, calibration, transform, ep, seed, info)
        acc, provider = onnx_accuracy(int8_path, test, transform, providers=["CPUExecutionProvider"])
    except Exception as e:
        info["reason"] = f"quantization failed, fp32 only: {type(e).__name__}: {str(e)[:300]}"
        return info
    finally:
        info["seconds"] = round(time.perf_counter() - t0, 2)
        if info["reason"] is not None:
            shutil.rmtree(work, ignore_errors=True)
    if _int8_verdict(info, acc, provider, ep):
        os.replace(int8_path, out_path)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _int8_record(fp32_accuracy: float | None, ep) -> dict[str, Any]:
    """The metadata "int8" object before quantization: how it is made, nothing decided yet."""
    return {
        "kept": False,
        "test_accuracy": None,
        "fp32_test_accuracy": fp32_accuracy,
        "drop": None,
        "reason": None,
        "sha256": None,
        "max_drop": ep.int8_max_drop,
        "format": "QDQ",
        "per_channel": True,
        "activation_type": ep.int8_activation,
        "weight_type": "int8",
        "reduce_range": ep.int8_reduce_range,
        "calibration": "minmax",
        "fp32_resolution": ep.int8_fp32_resolution,
        "fp32_nodes": [],
        "calibration_images": 0,
        "provider": None,
        "seconds": None,
    }


def _quantize_static(fp32_path: Path, work: Path, calibration: list, transform, ep, seed: int, info: dict) -> Path:
    """WORK/model.int8.onnx: pre-processed, the high-resolution Convs kept float32, checked; records in INFO."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from transferkit.data import subsample

    calib = subsample(calibration, ep.int8_calibration_images, seed)
    info["calibration_images"] = len(calib)
    src = work / "pre.onnx"
    try:  # shape inference + graph optimisation: what ORT asks for before quantize_static
        quant_pre_process(str(fp32_path), str(src))
    except Exception as e:
        info["preprocess_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        src = fp32_path
    keep = high_resolution_convs(src, ep.int8_fp32_resolution)
    info["fp32_nodes"] = keep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(src),
            str(work / INT8_FILE),
            _CalibrationReader(calib, transform),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if ep.int8_activation == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=ep.int8_reduce_range,  # without it: 85% -> 62% on mobilenetv2 (AVX2, no VNNI)
            nodes_to_exclude=keep,
            # MinMax: Percentile and Entropy were no better here (bench notes), and their histogram
            # collection fails on a short last batch in onnxruntime 1.31
            calibrate_method=CalibrationMethod.MinMax,
        )
    onnx.checker.check_model(str(work / INT8_FILE), full_check=True)
    return work / INT8_FILE


def _int8_verdict(info: dict, acc: float, provider: str, ep) -> bool:
    """Keep int8 only within export.int8_max_drop of fp32's test accuracy; records why in INFO."""
    fp32 = info["fp32_test_accuracy"]
    drop = fp32 - acc
    info.update(test_accuracy=acc, drop=drop, provider=provider)
    # 1e-9: accuracies are ratios of counts; an exact 1-point drop must count as within 1 point
    info["kept"] = drop <= ep.int8_max_drop + 1e-9
    if info["kept"]:
        info["reason"] = (
            f"kept: int8 test accuracy {100 * acc:.1f}% vs fp32 {100 * fp32:.1f}% "
            f"({100 * drop:+.2f} points lost, allowed {100 * ep.int8_max_drop:g})"
        )
    else:
        info["reason"] = (
            f"dropped: int8 test accuracy {100 * acc:.1f}% vs fp32 {100 * fp32:.1f}% "
            f"loses {100 * drop:.2f} points (allowed {100 * ep.int8_max_drop:g})"
        )
    return info["kept"]


# --------------------------------------------------------------------------- the stage


@dataclass
class _Inputs:
    """Everything export reads before it writes anything: the run, its gate, the model and its test images."""

    run: Path
    metrics: dict
    params: Params
    validation: dict | None
    closed: str | None  # why the validation gate is closed (None: it passed)
    force: bool
    ckpt: Path
    model: Any
    fmeta: dict
    cfg: dict
    classes: list[str]
    target: str
    seed: int
    train: list
    test: list
    transform: Any
    example: Any  # batch 2 of test images: keeps N symbolic in the exported graph
    warn: list[str]


@dataclass
class _Built:
    """What the export, parity and int8 steps made in the staging folder."""

    proto: Any  # the fp32 graph, metadata not yet embedded
    opset: int
    how: dict
    parity: dict
    int8: dict


def run_export(
    run: Path,
    repo: Path,
    params: Params | None = None,
    force: bool = False,
    progress: bool = True,
    promote: bool = True,
) -> dict:
    """Export RUN's checkpoint to REPO/<name>/<version>/ and return its metadata plus "path".

    promote=False publishes the version without moving `latest` (the flow records it in DVC first).

    `params` defaults to RUN/params.yaml; its `export` group names the model and sets opset and the
    parity tolerances. The test split is rebuilt with the run's own seed and fractions, so parity is
    measured on exactly the images the run was tested on.
    """
    from tqdm import tqdm

    src = _read_inputs(Path(run), params, force)
    name = sanitize_name(src.params.export.name or Path(src.target).name)
    model_dir = Path(repo) / name
    created = [p for p in (model_dir, *model_dir.parents) if not p.exists()]  # to remove on failure
    model_dir.mkdir(parents=True, exist_ok=True)
    staging, held, cleaned = open_staging(model_dir)
    if cleaned:
        log.warning("removed leftovers of killed exports in %s: %s", model_dir, ", ".join(cleaned))
    steps = tqdm(total=4, desc="export", unit="step", disable=not progress)
    try:
        built = _build(src, staging, steps, progress)
        steps.set_postfix_str("publish")
        meta = _publish(src, built, staging, model_dir, promote)
        steps.update()
    except BaseException:
        _undo(staging, model_dir, created)
        raise
    finally:
        steps.close()
        if held is not None:
            os.close(held)
    return {**meta, "path": str(model_dir / str(meta["version"]))}


def _read_inputs(run: Path, params: Params | None, force: bool) -> _Inputs:
    """Read and check the run, its gate, checkpoint and test split; nothing is written yet."""
    import torch

    from transferkit import zoo

    metrics, ckpt, run_params = _read_run(run)
    params = params or run_params or Params()
    validation, closed = _gate(run)
    if closed and not force:
        raise ExportError(f"refusing to export: {closed}. Fix the run, or export anyway with force=True (--force)")
    model, fmeta, cfg, classes = _load_checkpoint(ckpt, metrics)
    split = run_params or params
    seed = int(metrics.get("seed", split.seed))
    ds, test = _test_split(run, metrics, split, seed, classes, ckpt)
    if params.export.check_images and len(test) > params.export.check_images:
        from transferkit.data import subsample

        test = subsample(test, params.export.check_images, seed)
    transform = zoo.eval_transform(cfg)
    warn = []
    if metrics.get("data_md5") and metrics["data_md5"] != ds.md5:
        warn.append(f"target data changed since training (md5 {ds.md5} != {metrics['data_md5']}); parity ran on it")
    return _Inputs(
        run=run,
        metrics=metrics,
        params=params,
        validation=validation,
        closed=closed,
        force=force,
        ckpt=ckpt,
        model=model,
        fmeta=fmeta,
        cfg=cfg,
        classes=classes,
        target=str(metrics["target"]),
        seed=seed,
        train=ds.splits.get("train") or [],
        test=test,
        transform=transform,
        example=torch.stack([transform(_rgb(p)) for p, _ in test[:2]]),
        warn=warn,
    )


def _load_checkpoint(ckpt: Path, metrics: dict) -> tuple[Any, dict, dict, list[str]]:
    """(model in eval mode on CPU, file header, data config, class names), the names checked against its head."""
    from transferkit import zoo

    try:
        loaded = zoo.create_model(f"file:{ckpt}")
    except zoo.ZooError as e:
        raise ExportError(str(e) if str(ckpt) in str(e) else f"checkpoint {ckpt}: {e}") from None
    except Exception as e:  # safetensors/torch errors on damaged files
        raise ExportError(f"checkpoint {ckpt}: cannot load ({type(e).__name__}: {e})") from None
    model = loaded.model.eval().to("cpu")
    fmeta = loaded.file_meta
    try:
        classes = json.loads(fmeta["classes"]) if fmeta.get("classes") else list(metrics.get("classes") or [])
    except ValueError:
        raise ExportError(f"checkpoint {ckpt}: header 'classes' is not a JSON list") from None
    num_classes = int(getattr(model, "num_classes", len(classes)))
    if len(classes) != num_classes:
        raise ExportError(f"checkpoint {ckpt}: {len(classes)} class names for a {num_classes}-way head")
    return model, fmeta, loaded.data_config, classes


def _test_split(run: Path, metrics: dict, split: Params, seed: int, classes: list[str], ckpt: Path) -> tuple[Any, list]:
    """(the run's target with its own seed and fractions, the test split it was tested on: >= 2 images)."""
    from transferkit.data import DataError, load_with_params

    target = metrics.get("target")
    if not target:
        raise ExportError(f"{run / 'metrics.json'} lacks 'target' (the dataset folder parity runs on)")
    try:
        ds = load_with_params(target, split, seed=seed)
    except DataError as e:
        raise ExportError(f"parity needs the run's real test images: {e}") from None
    if ds.classes != classes:
        raise ExportError(f"target {target} has classes {ds.classes}, the checkpoint {ckpt} was trained on {classes}")
    test = ds.splits.get("test") or []
    if len(test) < 2:
        raise ExportError(f"target {target}: the test split has {len(test)} image(s); parity needs at least 2")
    return ds, test


def _build(src: _Inputs, staging: Path, steps, progress: bool) -> _Built:
    """ONNX export, parity gate, int8: all inside STAGING/raw, the exporter's own folder (anything it writes
    beside the file dies with it)."""
    raw = staging / "raw"
    raw.mkdir()
    steps.set_postfix_str("onnx export")
    how, proto, opset = _to_onnx(src, raw / "model.onnx")
    steps.update()
    steps.set_postfix_str("parity")
    parity = _parity_gate(src, raw / "model.onnx", progress)
    steps.update()
    steps.set_postfix_str("int8")
    int8 = quantize_int8(
        raw / "model.onnx",
        raw / INT8_FILE,
        src.train,
        src.test,
        src.transform,
        parity["onnx_test_accuracy"],
        src.params.export,
        seed=src.seed,
    )
    steps.update()
    return _Built(proto=proto, opset=opset, how=how, parity=parity, int8=int8)


def _to_onnx(src: _Inputs, path: Path) -> tuple[dict, Any, int]:
    """(how it was exported, the loaded graph, its real opset), after the graph and full checker checks."""
    import onnx

    opset = src.params.export.opset
    how = export_onnx(src.model, src.example, path, opset, src.params.export.exporter)
    proto = onnx.load(str(path), load_external_data=True)
    actual = _check_graph(proto, opset, len(src.classes))
    onnx.checker.check_model(str(path), full_check=True)
    return how, proto, actual


def _parity_gate(src: _Inputs, path: Path, progress: bool) -> dict[str, Any]:
    """parity_check on the test split; ExportError unless it is within export.parity_atol and agreement."""
    from transferkit.train import read_test_logits

    reference = read_test_logits(src.run, src.test, src.metrics.get("checkpoint_sha256"))
    parity = parity_check(src.model, path, src.test, src.transform, progress=progress, reference=reference)
    atol, min_agree = src.params.export.parity_atol, src.params.export.min_top1_agreement
    if not parity["max_abs_diff"] <= atol or parity["top1_agreement"] < min_agree:
        raise ExportError(
            f"ONNX parity failed on {parity['n_images']} test images of {src.target}: max abs logit diff "
            f"{parity['max_abs_diff']:.3g} (allowed {atol:g}, largest |logit| {parity['max_abs_logit']:.3g}), "
            f"top-1 agreement {parity['top1_agreement']:.4f} (required {min_agree:g}); nothing was published"
        )
    return parity


def _publish(src: _Inputs, built: _Built, staging: Path, model_dir: Path, promote_it: bool = True) -> dict[str, Any]:
    """Number, write, rename and promote the version, all under the repository lock; returns its metadata."""
    with repo_lock(model_dir):
        version = next_version(model_dir)
        meta = _metadata(src, built, model_dir.name, version)
        _write_version(src, built, meta, staging)
        publish(staging, model_dir, version)
        write_triton_config(model_dir, version, meta, create=True)
        # the promotion: last, after everything (we already hold the repository lock)
        if promote_it:
            promote(model_dir.parent, model_dir.name, version, reason=f"export of {src.run}", lock=False)
    return meta


def _write_version(src: _Inputs, built: _Built, meta: dict, staging: Path) -> None:
    """The version's files in STAGING, metadata embedded and each artifact's sha256 in metadata.json."""
    import onnx

    raw, onnx_path = staging / "raw", staging / "model.onnx"
    _embed_metadata(built.proto, meta)
    onnx.save_model(built.proto, str(onnx_path), save_as_external_data=False)
    if built.int8["kept"]:
        proto8 = onnx.load(str(raw / INT8_FILE))
        _embed_metadata(proto8, {**meta, "precision": "int8"})
        onnx.save_model(proto8, str(staging / INT8_FILE), save_as_external_data=False)
        onnx.checker.check_model(str(staging / INT8_FILE))
    shutil.rmtree(raw)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    meta["sha256"] = sha256_file(onnx_path)
    if built.int8["kept"]:
        meta["int8"]["sha256"] = sha256_file(staging / INT8_FILE)
    meta["reference"] = write_reference(src.model, src.test, src.transform, staging / REFERENCE_FILE)
    write_json(staging / "metadata.json", meta)
    atomic_write_text(staging / "model_card.md", model_card(meta, src.metrics, src.validation))


def _undo(staging: Path, model_dir: Path, created: list[Path]) -> None:
    """A failed export leaves the repository as it was: its staging folder and any folder it made go."""
    shutil.rmtree(staging, ignore_errors=True)
    if created and not list_versions(model_dir):
        with suppress(OSError):
            (model_dir / ".lock").unlink()
    for p in created:  # deepest first; only folders this call made, and only if empty
        with suppress(OSError):
            p.rmdir()


def _rgb(path):
    from transferkit.data import load_rgb

    return load_rgb(path)


def write_reference(model, samples: list, transform, path: Path) -> dict[str, Any]:
    """The first REFERENCE_IMAGES test images (decoded RGB, original size) and torch's logits for them.

    A server loads the file (np.load, allow_pickle=False), preprocesses the images its own way and runs the
    ONNX file: the end-to-end parity of this version in the serving environment, against torch itself.
    """
    import numpy as np
    import torch

    imgs = [_rgb(p) for p, _ in samples[:REFERENCE_IMAGES]]
    with torch.inference_mode():
        logits = model(torch.stack([transform(im) for im in imgs])).float().numpy()
    arrays = {f"image{i}": np.asarray(im, dtype=np.uint8) for i, im in enumerate(imgs)}
    np.savez_compressed(path, logits=logits.astype(np.float32), **arrays)  # in export's temp folder: no half file
    return {"file": REFERENCE_FILE, "n": len(imgs), "sha256": sha256_file(path)}


def _metadata(src: _Inputs, built: _Built, name: str, version: int) -> dict[str, Any]:
    """metadata.json: the contract keys (REQUIRED_KEYS) first, then the extras a reader and a server use."""
    return {**_contract(src, built), **_extras(src, built, name, version)}


def _contract(src: _Inputs, built: _Built) -> dict[str, Any]:
    cfg, parity, ep = src.cfg, built.parity, src.params.export
    return {
        "classes": src.classes,
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "opset": int(built.opset),
        "sha256": None,  # of model.onnx, filled in once the file is final
        "parity": {
            **{
                k: parity[k]
                for k in ("max_abs_diff", "top1_agreement", "n_images", "batch_sizes", "n_compared", "max_abs_logit")
            },
            "atol": ep.parity_atol,
            "min_top1_agreement": ep.min_top1_agreement,
        },
        "source_model": src.fmeta.get("source_model") or src.metrics.get("model"),
        "data_md5": src.metrics.get("data_md5"),
        "git_rev": git_rev(Path(__file__).resolve().parent),
        "params": src.params.model_dump(mode="json"),
    }


def _extras(src: _Inputs, built: _Built, name: str, version: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    cfg, metrics, parity, validation = src.cfg, src.metrics, built.parity, src.validation
    side = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    baseline = (validation or {}).get("baseline")
    return {
        "name": name,
        "version": version,
        "interpolation": cfg.get("interpolation"),
        "preprocess": {  # what zoo.eval_transform does; serving must do the same
            "resize_shorter_side": side[0],
            "center_crop": list(side),
            "interpolation": cfg.get("interpolation"),
            "scale": "pixel / 255",
            "normalize": "(x - mean) / std",
        },
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW float32 RGB, pixel/255 then (x - mean) / std; batch dim dynamic",
        "exporter": built.how["exporter"],
        "fallback_reason": built.how["fallback_reason"],
        "provider": parity["provider"],  # the one that actually ran the parity check
        "providers": [p if isinstance(p, str) else p[0] for p in execution_providers()],  # requested, in order
        "int8": built.int8,
        "triton": {
            "config": f"../{TRITON_CONFIG}",
            "backend": "onnxruntime",
            "max_batch_size": src.params.export.triton_max_batch_size,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "forced": bool(src.force and src.closed),
        "validation": {
            "passed": (validation or {}).get("passed"),
            "reasons": (validation or {}).get("reasons", []),
            "gate": src.closed or "passed",
        },
        "source_sha256": src.fmeta.get("source_sha256") or None,
        "strategy": src.fmeta.get("strategy") or metrics.get("strategy"),
        "strategy_reason": metrics.get("strategy_reason"),
        "shift": metrics.get("shift"),  # train's record of drift.json (None: not measured)
        "test_accuracy": metrics.get("test_accuracy"),
        "onnx_test_accuracy": parity["onnx_test_accuracy"],
        "torch_test_accuracy": parity["torch_test_accuracy"],
        "baseline": baseline if isinstance(baseline, dict) else None,
        "transfer": _transfer_record(validation),
        "run": str(src.run),
        "checkpoint_sha256": sha256_file(src.ckpt),
        "warnings": src.warn,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _embed_metadata(proto, meta: dict) -> None:
    """Copy the metadata into model.metadata_props (values JSON-encoded unless already strings).

    "sha256" is the one key left out: a file cannot contain its own hash; metadata.json carries it.
    """
    ours = {k: v for k, v in meta.items() if k != "sha256"}
    kept = [p for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for p in kept:  # the exporter's own pkg.torch.* entries
        proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in ours.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    proto.model_version = int(meta["version"])
    proto.doc_string = f"transferkit {meta['name']} v{meta['version']}: {len(meta['classes'])}-class image classifier"


# --------------------------------------------------------------------------- model card


def _transfer_record(validation) -> dict | None:
    """The gain verdict and every baseline from validation.json (the model card's "Transfer" table)."""
    if not isinstance(validation, dict) or "verdict" not in validation:
        return None
    keep = (
        "name",
        "description",
        "strategy",
        "model",
        "val_accuracy",
        "test_accuracy",
        "gain",
        "interval",
        "p_value",
        "broken",
        "broken_reason",
        "kind",
    )
    return {
        "verdict": validation.get("verdict"),
        "message": validation.get("verdict_message"),
        "gain": validation.get("transfer_gain"),
        "interval": validation.get("gain_interval"),
        "p_value": validation.get("gain_p_value"),
        "recommendation": validation.get("recommendation"),
        "baselines": [{k: b[k] for k in keep if k in b} for b in validation.get("baselines", [])],
    }


def _transfer_lines(transfer: dict | None) -> list[str]:
    if not transfer:
        return []
    lines = [
        "",
        "## Transfer vs no transfer (same splits; test accuracy)",
        f"- Verdict: **{transfer['verdict']}**: {transfer['message']}",
        "",
        "| baseline | val | test | gain of this model | interval | McNemar p |",
        "|---|---|---|---|---|---|",
    ]
    for b in transfer["baselines"]:
        if b.get("test_accuracy") is None:
            continue
        name = b.get("description") or b.get("strategy")
        name += " (broken: at chance, not the bar)" if b.get("broken") else ""
        iv = b.get("interval")
        lines.append(
            f"| {name} | {_pct(b.get('val_accuracy'))} | {_pct(b['test_accuracy'])} | "
            f"{100 * b['gain']:+.1f} points | "
            + (f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]" if iv else "-")
            + " | "
            + (f"{b['p_value']:.2g}" if b.get("p_value") is not None else "-")
            + " |"
        )
    rec = transfer.get("recommendation")
    if rec:
        lines += ["", f"- Likely reason: {rec['likely_reason']}", *[f"- Option: {o}" for o in rec["options"]]]
    return lines


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def _shift_line(shift: dict | None) -> str:
    if not shift:
        return "not measured (train ran without a drift.json; run `transferkit drift` against the source data)"
    what = (
        "task mismatch (the label sets differ)" if shift.get("task_mismatch") else f"views fired: {shift.get('method')}"
    )
    report = f"; report `{shift['report']}`" if shift.get("report") else ""
    return (
        f"**{shift.get('severity')}** (detected: {shift.get('drift_detected')}) between `{shift.get('reference')}` "
        f"and `{shift.get('current')}` ({shift.get('n_reference')} / {shift.get('n_current')} images); {what}{report}"
    )


def model_card(meta: dict, metrics: dict, validation: dict | None) -> str:
    """model_card.md: the model, its data and metrics, parity, int8, limitations and provenance."""
    parts = [*_card_model(meta), *_card_data(meta, metrics), *_card_errors(meta, validation)]
    return "\n".join([*parts, *_card_checks(meta), *_card_provenance(meta)])


def _card_errors(meta: dict, validation: dict | None) -> list[str]:
    """A link to validate's error-analysis page in the run folder (transferkit.report), when it wrote one."""
    rep = (validation or {}).get("errors_report")
    if not isinstance(rep, dict) or not rep.get("path"):
        return []
    pairs = ", ".join(f"{t} -> {p} ({n})" for t, p, n in rep.get("confused_pairs") or []) or "none"
    return [
        "## Error analysis",
        f"- [{Path(meta['run']) / rep['path']}]({(Path(meta['run']) / rep['path']).resolve().as_uri()}): "
        "highest-loss test and train images, most confused class pairs, train labels a held-out fit doubts",
        f"- Most confused (test): {pairs}; label-error candidates in train: {rep.get('label_doubts', 0)}",
        "",
    ]


def _card_model(meta: dict) -> list[str]:
    h, w = meta["input_size"][1], meta["input_size"][2]
    return [
        f"# {meta['name']} v{meta['version']}",
        "",
        f"An image classifier for {len(meta['classes'])} classes, adapted by transfer learning from "
        f"`{meta['source_model']}` and exported to ONNX (opset {meta['opset']}, {meta['exporter']} exporter).",
        "",
        "## Model",
        f"- Source model: `{meta['source_model']}`"
        + (f" (weights sha256 `{meta['source_sha256'][:16]}...`)" if meta.get("source_sha256") else ""),
        f"- Strategy: `{meta['strategy']}`" + (f": {meta['strategy_reason']}" if meta.get("strategy_reason") else ""),
        f"- Classes: {', '.join(f'`{c}`' for c in meta['classes'])}",
        f"- Input `{meta['input_name']}`: float32 [N, 3, {h}, {w}], N dynamic. Preprocessing: RGB; resize the "
        f"shorter side to {h} px ({meta.get('interpolation')}), centre-crop {h}x{w} (nothing is cut from "
        f"square images); scale to 0..1; (x - mean) / std with mean {meta['mean']} and std {meta['std']}.",
        f"- Output `{meta['output_name']}`: float32 [N, {len(meta['classes'])}] logits (softmax for probabilities).",
        "",
    ]


def _card_data(meta: dict, metrics: dict) -> list[str]:
    gate = "passed" if not meta["forced"] else f"**forced past a closed gate**: {meta['validation']['gate']}"
    return [
        "## Data",
        f"- Target data: `{metrics.get('target')}`, md5 `{meta['data_md5']}`; "
        f"{metrics.get('n_train')} train / {metrics.get('n_val')} val / {metrics.get('n_test')} test images, "
        f"{metrics.get('labels_per_class')} labels per class at least",
        f"- Domain shift: {_shift_line(meta.get('shift'))}",
        f"- Validation gate: {gate}",
        "",
        "## Metrics",
        f"- Test accuracy (torch, from training): {_vs_baseline(meta)}",
        f"- Test accuracy of this ONNX file: {_pct(meta.get('onnx_test_accuracy'))} on "
        f"{meta['parity']['n_images']} test images",
        f"- Train / validation accuracy: {_pct(metrics.get('train_accuracy'))} / {_pct(metrics.get('val_accuracy'))}"
        f" (best epoch {metrics.get('best_epoch')} of {metrics.get('epochs')})",
        *_transfer_lines(meta.get("transfer")),
        "",
    ]


def _vs_baseline(meta: dict) -> str:
    baseline = meta.get("baseline") or {}
    base_acc, test_acc = baseline.get("test_accuracy"), meta.get("test_accuracy")
    if not (isinstance(base_acc, (int, float)) and isinstance(test_acc, (int, float))):
        return f"{_pct(test_acc)} (no baseline recorded in validation.json)"
    what = baseline.get("description") or baseline.get("strategy", "baseline")
    return (
        f"{_pct(test_acc)} vs {_pct(base_acc)} for the best no-transfer baseline ({what}; "
        f"{100 * (test_acc - base_acc):+.1f} points)"
    )


def _card_checks(meta: dict) -> list[str]:
    p, int8 = meta["parity"], meta["int8"]
    lines = [
        "## Parity (onnxruntime vs torch)",
        f"- Max abs logit difference {p['max_abs_diff']:.3g} (allowed {p['atol']:g}), top-1 agreement "
        f"{p['top1_agreement']:.4f} (required {p['min_top1_agreement']:g})",
        f"- {p['n_compared']} comparisons on the real test split at batch sizes {p['batch_sizes']}, "
        f"execution provider `{meta['provider']}`",
        "",
        "## int8",
        f"- {int8['reason']}" + (f"; file `{INT8_FILE}` sha256 `{int8['sha256']}`" if int8["kept"] else ""),
        "",
        "## Limitations",
        "- Trained on a small target set: expect lower accuracy on images unlike it (other sensors, "
        "backgrounds, resolutions); monitor drift on served inputs.",
        "- The model expects the exact preprocessing above; other resizing or normalisation degrades it.",
        "- It always answers with one of its classes; it has no 'unknown' output.",
        "- Parity was measured on the CPU/GPU provider named above; other providers or quantisation "
        "need their own check.",
    ]
    if meta.get("warnings"):
        lines += ["", "## Warnings", *[f"- {w}" for w in meta["warnings"]]]
    return lines


def _card_provenance(meta: dict) -> list[str]:
    return [
        "",
        "## Provenance",
        f"- Run: `{meta['run']}`, checkpoint sha256 `{meta['checkpoint_sha256']}`",
        f"- model.onnx sha256 `{meta['sha256']}`",
        f"- Code revision: `{meta['git_rev']}`; created {meta['created']}",
        f"- torch {meta['versions']['torch']}, onnx {meta['versions']['onnx']}, "
        f"onnxruntime {meta['versions']['onnxruntime']}",
        "",
    ]
