"""The latent cache: moments equal the tokenizer's, reuse, normalisation, refusal of foreign latents."""

import numpy as np
import pytest
import torch

from ldetok.data import build_dataset
from ldetok.latents import LatentCache, LatentStatsMismatch, build_latent_cache
from ldetok.runs import load_tokenizer, save_tokenizer
from ldetok.tokenizers import DiagonalGaussian


def test_cache_matches_tokenizer_and_is_reused(tok_run, tmp_path):
    cache = build_latent_cache(tok_run, limit=40, flip=True, out_dir=tmp_path / "c", batch_size=16, verbose=False)
    tok = load_tokenizer(tok_run)
    ds = build_dataset("fashion_mnist", "train", 32, 3)
    x, y = ds.tensor_batch(list(range(40)))
    with torch.no_grad():
        ref = tok.encode_moments(x)
        ref_f = tok.encode_moments(torch.flip(x, dims=[3]))
    assert cache.moments.shape == (40, 32, 4, 4)
    assert np.allclose(cache.moments, ref.numpy(), atol=1e-5)
    assert np.allclose(cache.moments_flip, ref_f.numpy(), atol=1e-5)
    assert torch.equal(cache.labels, y)
    mtime = (tmp_path / "c" / "moments.npy").stat().st_mtime_ns
    again = build_latent_cache(tok_run, limit=40, flip=True, out_dir=tmp_path / "c", verbose=False)
    assert (tmp_path / "c" / "moments.npy").stat().st_mtime_ns == mtime and len(again) == 40


def test_cache_batches_are_normalised_posterior_samples(tok_run, tmp_path):
    cache = build_latent_cache(tok_run, limit=32, out_dir=tmp_path / "c", verbose=False)
    tok = load_tokenizer(tok_run)
    idx = [5, 1, 7]
    z, y = cache.batch(idx, generator=torch.Generator().manual_seed(0))
    # the same draw through the tokenizer's own path
    mom = torch.from_numpy(np.array(cache.moments[idx]))
    ref = tok.normalize(DiagonalGaussian(mom, dim=1).sample(torch.Generator().manual_seed(0)))
    assert torch.allclose(z, ref, atol=1e-6)
    assert y.tolist() == cache.labels[idx].tolist()
    cache.check_tokenizer(tok, tok_run)


def test_cache_refuses_another_tokenizer(tok_run, tmp_path):
    cache = build_latent_cache(tok_run, limit=16, out_dir=tmp_path / "c", verbose=False)
    other = load_tokenizer(tok_run)
    other.set_latent_stats(other.latent_mean + 1.0, other.latent_std)
    with pytest.raises(LatentStatsMismatch, match="not normalised"):
        cache.check_tokenizer(other)
    save_tokenizer(other, tmp_path / "other")
    with pytest.raises(LatentStatsMismatch):
        cache.check_tokenizer(load_tokenizer(tmp_path / "other"), tmp_path / "other")


def test_incomplete_cache_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LatentCache(tmp_path)
    (tmp_path / "meta.json").write_text('{"complete": false}')
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(tmp_path)
