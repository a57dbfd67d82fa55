"""SoftTriple (jaxmetric.losses.soft_triple) against its float64 loop oracle, the contract
of every class-vector loss (class_loss_checks) and pytorch-metric-learning."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import soft_triple

import class_loss_checks as checks
import oracles_proxy as oracles
from class_loss_checks import Case, expand_centers


def soft_triple_3d(x, y, w, *, centers=10, **kw):
    return losses.soft_triple_loss(x, y, expand_centers(w, centers), centers=centers, **kw)


def soft_triple_flat(x, y, w, *, centers=10, **kw):
    flat = expand_centers(w, centers).reshape(-1, w.shape[-1])
    return losses.soft_triple_loss(x, y, flat, centers=centers, **kw)


CASES = [
    Case("soft_triple-K3", soft_triple_3d, oracles.soft_triple, dict(centers=3)),
    Case("soft_triple-K2-flat-tau0.2-none", soft_triple_flat, oracles.soft_triple,
         dict(centers=2, tau=0.2, la=10.0, gamma=0.5, margin=0.1, reduction="none")),
]


def test_matches_oracles_under_jit_and_vmap():
    checks.check_against_oracles(CASES, np.random.default_rng(40))


def test_gradients_match_finite_differences():
    checks.check_gradients(CASES, np.random.default_rng(41))


def test_finite_on_degenerate_inputs_and_bfloat16():
    checks.check_finite_edge_cases(CASES, np.random.default_rng(42))


def test_nonfinite_inputs_padding_and_label_range():
    checks.check_nonfinite_and_labels(CASES, np.random.default_rng(43))


def test_data_parallel_equals_single_device():
    """The regulariser is in every row's term, so its gradient is counted once per row
    of the global batch under shard_map and pmap too."""
    checks.check_data_parallel(CASES, np.random.default_rng(44))


def test_docstring_examples():
    result = doctest.testmod(soft_triple, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 2 and result.failed == 0, result


def test_matches_pml():
    """PML's SoftTripleLoss (its defaults: la=20, gamma=0.1, margin=0.01, K=10, no
    regulariser), centers fc (D, C*K) class-major, value and both gradients."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    import torch

    rng = np.random.default_rng(45)
    b, d, c, k = 16, 8, 4, 10
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))
    w = rng.normal(size=(c * k, d))
    labels = rng.integers(0, c, b)
    pml_loss = pml.SoftTripleLoss(num_classes=c, embedding_size=d).double()
    pml_loss.fc.data = torch.tensor(w.T.copy())
    e = torch.tensor(x, requires_grad=True)
    loss = pml_loss(e, torch.tensor(labels))
    loss.backward()
    value, (gx, gw) = jax.jit(jax.value_and_grad(
        lambda e, w: losses.soft_triple_loss(e, labels, w)[0], (0, 1)))(
        x.astype(np.float32), w.astype(np.float32))
    np.testing.assert_allclose(float(value), float(loss.detach()), rtol=1e-5)
    for got, want in ((gx, e.grad.numpy()), (gw, pml_loss.fc.grad.numpy().T)):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * np.abs(want).max())


def test_one_center_is_cosface():
    """K = 1: the soft maximum is the cosine and R = 0, so SoftTriple is CosFace with
    scale lambda and margin delta, for a (C, 1, D) or a (C, D) array, whatever tau."""
    rng = np.random.default_rng(46)
    x, w, y = checks.unit(rng, 8), rng.normal(size=(4, checks.D)), rng.integers(0, 4, 8)

    @jax.jit
    def both(x, w):
        return (losses.soft_triple_loss(x, y, w[:, None], centers=1, tau=1.0, la=10.0,
                                        margin=0.2, reduction="sum")[0],
                losses.soft_triple_loss(x, y, w, centers=1, la=10.0, margin=0.2,
                                        reduction="sum")[0],
                losses.cosface_loss(x, y, w, scale=10.0, margin=0.2, reduction="sum")[0])

    a, b, c = both(x, w)
    np.testing.assert_allclose([a, b], [c, c], rtol=1e-6)


def test_regulariser_merges_close_centers():
    """R is the mean distance of a class's center pairs over 2 (C K (K-1) in the
    denominator, K (K-1) / 2 pairs): coinciding centers give sqrt(eps) with a finite
    gradient; the gradient of tau * R pulls a class's centers together."""
    w = jnp.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]])  # 1 class, K = 3
    want = (2 * np.sqrt(2.0 + 1e-5) + np.sqrt(1e-5)) / (1 * 3 * 2)
    spread = jax.jit(jax.value_and_grad(soft_triple.center_spread))
    value, g = spread(w)
    np.testing.assert_allclose(float(value), want, rtol=1e-6)
    assert np.isfinite(np.asarray(g)).all()
    assert float(spread(w - 0.1 * g)[0]) < float(value)


def test_bad_arguments():
    x, y, w = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]), jnp.ones((2, 2, 3))
    for kw, message in [(dict(centers=2, la=0.0), "la must be > 0"),
                        (dict(centers=2, gamma=-1.0), "gamma must be > 0"),
                        (dict(centers=2, tau=-0.1), "tau must be >= 0"),
                        (dict(centers=2, margin=-0.1), "margin must be >= 0"),
                        (dict(centers=3), "must hold K = centers = 3"),
                        (dict(centers=2, reduction="mean_nonzero"), "unknown reduction")]:
        with pytest.raises(ValueError, match=message):
            losses.soft_triple_loss(x, y, w, **kw)
