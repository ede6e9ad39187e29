"""noise=laplace: Laplace(0, 1) at NEFTune's per-sequence scale, on real tokens only."""

import math

import pytest
import torch

from neftlab.methods import noise
from neftlab.methods.noise.laplace import inverse_cdf
from tests.methods.test_noise import DIM, LENGTHS, added_noise, padded_batch, tiny_llama


def test_laplace_noise_has_neftunes_scale_per_sequence_and_laplaces_moments():
    model, (ids, mask) = tiny_llama(), padded_batch()
    with noise.attach(model, "laplace", alpha=5.0, seed=2):
        delta = added_noise(model, ids, mask)
    for i, n in enumerate(LENGTHS):
        scale = 5.0 / math.sqrt(n * DIM)
        real = delta[i, :n] / scale  # Laplace(0, 1): mean |x| 1, variance 2
        assert real.abs().mean().item() == pytest.approx(1.0, rel=0.1)
        assert real.var().item() == pytest.approx(2.0, rel=0.2)
        assert torch.count_nonzero(delta[i, n:]) == 0


def test_laplace_noise_follows_its_own_seeded_stream():
    model, (ids, mask) = tiny_llama(), padded_batch()
    draws = []
    for _ in range(2):
        with noise.attach(model, "laplace", alpha=5.0, seed=9):
            draws.append(added_noise(model, ids, mask))
    assert torch.equal(draws[0], draws[1])


def test_the_draw_at_the_edge_of_the_uniform_range_stays_finite():
    """uniform_(-0.5, 0.5) can return -0.5, where Laplace's inverse CDF is infinite: the tail ends at -log(eps)."""
    u = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5 - 2 ** -24])
    x = inverse_cdf(u)
    assert torch.isfinite(x).all()
    assert x[0].item() == pytest.approx(math.log(torch.finfo(torch.float32).eps), rel=1e-6)  # -15.9
    assert torch.equal(x[1:], (-torch.sign(u) * torch.log1p(-2 * u.abs()))[1:])  # every other draw as before
