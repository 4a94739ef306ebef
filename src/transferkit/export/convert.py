"""ONNX conversion of a torch classifier and the parity check against torch. export_onnx tries the chosen exporter (TorchScript or dynamo) and falls back to the other; the written graph is checked for opset, names and a dynamic batch dim, and parity_check compares onnxruntime logits with torch's on real test images. ExportError, raised by every export step, lives here."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from transferkit.core.errors import TransferkitError
from transferkit.modelrepo.repository import (
    INPUT_NAME,
    OUTPUT_NAME,
)
from transferkit.modelrepo.runtime import ort_session

log = logging.getLogger("transferkit.export")


class ExportError(TransferkitError, ValueError):
    """An export that must not ship: failed gate, unloadable checkpoint, exporter or parity failure."""


DYNAMO_MIN_OPSET = 18  # the dynamo exporter cannot emit anything older (see the module note)
PARITY_BATCH = 32
PARITY_SINGLES = 8  # images also compared one at a time (batch 1)


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


def check_graph(proto, opset: int, num_classes: int) -> int:
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

    from transferkit.data.loader import make_loader

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
