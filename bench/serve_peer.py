"""A peer model server on one model.onnx, for bench/serve.py's side-by-side (run with the peers' venv).

    bench/.work/peers-venv/bin/python bench/serve_peer.py kserve   --onnx M --port P [--threads 1]
    bench/.work/peers-venv/bin/python bench/serve_peer.py pytriton --onnx M --port P [--threads 1]

kserve: KServe's ModelServer (the `kserve` PyPI package, uvicorn + its V2 data plane) with a kserve.Model
whose predict runs the onnxruntime session. pytriton: NVIDIA's tritonserver as PyTriton bundles it,
with the session behind a Python-backend function and Triton's dynamic batcher (max batch 32, as
export's config.pbtxt). Both speak the Open Inference Protocol over HTTP on --port; the session
options are those of `transferkit serve --threads N` (intra-op N, CPU).
"""

import os.path
import sys

# bench/select.py would shadow the stdlib's select (as in bench/serve.py): drop this folder from the path first
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import uuid  # noqa: E402


def session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def run_kserve(a) -> None:
    from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

    sess = session(a.onnx, a.threads)

    class OnnxModel(Model):
        def __init__(self, name: str):
            super().__init__(name)
            self.ready = True

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            out = sess.run(["logits"], {"input": x})[0]
            o = InferOutput(name="logits", shape=list(out.shape), datatype="FP32")
            o.set_data_from_numpy(out, binary_data=False)
            # kserve's response model needs an id; a request without one gets a fresh one
            return InferResponse(model_name=self.name, infer_outputs=[o], response_id=payload.id or str(uuid.uuid4()))

    import logging

    server = ModelServer(
        http_port=a.port, grpc_port=a.port + 1, workers=1, enable_grpc=False, enable_latency_logging=False
    )
    for name in ("uvicorn.access", "kserve.trace"):  # as `transferkit serve`: no line per request
        logging.getLogger(name).disabled = True
    server.start([OnnxModel(a.name)])


def run_pytriton(a) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    sess = session(a.onnx, a.threads)
    inp = sess.get_inputs()[0]

    @batch
    def infer(**inputs):
        return {"logits": sess.run(["logits"], {"input": inputs["input"]})[0]}

    cfg = TritonConfig(http_port=a.port, grpc_port=a.port + 1, metrics_port=a.port + 2, log_verbose=0)
    with Triton(config=cfg) as triton:
        triton.bind(
            model_name=a.name,
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=tuple(inp.shape[1:]))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher()),
            strict=False,
        )
        print(json.dumps({"serving": a.name, "port": a.port}), flush=True)
        triton.serve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["kserve", "pytriton"])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="digits")
    ap.add_argument("--threads", type=int, default=1)
    a, _ = ap.parse_known_args()
    {"kserve": run_kserve, "pytriton": run_pytriton}[a.kind](a)


if __name__ == "__main__":
    main()
