"""The SNR distance (jaxmetric.distances.cross_snr_distances) and the SNR contrastive
loss (jaxmetric.losses.contrastive.snr_contrastive_loss) against float64 loops, the
contract of every pair-based loss (pair_loss_checks) and pytorch-metric-learning."""

import jax
import numpy as np
import pytest

from jaxmetric import distances, losses

import oracles_pair_losses as oracles
import pair_loss_checks as checks
from pair_loss_checks import Case

# Not the default margin 1 here: the SNR distance of any row to a zero row (one of the
# grid's rows) is exactly 1, a tie of the hinge that round-off breaks either way. The
# defaults are checked against PML below.
CASES = [
    Case(losses.snr_contrastive_loss, {"margin": 1.25}, oracles.snr_contrastive, "snr"),
    Case(losses.snr_contrastive_loss, {"margin": 0.8, "pos_margin": 0.1, "power": 2},
         oracles.snr_contrastive, "snr"),
]
IDS = [c.id for c in CASES]


@pytest.fixture(scope="module")
def grid():
    return checks.run_grid(CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_oracle_and_nonfinite_rule(grid, index):
    for reduction in checks.REDUCTIONS:
        checks.check_matches_oracle(grid, index, CASES[index], reduction)
    checks.check_nonfinite(grid, index, CASES[index])


def test_data_parallel_equals_single_device():
    results = checks.run_data_parallel(CASES)
    for index in range(len(CASES)):
        checks.check_data_parallel(results, index)


def test_gradients_reference_set_bfloat16():
    """(vmap: the grid above runs under one.)"""
    case = CASES[1]
    checks.check_finite_gradients([case])
    checks.check_grad_matches_oracle(case)
    checks.check_reference_set(case)
    checks.check_bfloat16(case)


def test_snr_distance_formula():
    """var(b - a) / var(a) of the normalised rows: not symmetric, invariant to each
    row's scale, 0 for a row with itself, finite for a constant (zero-variance) row."""
    rng = np.random.default_rng(60)
    a = (rng.normal(size=(4, 7)) * rng.uniform(0.1, 10.0, (4, 1))).astype(np.float32)
    b = rng.normal(size=(4, 7)).astype(np.float32)
    snr = jax.jit(distances.cross_snr_distances)  # one compilation: all (4, 7) x (4, 7)
    d = np.asarray(snr(a, b))
    want = np.array([[oracles.snr_distance(ai, bj) for bj in b] for ai in a])
    np.testing.assert_allclose(d, want, rtol=2e-5, atol=1e-6)
    assert not np.allclose(np.asarray(snr(b, a)), d.T)
    np.testing.assert_allclose(snr(a * 1e25, b * 3.0), d, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.diag(np.asarray(snr(a, a))), 0.0, atol=1e-5)
    const = np.ones((4, 7), np.float32)
    value, grad = jax.jit(jax.value_and_grad(
        lambda c: distances.cross_snr_distances(c, b).sum()))(const)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_matches_pml():
    """PML's SignalToNoiseRatioContrastiveLoss (ContrastiveLoss on SNRDistance, its
    defaults), value and gradient."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    import torch

    rng = np.random.default_rng(61)
    x = rng.normal(size=(20, 8)) * rng.uniform(0.5, 2.0, (20, 1))
    labels = rng.integers(0, 4, 20)
    for kw, pml_kw in (({}, {}), ({"margin": 1.5, "pos_margin": 0.3},
                                  {"neg_margin": 1.5, "pos_margin": 0.3})):
        e = torch.tensor(x, requires_grad=True)
        want = pml.SignalToNoiseRatioContrastiveLoss(**pml_kw)(e, torch.tensor(labels))
        want.backward()
        got, grad = jax.jit(jax.value_and_grad(
            lambda e, kw=kw: losses.snr_contrastive_loss(e, labels, **kw)[0]))(
            x.astype(np.float32))
        np.testing.assert_allclose(float(got), float(want.detach()), rtol=1e-5)
        g = e.grad.numpy()
        np.testing.assert_allclose(np.asarray(grad), g, atol=2e-5 * np.abs(g).max())
