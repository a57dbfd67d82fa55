"""ArcFace, CosFace, Normalized Softmax and Sub-center ArcFace
(jaxmetric.losses.margin_softmax) against float64 loop oracles written from the papers,
pytorch-metric-learning, and the contract of every loss."""

import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import margin_softmax as margin_softmax_losses

import class_loss_checks as checks
import oracles_proxy as oracles
from class_loss_checks import Case


def subcenter_3d(x, y, w, *, centers=3, **kw):
    return losses.subcenter_arcface_loss(x, y, checks.expand_centers(w, centers), centers=centers,
                                         **kw)


def subcenter_flat(x, y, w, *, centers=3, **kw):
    flat = checks.expand_centers(w, centers).reshape(-1, w.shape[-1])  # (C*K, D), PML's layout
    return losses.subcenter_arcface_loss(x, y, flat, centers=centers, **kw)


CASES = [
    Case("arcface", losses.arcface_loss, oracles.arcface, {}),
    Case("arcface-threshold-m0.9-s16", losses.arcface_loss, oracles.arcface,
         dict(large_angle="threshold", margin=0.9, scale=16.0)),
    Case("arcface-easy-s8-none", losses.arcface_loss, oracles.arcface,
         dict(large_angle="easy", scale=8.0, reduction="none")),
    Case("cosface", losses.cosface_loss, oracles.cosface, {}),
    Case("cosface-m0.1-s4-sum", losses.cosface_loss, oracles.cosface,
         dict(margin=0.1, scale=4.0, reduction="sum")),
    Case("normalized_softmax-T0.5", losses.normalized_softmax_loss, oracles.normalized_softmax,
         dict(temperature=0.5)),
    Case("subcenter_arcface-K3", subcenter_3d, oracles.subcenter_arcface, dict(scale=16.0)),
    Case("subcenter_arcface-K2-flat-threshold-sum", subcenter_flat, oracles.subcenter_arcface,
         dict(centers=2, margin=0.9, large_angle="threshold", scale=8.0, reduction="sum")),
]


def test_matches_oracles_under_jit_and_vmap():
    checks.check_against_oracles(CASES, np.random.default_rng(20))


def test_gradients_match_finite_differences():
    checks.check_gradients(CASES, np.random.default_rng(21))


def test_finite_on_degenerate_inputs_and_bfloat16():
    """Rows equal to their own weight (cos = 1) or its opposite (cos = -1) are where
    d arccos / d cos is infinite: the angle addition keeps the gradient finite."""
    checks.check_finite_edge_cases(CASES, np.random.default_rng(22))


def test_nonfinite_inputs_padding_and_label_range():
    checks.check_nonfinite_and_labels(CASES, np.random.default_rng(23))


def test_data_parallel_equals_single_device():
    checks.check_data_parallel(CASES, np.random.default_rng(24))


def test_vmap_over_independent_batches():
    checks.check_vmap_matches_single(CASES, np.random.default_rng(25))


