"""embed: one cache per (model, weights, dataset md5, size), filled incrementally and shared by stages."""

from __future__ import annotations

import numpy as np

from transferkit.data.folder import load_dataset
from transferkit.models import embed


def _counting(monkeypatch):
    calls = []
    real = embed.forward

    def spy(lm, samples, *a, **k):
        calls.append(len(samples))
        return real(lm, samples, *a, **k)

    monkeypatch.setattr(embed, "forward", spy)
    return calls


def test_cache_embeds_only_missing_images_and_serves_subsets(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    calls = _counting(monkeypatch)
    ds = load_dataset(tiny_target)
    train, test = ds.splits["train"], ds.splits["test"]
    a = embed.compute_embeddings("mobilenetv2_100", train, ds.md5, image_size=32, progress=False)
    b = embed.compute_embeddings("mobilenetv2_100", train + test, ds.md5, image_size=32, progress=False)
    c = embed.compute_embeddings("mobilenetv2_100", test[::-1], ds.md5, image_size=32, progress=False)
    assert calls == [len(train), len(test)]  # the third call is served from the cache
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 1
    np.testing.assert_array_equal(b["features"][: len(train)], a["features"])
    np.testing.assert_array_equal(c["features"], b["features"][len(train) :][::-1])
    assert a["logits"].shape == (len(train), 1000)  # ImageNet head kept for LEEP / output drift
    np.testing.assert_array_equal(c["labels"], [y for _, y in test[::-1]])


def test_other_size_or_data_is_another_cache_entry(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    calls = _counting(monkeypatch)
    ds = load_dataset(tiny_target)
    s = ds.splits["val"]
    embed.compute_embeddings("mobilenetv2_100", s, ds.md5, image_size=32, progress=False)
    embed.compute_embeddings("mobilenetv2_100", s, ds.md5, image_size=48, progress=False)
    embed.compute_embeddings("mobilenetv2_100", s, "0" * 32, image_size=32, progress=False)
    assert calls == [len(s)] * 3


def test_damaged_cache_is_rebuilt_not_trusted(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path))
    ds = load_dataset(tiny_target)
    s = ds.splits["val"]
    good = embed.compute_embeddings("mobilenetv2_100", s, ds.md5, image_size=32, progress=False)
    (f,) = (tmp_path / "embeddings").glob("*.npz")
    f.write_bytes(b"garbage")
    again = embed.compute_embeddings("mobilenetv2_100", s, ds.md5, image_size=32, progress=False)
    np.testing.assert_allclose(again["features"], good["features"], rtol=1e-5, atol=1e-6)


def test_scratch_features_repeat_across_processes_state(tiny_target, tmp_path, monkeypatch):
    """Random init is seeded: a fresh model (cache cleared) gives the same features."""
    import torch

    ds = load_dataset(tiny_target)
    s = ds.splits["val"][:8]
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "one"))
    first = embed.compute_embeddings("scratch:mobilenetv2_100", s, ds.md5, image_size=32, progress=False)
    embed.source_model.cache_clear()
    torch.manual_seed(1234)  # whatever the caller's RNG state, init is the same
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "two"))
    second = embed.compute_embeddings("scratch:mobilenetv2_100", s, ds.md5, image_size=32, progress=False)
    np.testing.assert_allclose(first["features"], second["features"], rtol=1e-5, atol=1e-6)
    assert "logits" not in first  # a random head says nothing about the source task
