"""FastAP (jaxmetric.losses.fastap) and Smooth-AP (jaxmetric.losses.smooth_ap) against
their float64 loop oracles, the contract of every pair-based loss (pair_loss_checks),
pytorch-metric-learning, and Smooth-AP's bounded memory."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import fastap, smooth_ap

import oracles_pair_losses as oracles
import pair_loss_checks as checks
from pair_loss_checks import Case

REDUCTIONS = ("mean", "sum", "none")
EXACT = ("num_pos_pairs", "num_neg_pairs", "num_anchors")

CASES = [
    Case(losses.fastap_loss, {}, oracles.fastap, "unit_squared", EXACT),
    Case(losses.fastap_loss, {"num_bins": 3}, oracles.fastap, "unit_squared", EXACT),
    Case(losses.smooth_ap_loss, {}, oracles.smooth_ap, "cosine", EXACT),
    Case(losses.smooth_ap_loss, {"temperature": 0.1, "include_anchor": True},
         oracles.smooth_ap, "cosine", EXACT),
]
IDS = [c.id for c in CASES]


@pytest.fixture(scope="module")
def grid():
    return checks.run_grid(CASES, reductions=REDUCTIONS)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_oracle_and_nonfinite_rule(grid, index):
    for reduction in REDUCTIONS:
        checks.check_matches_oracle(grid, index, CASES[index], reduction, exact_active=False)
    checks.check_nonfinite(grid, index, CASES[index], REDUCTIONS)
    loss, info = grid["results"][index]["mean"]
    for i, (x, labels, valid, name) in enumerate(grid["grid"]):
        per_anchor, has, _ = CASES[index].reference(x, labels, valid=valid, reduction="none")
        np.testing.assert_allclose(info["num_anchors"][i], has.sum(), err_msg=name)
        mean_ap = 1.0 - per_anchor[has > 0].mean() if has.any() else 0.0
        np.testing.assert_allclose(info["mean_ap"][i], mean_ap, rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_data_parallel_equals_single_device():
    """One case of each loss (vmap over batches is in the grid above)."""
    cases = [CASES[1], CASES[3]]
    results = checks.run_data_parallel(cases)
    for index in range(len(cases)):
        checks.check_data_parallel(results, index)


def test_finite_gradients_on_degenerate_batches():
    checks.check_finite_gradients([CASES[0], CASES[2]])


@pytest.mark.parametrize("index", [0, 3], ids=[IDS[0], IDS[3]])
def test_gradient_matches_oracle(index):  # central differences of the float64 loops
    checks.check_grad_matches_oracle(CASES[index])


@pytest.mark.parametrize("index", [0, 2], ids=[IDS[0], IDS[2]])
def test_bfloat16(index):
    checks.check_bfloat16(CASES[index])


@pytest.mark.parametrize("index", [0, 2], ids=[IDS[0], IDS[2]])
def test_memory_is_quadratic_at_4096(index):
    """FastAP's (L + 1, B, B) pulses and Smooth-AP's anchor chunks: no (B, B, B)."""
    checks.check_quadratic_memory(CASES[index])


def test_smooth_ap_chunks_give_the_same_loss(monkeypatch):
    """Chunks of 3 anchors (with a remainder) and one chunk: the same loss and gradient."""
    rng = np.random.default_rng(50)
    x, y = checks.unit(rng, 10, 4), rng.integers(0, 3, 10)

    def run():
        return jax.jit(jax.value_and_grad(lambda e: losses.smooth_ap_loss(e, y)[0]))(x)

    whole = run()
    monkeypatch.setattr(smooth_ap, "CHUNK_ELEMENTS", 3 * 10 * 10)
    chunked = run()
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-5, atol=1e-7)


def _torch_value_and_grad(loss, x, labels):
    import torch

    e = torch.tensor(x, requires_grad=True)
    value = loss(e, torch.tensor(labels))
    value.backward()
    return float(value.detach()), e.grad.numpy()


def test_fastap_matches_pml():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    rng = np.random.default_rng(51)
    x = rng.normal(size=(24, 8)) * rng.uniform(0.5, 2.0, (24, 1))
    labels = rng.integers(0, 4, 24)
    for num_bins in (10, 4):
        want, want_grad = _torch_value_and_grad(pml.FastAPLoss(num_bins=num_bins), x, labels)
        got, grad = jax.jit(jax.value_and_grad(
            lambda e, n=num_bins: losses.fastap_loss(e, labels, num_bins=n)[0]))(
            x.astype(np.float32))
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        np.testing.assert_allclose(grad, want_grad, atol=2e-5 * np.abs(want_grad).max())


def test_smooth_ap_matches_pml_with_the_anchor_included():
    """PML's SmoothAPLoss ranks the anchor as its own positive: include_anchor=True.
    It wants sorted labels with equal class sizes, and (PML 2.9) groups the rows into
    blocks of the number of classes rather than of the class size, right only when the
    two are equal: 5 classes of 5 rows here (4 classes of 5 rows differ: 0.491 there,
    0.500 here, whose classes are the labels)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    rng = np.random.default_rng(52)
    x = rng.normal(size=(25, 8)) * rng.uniform(0.5, 2.0, (25, 1))
    labels = np.repeat(np.arange(5), 5)
    for temperature in (0.01, 0.1):
        want, want_grad = _torch_value_and_grad(pml.SmoothAPLoss(temperature=temperature),
                                                x, labels)
        got, grad = jax.jit(jax.value_and_grad(lambda e, t=temperature: losses.smooth_ap_loss(
            e, labels, temperature=t, include_anchor=True)[0]))(x.astype(np.float32))
        np.testing.assert_allclose(float(got), want, rtol=2e-5)
        np.testing.assert_allclose(grad, want_grad, atol=2e-4 * np.abs(want_grad).max())


def test_smooth_ap_tends_to_the_exact_ap():
    """At a small temperature the smoothed ranks are the ranks: 1 - AP of a known
    ranking (anchor 0: positives at ranks 1 and 3 of 3, AP = (1/1 + 2/3) / 2)."""
    x = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    labels = jnp.array([0, 0, 1, 0])
    per_anchor, _ = losses.smooth_ap_loss(x, labels, temperature=1e-4, reduction="none")
    np.testing.assert_allclose(per_anchor[0], 1.0 - (1.0 + 2.0 / 3.0) / 2.0, atol=1e-6)


def test_docstring_examples():
    for module in (fastap, smooth_ap):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted >= 1 and result.failed == 0, (module, result)


def test_bad_arguments():
    x, y = jnp.ones((4, 3)), jnp.array([0, 0, 1, 1])
    for call, message in [
        (lambda: losses.fastap_loss(x, y, num_bins=0), "num_bins must be a positive integer"),
        (lambda: losses.fastap_loss(x, y, reduction="mean_nonzero"), "unknown reduction"),
        (lambda: losses.smooth_ap_loss(x, y, temperature=0.0), "temperature must be > 0"),
        (lambda: losses.smooth_ap_loss(x, y, include_anchor=1), "include_anchor must be"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
