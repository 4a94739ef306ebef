"""Static int8 (QDQ) quantisation of the exported fp32 file with onnxruntime. The high-resolution Convs stay float32, calibration uses training images of the target, and model.int8.onnx is kept only if its test accuracy stays within export.int8_max_drop of fp32; a failure is recorded, never raised."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from transferkit.export.convert import PARITY_BATCH, ExportError
from transferkit.modelrepo.repository import (
    INPUT_NAME,
    INT8_FILE,
    OUTPUT_NAME,
)
from transferkit.modelrepo.runtime import ort_session

# --------------------------------------------------------------------------- int8


class _CalibrationReader:
    """Feeds onnxruntime's calibrator batches of preprocessed training images ({"input": NCHW})."""

    def __init__(self, samples: list, transform, batch_size: int = 32):
        from transferkit.data.loader import make_loader

        self._batches = iter(make_loader(samples, transform, batch_size=batch_size))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch[0].numpy()}

    def rewind(self) -> None:  # the CalibrationDataReader protocol; calibration reads once
        pass


def onnx_accuracy(path: Path, samples: list, transform, providers: list | None = None) -> tuple[float, str]:
    """Top-1 accuracy of an ONNX classifier on (path, label) samples, and the provider that ran."""
    import numpy as np

    from transferkit.data.loader import make_loader

    sess, provider = ort_session(path, providers)
    correct = 0
    for x, y in make_loader(samples, transform, batch_size=PARITY_BATCH):
        out = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np.float32)})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
    return correct / len(samples), provider


def high_resolution_convs(model_path: Path, fraction: float) -> list[str]:
    """Names of the Conv nodes whose input feature map is at least `fraction` of the image side.

    These stay float32 in model.int8.onnx. int8 rounding in the stem and the first depthwise convs costs far
    more accuracy than in any later layer, and the fp32 model is itself fragile on smooth upscaled images:
    rounding noise at high resolution looks like fine texture, which ImageNet features respond to strongly.
    The low-resolution layers keep most of the int8 speed-up (measurements: docs/stages.md, export).
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

    from transferkit.data.loader import subsample

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
            reduce_range=ep.int8_reduce_range,  # without it, int8 accuracy drops on AVX2 without VNNI (saturation)
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
