"""supcon_loss and ntxent_loss (jaxmetric.losses.softmax) against their float64 loop
oracles, under jit / vmap / grad / shard_map / pmap, on degenerate batches, and against
pytorch-metric-learning where it is installed."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import softmax as softmax_losses

import oracles_pair_losses as oracles
import pair_loss_checks as checks
from pair_loss_checks import Case

CASES = [
    Case(losses.supcon_loss, {}, oracles.supcon, "cosine",
         ("num_pos_pairs", "num_neg_pairs", "num_anchors")),
    Case(losses.supcon_loss, {"temperature": 0.5}, oracles.supcon, "cosine",
         ("num_pos_pairs", "num_neg_pairs", "num_anchors")),
    Case(losses.ntxent_loss, {}, oracles.ntxent, "cosine"),
    Case(losses.ntxent_loss, {"temperature": 0.5}, oracles.ntxent, "cosine"),
]
IDS = [c.id for c in CASES]


@pytest.fixture(scope="module")
def grid():
    return checks.run_grid(CASES)


@pytest.mark.parametrize("reduction", checks.REDUCTIONS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_matches_oracle(grid, index, reduction):
    checks.check_matches_oracle(grid, index, CASES[index], reduction)


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_nonfinite_valid_row_gives_nan_padded_row_is_ignored(grid, index):
    checks.check_nonfinite(grid, index, CASES[index])


def test_finite_gradients_on_degenerate_batches():
    checks.check_finite_gradients(CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_matches_oracle(case):
    checks.check_grad_matches_oracle(case)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_vmap_bfloat16_reference_set(case):
    checks.check_vmap(case)
    checks.check_bfloat16(case)
    checks.check_reference_set(case)


@pytest.mark.parametrize("case", CASES[::2], ids=IDS[::2])
def test_memory_is_quadratic(case):
    checks.check_quadratic_memory(case)


def test_low_temperature_and_identical_embeddings_stay_finite():
    """Logits of +-1 / 0.001: the log-sum-exps subtract their maximum."""
    x = np.tile(np.eye(3, dtype=np.float32), (3, 1))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    # Every positive coincides with the anchor, every negative is orthogonal: NT-Xent
    # is 0; SupCon is log |P(i)| = log 2 (its softmax shares the mass among positives).
    for fn, minimum in ((losses.supcon_loss, np.log(2.0)), (losses.ntxent_loss, 0.0)):
        loss, g = jax.jit(jax.value_and_grad(
            lambda e, fn=fn: fn(e, labels, temperature=1e-3)[0]))(x)
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(float(loss), minimum, atol=1e-4)  # s = 1 - O(1e-7)


# ----------------------------------------------------------------- data parallelism

DP_CASES = [
    Case(losses.supcon_loss, {"reduction": "mean"}, oracles.supcon, "cosine"),
    Case(losses.supcon_loss, {"reduction": "none", "temperature": 0.3}, oracles.supcon,
         "cosine"),
    Case(losses.ntxent_loss, {"reduction": "mean_nonzero"}, oracles.ntxent, "cosine"),
    Case(losses.ntxent_loss, {"reduction": "sum"}, oracles.ntxent, "cosine"),
]


@pytest.fixture(scope="module")
def data_parallel():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    return checks.run_data_parallel(DP_CASES)


@pytest.mark.parametrize("index", range(len(DP_CASES)), ids=[c.id for c in DP_CASES])
def test_data_parallel_equals_single_device(data_parallel, index):
    checks.check_data_parallel(data_parallel, index)


# ----------------------------------------------------------------------- the API


def test_exported_from_losses():
    assert losses.supcon_loss is softmax_losses.supcon_loss
    assert losses.ntxent_loss is softmax_losses.ntxent_loss
    assert {"supcon_loss", "ntxent_loss"} <= set(losses.__all__)


def test_docstring_examples():
    result = doctest.testmod(softmax_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0, result


def test_bad_input_messages():
    x = jnp.ones((4, 3))
    y = jnp.array([0, 0, 1, 1])
    cases = [
        (lambda: losses.supcon_loss(x, y, temperature=0.0), "temperature must be > 0"),
        (lambda: losses.ntxent_loss(x, y, temperature=-1.0), "temperature must be > 0"),
        (lambda: losses.ntxent_loss(x, y, temperature=float("nan")), "temperature"),
        (lambda: losses.supcon_loss(x, y, reduction="avg"), "unknown reduction"),
        (lambda: losses.supcon_loss(x[:1], y[:1]), "at least 2"),
        (lambda: losses.ntxent_loss(x, y[:3]), "disagree on the batch size"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="integer"):
        losses.supcon_loss(x, y.astype(float))


# -------------------------------------------------- pytorch-metric-learning agreement


def _pml_batch(seed=0, b=24, classes=4, d=8):
    """A P x K batch (every anchor has positives and negatives), non-unit rows."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))).astype(np.float32)
    return x, np.repeat(np.arange(classes), b // classes).astype(np.int32)


def _pml_value_and_grad(loss_fn, x, labels, **kw):
    torch = pytest.importorskip("torch")
    e = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(e, torch.tensor(labels, dtype=torch.int64), **kw)
    loss.backward()
    return float(loss.detach()), e.grad.numpy()


def _ours(fn, x, labels, **kw):
    loss, g = jax.jit(jax.value_and_grad(lambda e: fn(e, labels, **kw)[0]))(x)
    return float(loss), np.asarray(g)


def test_supcon_matches_pml():
    """PML's SupConLoss (cosine, AvgNonZeroReducer) is reduction="mean_nonzero"; on a
    P x K batch every anchor has a non-zero term, so it is also the paper's mean."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels = _pml_batch()
    for temperature in (0.1, 0.5):
        ref = _pml_value_and_grad(pml.SupConLoss(temperature=temperature), x, labels)
        for reduction in ("mean_nonzero", "mean"):
            ours = _ours(losses.supcon_loss, x, labels, temperature=temperature,
                         reduction=reduction)
            np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
            np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)


def test_ntxent_matches_pml():
    """PML's NTXentLoss with labels: the mean over positive pairs ("mean")."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels = _pml_batch(1)
    for temperature in (0.07, 0.5):
        ref = _pml_value_and_grad(pml.NTXentLoss(temperature=temperature), x, labels)
        ours = _ours(losses.ntxent_loss, x, labels, temperature=temperature)
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
        np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)


