"""Proxy-Anchor and Proxy-NCA (jaxmetric.losses.proxy) against float64 loop oracles
written from the papers, pytorch-metric-learning, and the contract of every loss."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import proxy as proxy_losses

import class_loss_checks as checks
import oracles_proxy as oracles
from class_loss_checks import Case

CASES = [
    Case("anchor", losses.proxy_anchor_loss, oracles.proxy_anchor, {}),
    Case("anchor-m0.3-a8", losses.proxy_anchor_loss, oracles.proxy_anchor,
         dict(margin=0.3, alpha=8.0)),
    Case("nca", losses.proxy_nca_loss, oracles.proxy_nca, {}),
    Case("nca-pml-form-t3-sum", losses.proxy_nca_loss, oracles.proxy_nca,
         dict(positive_in_denominator=True, softmax_scale=3.0, reduction="sum")),
    Case("nca-t8-none", losses.proxy_nca_loss, oracles.proxy_nca,
         dict(softmax_scale=8.0, reduction="none")),
]


def test_matches_oracles_under_jit_and_vmap():
    checks.check_against_oracles(CASES, np.random.default_rng(0))


def test_gradients_match_finite_differences():
    checks.check_gradients(CASES, np.random.default_rng(1))


def test_finite_on_degenerate_inputs_and_bfloat16():
    checks.check_finite_edge_cases(CASES, np.random.default_rng(2))


def test_nonfinite_inputs_padding_and_label_range():
    checks.check_nonfinite_and_labels(CASES, np.random.default_rng(3))


def test_data_parallel_equals_single_device():
    checks.check_data_parallel(CASES, np.random.default_rng(4))


def test_vmap_over_independent_batches():
    checks.check_vmap_matches_single(CASES, np.random.default_rng(5))


def test_docstring_examples():
    result = doctest.testmod(proxy_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0, result


# --------------------------------------------------------------------- the formulas


def test_proxy_anchor_large_alpha_has_no_overflow():
    """exp(alpha (1 + delta)) overflows float32 from alpha ~ 80: the shifted sums do not."""
    rng = np.random.default_rng(6)
    x, w = checks.unit(rng, 12), checks.unit(rng, 3)
    w[1] = x[0]  # a negative pair at cos = 1: exponent 220 * 1.1
    labels = np.array([2] * 6 + [0] * 6)
    loss, g = jax.jit(jax.value_and_grad(
        lambda e: losses.proxy_anchor_loss(e, labels, w, alpha=200.0)[0]))(x)
    np.testing.assert_allclose(loss, oracles.proxy_anchor(x, labels, w, alpha=200.0)[0],
                               rtol=1e-5)
    assert np.isfinite(g).all()


def test_proxy_anchor_divides_by_proxies_with_positives_of_the_whole_batch():
    """|P+| counts proxies with a valid positive; the negative term divides by C."""
    x, labels = checks.unit(np.random.default_rng(7), 4), np.array([0, 0, 3, 3])
    w = checks.unit(np.random.default_rng(8), 5)
    _, info = losses.proxy_anchor_loss(x, labels, w)
    assert info["num_proxies_with_positives"] == 2
    _, info = losses.proxy_anchor_loss(x, labels, w, valid=np.array([1, 1, 0, 0], bool))
    assert info["num_proxies_with_positives"] == 1 and info["num_neg_pairs"] == 8


def test_proxy_nca_pml_form_is_softplus_of_the_papers():
    """-log(own / (own + others)) = log(1 + e^l) for l = -log(own / others)."""
    rng = np.random.default_rng(9)
    x, w, labels = checks.unit(rng, 8), checks.unit(rng, 4), rng.integers(0, 4, 8)
    paper, _ = losses.proxy_nca_loss(x, labels, w, reduction="none", softmax_scale=4.0)
    pml, _ = losses.proxy_nca_loss(x, labels, w, reduction="none", softmax_scale=4.0,
                                   positive_in_denominator=True)
    np.testing.assert_allclose(pml, jax.nn.softplus(paper), rtol=1e-5)
    assert np.any(paper < 0) and np.all(pml > 0)


def test_proxy_nca_one_proxy():
    x, labels = checks.unit(np.random.default_rng(10), 4), np.zeros(4, int)
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.proxy_nca_loss(x, labels, np.ones((1, checks.D)))
    loss, info = losses.proxy_nca_loss(x, labels, np.ones((1, checks.D)),
                                       positive_in_denominator=True)
    assert loss == 0 and info["active_fraction"] == 0 and info["num_neg_pairs"] == 0


def test_none_reduction_gives_each_row():
    rng = np.random.default_rng(11)
    x, w, labels = checks.unit(rng, 6), checks.unit(rng, 3), rng.integers(0, 3, 6)
    valid = np.array([1, 1, 0, 1, 1, 1], bool)
    rows, info = losses.proxy_nca_loss(x, labels, w, valid=valid, reduction="none")
    mean, _ = losses.proxy_nca_loss(x, labels, w, valid=valid)
    total, _ = losses.proxy_nca_loss(x, labels, w, valid=valid, reduction="sum")
    assert rows.shape == (6,) and rows[2] == 0
    np.testing.assert_array_equal(info["anchor_num_selected"], valid.astype(np.float32))
    np.testing.assert_allclose(rows.sum(), total, rtol=1e-6)
    np.testing.assert_allclose(rows.sum() / valid.sum(), mean, rtol=1e-6)


def test_init_proxies():
    key = jax.random.key(0)
    p = proxy_losses.init_proxies(key, 100, 256)
    assert p.shape == (100, 256) and p.dtype == jnp.float32
    np.testing.assert_allclose(np.std(p), np.sqrt(2 / 100), rtol=0.02)  # kaiming fan_out
    np.testing.assert_allclose(np.std(proxy_losses.init_proxies(key, 10, 512, std=1.0)),
                               1.0, rtol=0.03)
    assert proxy_losses.init_proxies(key, 3, 4, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        proxy_losses.init_proxies(key, 0, 4)
    with pytest.raises(ValueError, match="std must be > 0"):
        proxy_losses.init_proxies(key, 3, 4, std=0.0)


def test_bad_arguments():
    x, y, w = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]), jnp.ones((2, 3))
    cases = [
        (lambda: losses.proxy_anchor_loss(x, y, w, margin=-0.1), ValueError,
         "margin must be >= 0"),
        (lambda: losses.proxy_anchor_loss(x, y, w, alpha=0.0), ValueError, "alpha must be > 0"),
        (lambda: losses.proxy_nca_loss(x, y, w, softmax_scale=-1.0), ValueError,
         "softmax_scale must be > 0"),
        (lambda: losses.proxy_nca_loss(x, y, w, reduction="mean_nonzero"), ValueError,
         "unknown reduction 'mean_nonzero'; expected one of mean, sum, none"),
        (lambda: losses.proxy_anchor_loss(x, y, w[0]), ValueError,
         r"proxies must have shape \(C, D\)"),
        (lambda: losses.proxy_anchor_loss(x, y, jnp.ones((2, 5))), ValueError,
         "proxies have dimension 5 but embeddings have 3"),
        (lambda: losses.proxy_nca_loss(x, y, w.astype(int)), TypeError,
         "proxies must be floating point"),
        (lambda: losses.proxy_anchor_loss(x, y.astype(float), w), TypeError,
         "labels must be an integer"),
        (lambda: losses.proxy_anchor_loss(x, y + 1, w), ValueError, r"in \[0, 2\)"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    with pytest.raises(ValueError, match="alpha must be > 0"):  # at trace time in jit
        jax.jit(lambda e: losses.proxy_anchor_loss(e, y, w, alpha=-1.0))(x)


# ------------------------------------------------------------ pytorch-metric-learning


def _pml_inputs(seed=12, b=16, d=8, c=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))
    w = rng.normal(size=(c, d))
    labels = rng.integers(0, c - 1, b)  # the last class has no rows
    return x, labels, w


def _pml_loss_and_grads(loss_obj, x, labels, w):
    import torch

    e = torch.tensor(x, requires_grad=True)
    loss_obj.proxies.data = torch.tensor(w)
    loss = loss_obj(e, torch.tensor(labels))
    loss.backward()
    return float(loss.detach()), e.grad.numpy(), loss_obj.proxies.grad.numpy()


def _ours(fn, x, labels, w, **kw):
    value, grads = jax.value_and_grad(lambda e, p: fn(e, labels, p, **kw)[0], (0, 1))(
        x.astype(np.float32), w.astype(np.float32))
    return float(value), *map(np.asarray, grads)


def test_proxy_anchor_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels, w = _pml_inputs()
    ref = _pml_loss_and_grads(pml.ProxyAnchorLoss(6, 8).double(), x, labels, w)
    got = _ours(losses.proxy_anchor_loss, x, labels, w)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1:], ref[1:], strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max())


def test_proxy_nca_matches_pml_with_positive_in_denominator():
    """PML's ProxyNCALoss (squared L2 of normalised vectors, softmax over every proxy)
    is positive_in_denominator=True; the paper's default is another loss."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels, w = _pml_inputs(13)
    for scale in (1.0, 5.0):
        ref = _pml_loss_and_grads(pml.ProxyNCALoss(6, 8, softmax_scale=scale).double(),
                                  x, labels, w)
        got = _ours(losses.proxy_nca_loss, x, labels, w, softmax_scale=scale,
                    positive_in_denominator=True)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
        for g, r in zip(got[1:], ref[1:], strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5 * np.abs(r).max())
        paper, _ = losses.proxy_nca_loss(x, labels, w, softmax_scale=scale, reduction="none")
        assert not np.isclose(np.mean(paper), ref[0], rtol=1e-3)
        np.testing.assert_allclose(np.mean(jax.nn.softplus(paper)), ref[0], rtol=1e-5)


