"""Small numeric helpers shared by stages that must agree to the last digit (numpy only)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] logits, in float64 (max-subtracted: no overflow for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def one_blas_thread():
    """A context in which BLAS/OpenMP pools (scikit-learn's solvers, numpy's linear algebra) use one thread.

    torch keeps its own OpenMP threads busy-waiting for a while after each op; BLAS threads started on top of
    them oversubscribed 2 cores until scikit-learn's logistic regression on ~100 samples took minutes. The
    problems solved here are small (hundreds of samples), where one thread is also the fastest."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)