def test_reference_set_matches_pml():
    """ref_emb / ref_labels: anchors from the batch, pairs from the reference."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch = pytest.importorskip("torch")
    x, labels = _pml_batch(2, b=12, classes=3)
    r, ref_labels = _pml_batch(3, b=16, classes=4)
    for ours_fn, pml_loss, kw in ((losses.supcon_loss, pml.SupConLoss(temperature=0.2),
                                   {"reduction": "mean_nonzero", "temperature": 0.2}),
                                  (losses.ntxent_loss, pml.NTXentLoss(), {})):
        ref = float(pml_loss(torch.tensor(x), torch.tensor(labels, dtype=torch.int64),
                             ref_emb=torch.tensor(r),
                             ref_labels=torch.tensor(ref_labels, dtype=torch.int64)))
        loss, _ = ours_fn(x, labels, ref_embeddings=r, ref_labels=ref_labels, **kw)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5, err_msg=ours_fn.__name__)


def test_supcon_without_positives_differs_from_pml_only_in_the_mean():
    """An anchor without positives: no term here; PML gives it 0 and its
    AvgNonZeroReducer leaves it out, so "mean_nonzero" still agrees."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    x, labels = _pml_batch(4, b=9, classes=3)
    labels = labels.copy()
    labels[-1] = 7  # a class of one
    ref = _pml_value_and_grad(pml.SupConLoss(), x, labels)
    ours = _ours(losses.supcon_loss, x, labels, reduction="mean_nonzero")
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)
