"""The importance-weighted bound's passes: sizes tuned on the first batch (doubling while
the time per evaluation falls, within the memory), retried smaller when out of memory, and
bf16 autocast as an option; none of it changes which samples each example gets."""

import pytest
import torch
from decoders import gated

from lightning_modules import PixelVAE
from lightning_modules.iwae_chunks import ChunkTuner, _Search


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3), generator=g)


def small_vae(**kwargs) -> PixelVAE:
    torch.manual_seed(0)
    model = PixelVAE(latent_dim=5, pixelcnn=gated(n_layers=1, channels=8), **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_the_tuner_doubles_while_evaluations_get_cheaper_then_keeps_the_fastest():
    search = _Search(n=1, cap=64)
    for n, rate in [(1, 10.0), (2, 6.0), (4, 4.0), (8, 4.1)]:  # 8 is no faster than 4
        assert search.n == n and not search.settled
        ChunkTuner.learn(search, n, rate)
    assert search.settled and search.n == 4
    capped = _Search(n=16, cap=32)
    ChunkTuner.learn(capped, 16, 2.0)
    ChunkTuner.learn(capped, 32, 1.0)  # faster, but 64 is past the memory cap
    assert capped.settled and capped.n == 32


def test_a_tuned_bound_equals_the_fixed_pass_bound_and_the_size_is_kept():
    """The tuner's passes (1, 2, 4, ... samples) give each example the same samples as fixed
    passes; the size it settles on is used for the next batch of that size."""
    x, index = binary_images(6), torch.arange(6)
    tuned, fixed = small_vae(), small_vae(iwae_batch=6 * 50)
    with tuned.per_example_noise(index):
        a = tuned.log_likelihood_bound(x, 50)
    with fixed.per_example_noise(index):
        b = fixed.log_likelihood_bound(x, 50)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    search = tuned.chunk_tuner.searches[6]
    assert search.n >= 1 and search.cap == 4096 // 6
    assert tuned.iwae_samples_per_pass(6) == search.n


def test_a_pass_out_of_gpu_memory_is_run_again_at_half_the_size(monkeypatch):
    """A pass of more than 4 samples 'runs out of memory': the tuner caps the size and the
    bound completes with the same samples."""
    x, index = binary_images(3), torch.arange(3)
    model, reference = small_vae(), small_vae(iwae_batch=3)
    model.chunk_tuner.searches[3] = _Search(n=16, cap=1000)
    log_weights = model.log_weights
    sizes = []

    def limited(x, q, eps):
        n = eps["z"].shape[1]
        sizes.append(n)
        if n > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return log_weights(x, q, eps)

    monkeypatch.setattr(model, "log_weights", limited)
    with model.per_example_noise(index):
        bound = model.log_likelihood_bound(x, 20)
    with reference.per_example_noise(index):
        expected = reference.log_likelihood_bound(x, 20)
    torch.testing.assert_close(bound, expected, rtol=1e-5, atol=1e-4)
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 4
    assert model.chunk_tuner.searches[3].settled


def test_out_of_memory_at_one_sample_is_not_hidden(monkeypatch):
    model = small_vae()
    model.chunk_tuner.searches[2] = _Search(n=1, cap=1)

    def broke(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "log_weights", broke)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.log_likelihood_bound(binary_images(2), 5)


def test_bf16_passes_give_a_float32_bound_close_to_the_float32_one():
    """Autocast reaches the decoder (the bound moves) but not the likelihood's float32 sums;
    benchmarks/iwae_speed.py measures the difference on a trained model."""
    x, index = binary_images(4), torch.arange(4)
    exact, bf16 = small_vae(), small_vae(iwae_bf16=True)
    with exact.per_example_noise(index):
        a = exact.log_likelihood_bound(x, 10)
    with bf16.per_example_noise(index):
        b = bf16.log_likelihood_bound(x, 10)
    assert b.dtype == torch.float32
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=2e-2, atol=1.0)
