"""onnxruntime sessions as export's parity gate and the server both open them: explicit providers, fp32."""

from __future__ import annotations

from pathlib import Path


def execution_providers(available: list[str] | None = None, cuda: bool | None = None) -> list:
    """The explicit provider list, best first: TensorRT, CUDA (only with a usable GPU), then CPU.

    onnxruntime-gpu lists TensorRT and CUDA even on a CPU-only machine, so a GPU must also be visible to
    torch. Precision stays fp32 (no TRT fp16/int8, no TF32 on CUDA) so that the parity gate compares
    like with like.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    cuda = _cuda_usable() if cuda is None else cuda
    out: list = []
    if cuda and "TensorrtExecutionProvider" in available:
        out.append(("TensorrtExecutionProvider", {"trt_fp16_enable": "False", "trt_int8_enable": "False"}))
    if cuda and "CUDAExecutionProvider" in available:
        out.append(("CUDAExecutionProvider", {"use_tf32": "0"}))
    out.append("CPUExecutionProvider")
    return out


def ort_session(path: Path, providers: list | None = None, threads: int = 0):
    """An onnxruntime session with explicit providers (default: execution_providers()) and `threads`
    intra-op threads (0: onnxruntime's default).

    A provider that cannot start (e.g. TensorRT libraries missing) is skipped by onnxruntime, and a
    session that fails on the GPU list is retried on CPU alone, so the second value, the provider that
    actually runs (sess.get_providers()[0]), is what gets recorded.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if providers is None:
        providers = execution_providers()
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception:
        if providers == ["CPUExecutionProvider"]:
            raise
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return sess, sess.get_providers()[0]


def _cuda_usable() -> bool:
    """Whether torch sees a GPU. Without torch (a serving image) CUDA is requested whenever onnxruntime
    lists it: onnxruntime falls back to CPU when no GPU or CUDA library is there, and the provider that
    really runs is what the session reports."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False
