"""The export stage: ONNX conversion with parity checks, int8 quantisation, the model card, publishing into the model repository, and promotion.

Export: a validated train run -> one ONNX file in a versioned model repository, behind a parity gate.

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
