"""Re-evaluates the shipped checkpoint (RUN/model.safetensors) on a data split and returns softmax probabilities, labels and classes. On the test split, train's stored test logits stand in once a seeded sample of test images reproduces them to LOGIT_ATOL. Used by the quality report, the baselines, the error report and the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.core.config import Params


def predict_test(
    run: Path, metrics: dict, params: Params, split: str = "test"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Softmax probabilities [N, C] and labels [N] of the checkpoint in RUN on a split (test by default)."""
    import torch

    from transferkit.core.numeric import softmax
    from transferkit.data.folder import DataError, load_with_params
    from transferkit.data.loader import make_loader
    from transferkit.models import zoo
    from transferkit.models.embed import torch_threads

    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    if ds.md5 != metrics.get("data_md5"):
        raise DataError(f"{metrics['target']}: data changed since training (md5 differs); re-train before validating")
    torch_threads()
    lm = zoo.create_model(f"file:{run / 'model.safetensors'}")
    samples = ds.splits[split]
    transform = zoo.eval_transform(lm.data_config)
    stored = _checked_test_logits(run, metrics, samples, lm.model, transform) if split == "test" else None
    labels = np.array([y for _, y in samples], dtype=np.int64)
    if stored is not None:
        return softmax(stored).astype(np.float32), labels, list(ds.classes)
    loader = make_loader(samples, transform, params.data.batch_size)
    probs = []
    with torch.inference_mode():
        for xb, _ in loader:
            probs.append(torch.softmax(lm.model(xb).float(), dim=1))
    return torch.cat(probs).numpy(), labels, list(ds.classes)


# train's stored test logits stand for the checkpoint's when a seeded sample of this many test images, run
# through the checkpoint here, reproduces them to LOGIT_ATOL (float32 on one CPU: ~1e-5 between batchings)
LOGIT_CHECK_IMAGES = 32
LOGIT_ATOL = 1e-3


def _checked_test_logits(run: Path, metrics: dict, samples: list, model, transform):
    """Train's test logits (OUT/test_logits.npz) once the checkpoint reproduces them on a sample, else None."""
    import torch

    from transferkit.data.loader import make_loader, subsample
    from transferkit.train.outputs import read_test_logits

    stored = read_test_logits(run, samples, metrics.get("checkpoint_sha256"))
    if stored is None or len(samples) == 0:
        return None
    idx = subsample(list(range(len(samples))), LOGIT_CHECK_IMAGES, 0)  # in split order
    with torch.inference_mode():
        got = torch.cat([model(x).float() for x, _ in make_loader([samples[i] for i in idx], transform, 32)])
    diff = float(np.max(np.abs(got.numpy() - stored[idx])))
    return stored if diff <= LOGIT_ATOL else None