def test_docstring_examples():
    result = doctest.testmod(margin_softmax_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0, result


# --------------------------------------------------------------------- the formulas


def _own_logit(theta, margin, large_angle):
    """ArcFace's own-class logit for a row at angle ``theta`` to its weight, through
    the loss: with two classes and the other weight orthogonal (cos = 0),
    loss = log(1 + exp(-s psi)) with s = 1, so psi = -log(exp(loss) - 1)."""
    x = jnp.array([[math.cos(theta), math.sin(theta)]])
    w = jnp.array([[1.0, 0.0], [0.0, 0.0]])  # the zero weight has cosine 0
    loss, _ = losses.arcface_loss(x, jnp.array([0]), w, margin=margin, scale=1.0,
                                  large_angle=large_angle)
    return -math.log(math.expm1(float(loss)))


@pytest.mark.parametrize("large_angle", margin_softmax_losses.LARGE_ANGLE)
def test_arcface_large_angles(large_angle):
    """cos(theta + m) below pi - m for all three; beyond it, the paper's form turns
    back up, "threshold" is cos(theta) - m sin(m) and "easy" drops the margin for
    theta > pi / 2."""
    m = 0.5
    for theta in (0.3, 1.2, 1.8, 2.5, 2.8, 3.0):
        want = math.cos(theta + m)
        if large_angle == "threshold" and theta > math.pi - m:
            want = math.cos(theta) - m * math.sin(m)
        if large_angle == "easy" and theta > math.pi / 2:
            want = math.cos(theta)
        assert _own_logit(theta, m, large_angle) == pytest.approx(want, abs=2e-5), theta
    if large_angle == "plain":  # the paper's psi is not monotonic beyond pi - m
        assert _own_logit(3.0, m, large_angle) > _own_logit(2.8, m, large_angle)


def test_arcface_without_margin_is_cosface_without_margin():
    rng = np.random.default_rng(26)
    x, w, y = checks.unit(rng, 8), rng.normal(size=(4, checks.D)), rng.integers(0, 4, 8)
    a, _ = losses.arcface_loss(x, y, w, margin=0.0, scale=10.0)
    c, _ = losses.cosface_loss(x, y, w, margin=0.0, scale=10.0)
    np.testing.assert_allclose(a, c, rtol=1e-5)


def test_init_weights():
    key = jax.random.key(1)
    w = margin_softmax_losses.init_weights(key, 10, 512)
    assert w.shape == (10, 512) and w.dtype == jnp.float32
    np.testing.assert_allclose(np.std(w), 1.0, rtol=0.03)
    np.testing.assert_allclose(np.std(margin_softmax_losses.init_weights(key, 10, 512,
                                                                         std=0.01)),
                               0.01, rtol=0.03)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        margin_softmax_losses.init_weights(key, 3, 0)


def test_bad_arguments():
    x, y, w = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1]), jnp.ones((2, 3))
    cases = [
        (lambda: losses.arcface_loss(x, y, w, margin=28.6), ValueError,
         r"margin must be >= 0.0 and <= 1.57"),
        (lambda: losses.arcface_loss(x, y, w, margin=-0.1), ValueError, "margin must be"),
        (lambda: losses.arcface_loss(x, y, w, scale=0.0), ValueError, "scale must be > 0"),
        (lambda: losses.arcface_loss(x, y, w, large_angle="clip"), ValueError,
         "unknown large_angle 'clip'; expected one of plain, threshold, easy"),
        (lambda: losses.cosface_loss(x, y, w, margin=float("nan")), ValueError,
         "margin must be"),
        (lambda: losses.cosface_loss(x, y, w, reduction="mean_nonzero"), ValueError,
         "unknown reduction"),
        (lambda: losses.cosface_loss(x, y, jnp.ones((2, 4))), ValueError,
         "weights have dimension 4 but embeddings have 3"),
        (lambda: losses.arcface_loss(x, y, jnp.ones((0, 3))), ValueError,
         "weights must hold at least 1 classes"),
        (lambda: losses.arcface_loss(x, y, w[:1]), ValueError, r"in \[0, 1\)"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()


# ------------------------------------------------------------ pytorch-metric-learning


def _pml_and_ours(pml_loss, fn, seed, **kw):
    import torch

    rng = np.random.default_rng(seed)
    b, d, c = 16, 8, 6
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))
    w = rng.normal(size=(c, d))
    labels = rng.integers(0, c, b)
    e = torch.tensor(x, requires_grad=True)
    pml_loss.W.data = torch.tensor(w.T.copy())  # PML's weights are (D, C)
    loss = pml_loss(e, torch.tensor(labels))
    loss.backward()
    ref = (float(loss.detach()), e.grad.numpy(), pml_loss.W.grad.numpy().T)
    value, grads = jax.value_and_grad(lambda e, p: fn(e, labels, p, **kw)[0], (0, 1))(
        x.astype(np.float32), w.astype(np.float32))
    return ref, (float(value), *map(np.asarray, grads))


def _assert_same(ref, got):
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(got[1:], ref[1:], strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5 * np.abs(r).max())