def test_large_batch_against_float64_in_memory_of_order_b_times_c():
    """B = 4096, C = 100: Proxy-Anchor against a vectorised float64 NumPy computation;
    the compiled loss + gradient needs O(B C) temporary memory, far from B²."""
    b, c, d = 4096, 100, 16
    rng = np.random.default_rng(14)
    x, w = checks.unit(rng, b, d), rng.normal(size=(c, d)).astype(np.float32)
    labels = rng.integers(0, c, b).astype(np.int32)
    fn = jax.jit(jax.value_and_grad(lambda e, p: losses.proxy_anchor_loss(e, labels, p)[0],
                                    (0, 1)))
    compiled = fn.lower(x, w).compile()
    loss, _ = compiled(x, w)
    s = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64) @ (
        w / np.linalg.norm(w, axis=1, keepdims=True)).T.astype(np.float64)
    own = labels[:, None] == np.arange(c)
    pos = np.log1p(np.where(own, np.exp(-32.0 * (s - 0.1)), 0.0).sum(0))
    neg = np.log1p(np.where(~own, np.exp(32.0 * (s + 0.1)), 0.0).sum(0))
    want = pos.sum() / own.any(0).sum() + neg.sum() / c
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    analysis = compiled.memory_analysis()
    if analysis is not None:
        assert analysis.temp_size_in_bytes < 64 * b * c, analysis.temp_size_in_bytes  # B² = 64 MiB
