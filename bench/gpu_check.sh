#!/usr/bin/env bash
# GPU check for issue 5, for a session that has the device tool lent (one run, < 5 min):
#   run(command="bash bench/gpu_check.sh", timeout_s=420)
# Full fine-tune on CUDA with bf16 autocast + channels_last through `transferkit train`, against a bare timm
# loop on the same model, data and batch size (bench/transfer.py --overhead picks CUDA when present).
# Needs the project installed there (make install); the device machine reaches no registry, so this only
# works where torch/timm are already importable. Results land in $OUT (or bench/.work/transfer/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
timeout 280 "$PY" -m bench.transfer --overhead | tee "${OUT:-/tmp}/gpu_overhead.json"

# Issue 33: one transformer (ViT-S/16, random weights: cost and numerics do not depend on their values).
# bf16 autocast full fine-tune img/s at 224 px, then the fp32 ONNX export run by onnxruntime's CUDA and
# TensorRT providers (where the build has them) against torch fp32 on the same batch: max |logit diff|.
timeout 240 "$PY" - <<'PY' | tee "${OUT:-/tmp}/gpu_transformer.json"
import json, time, tempfile, os
import torch, timm
out = {"model": "vit_small_patch16_224", "side": 224}
if not torch.cuda.is_available():
    print(json.dumps({**out, "skipped": "no CUDA"})); raise SystemExit(0)
dev = torch.device("cuda")
torch.manual_seed(0)
model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.randn(64, 3, 224, 224, device=dev), torch.randint(0, 10, (64,), device=dev)
def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(); opt.step()
for _ in range(3): step()
torch.cuda.synchronize(); t0 = time.perf_counter(); n = 20
for _ in range(n): step()
torch.cuda.synchronize()
out["bf16_finetune_img_per_s"] = round(n * 64 / (time.perf_counter() - t0), 1)
model.eval()
xb = torch.randn(8, 3, 224, 224)
with torch.no_grad():
    ref = model.float().cpu()(xb).numpy()
path = os.path.join(tempfile.mkdtemp(), "vit.onnx")
torch.onnx.export(model, (xb,), path, input_names=["input"], output_names=["logits"], opset_version=17,
                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
import onnxruntime as ort
for ep in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
    if ep not in ort.get_available_providers():
        out[ep] = "not in this onnxruntime build"; continue
    try:
        s = ort.InferenceSession(path, providers=[ep, "CPUExecutionProvider"])
        got = s.run(["logits"], {"input": xb.numpy()})[0]
        out[ep] = {"ran_on": s.get_providers()[0], "max_abs_diff": float(abs(got - ref).max())}
    except Exception as e:
        out[ep] = f"failed: {type(e).__name__}: {str(e)[:200]}"
print(json.dumps(out))
PY