def test_arcface_matches_pml_with_threshold():
    """PML's ArcFaceLoss (margin in degrees) is large_angle="threshold"."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    for margin in (0.5, 1.2):  # 1.2 rad: some rows beyond pi - m
        ref, got = _pml_and_ours(
            pml.ArcFaceLoss(6, 8, margin=math.degrees(margin), scale=16).double(),
            losses.arcface_loss, 27, margin=margin, scale=16.0, large_angle="threshold")
        _assert_same(ref, got)


def test_cosface_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ref, got = _pml_and_ours(pml.CosFaceLoss(6, 8).double(), losses.cosface_loss, 28)
    _assert_same(ref, got)


def test_normalized_softmax_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ref, got = _pml_and_ours(pml.NormalizedSoftmaxLoss(6, 8).double(),
                             losses.normalized_softmax_loss, 30)
    _assert_same(ref, got)


def test_subcenter_arcface_matches_pml_with_threshold():
    """PML's SubCenterArcFaceLoss: W (D, C*K), class-major; margin in degrees."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    import torch

    rng = np.random.default_rng(31)
    b, d, c, k = 16, 8, 4, 3
    x = rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))
    w = rng.normal(size=(c * k, d))
    labels = rng.integers(0, c, b)
    pml_loss = pml.SubCenterArcFaceLoss(num_classes=c, embedding_size=d, sub_centers=k,
                                        margin=math.degrees(0.5), scale=16).double()
    pml_loss.W.data = torch.tensor(w.T.copy())
    e = torch.tensor(x, requires_grad=True)
    loss = pml_loss(e, torch.tensor(labels))
    loss.backward()
    ref = (float(loss.detach()), e.grad.numpy(), pml_loss.W.grad.numpy().T)
    fn = lambda e, w: losses.subcenter_arcface_loss(  # noqa: E731
        e, labels, w, centers=k, margin=0.5, scale=16.0, large_angle="threshold")[0]
    value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(x.astype(np.float32),
                                                           w.astype(np.float32))
    _assert_same(ref, (float(value), *map(np.asarray, grads)))
    # The (C, K, D) layout is the same loss.
    same, _ = losses.subcenter_arcface_loss(x, labels, w.reshape(c, k, d), centers=k,
                                            margin=0.5, scale=16.0, large_angle="threshold")
    np.testing.assert_allclose(float(same), float(value), rtol=1e-6)


def test_subcenter_arcface_with_one_center_is_arcface():
    rng = np.random.default_rng(32)
    x, w, y = checks.unit(rng, 8), rng.normal(size=(4, checks.D)), rng.integers(0, 4, 8)
    a, _ = losses.arcface_loss(x, y, w, scale=10.0)
    s, _ = losses.subcenter_arcface_loss(x, y, w, centers=1, scale=10.0)
    np.testing.assert_allclose(a, s, rtol=1e-6)


def test_bad_center_shapes():
    x, y = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1])
    fn = losses.subcenter_arcface_loss
    with pytest.raises(ValueError, match=r"\(C, K, D\) or \(C\*K, D\) with K = centers = 3"):
        fn(x, y, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="must hold K = centers = 3 vectors per class"):
        fn(x, y, jnp.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="centers must be a positive integer"):
        fn(x, y, jnp.ones((2, 3)), centers=0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        fn(x, y, jnp.ones((3, 3)))  # one class of three sub-centers
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.normalized_softmax_loss(x, y, jnp.ones((2, 3)), temperature=0.0)


def test_large_batch_against_float64():
    """B = 4096, C = 100: ArcFace against a vectorised float64 NumPy computation."""
    b, c, d = 4096, 100, 16
    rng = np.random.default_rng(29)
    x, w = checks.unit(rng, b, d), rng.normal(size=(c, d)).astype(np.float32)
    labels = rng.integers(0, c, b).astype(np.int32)
    loss, _ = jax.jit(losses.arcface_loss)(x, labels, w)
    cos = x.astype(np.float64) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    own = labels[:, None] == np.arange(c)
    logits = 64.0 * np.where(own, np.cos(np.arccos(np.clip(cos, -1, 1)) + 0.5), cos)
    top = logits.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    want = np.mean(lse - logits[own])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
