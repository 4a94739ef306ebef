"""Small numeric helpers shared by stages that must agree to the last digit (numpy; `one_blas_thread` also loads
scipy's and scikit-learn's thread pools, to limit them)."""

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
    problems solved here are small (hundreds of samples), where one thread is also the fastest.

    threadpoolctl limits only the pools loaded when the context starts. scipy's own OpenBLAS and scikit-learn's
    OpenMP load on a solver's first call, so the first fit in a process ran on every core, and the linear probe's
    weights then differed in their last bits from a process where select had loaded them first."""
    import scipy.linalg  # noqa: F401  (scipy's OpenBLAS)
    import sklearn.linear_model  # noqa: F401  (scikit-learn's OpenMP)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)
