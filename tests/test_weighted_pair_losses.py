"""multi_similarity_loss, circle_loss, lifted_structure_loss and margin_loss
(jaxmetric.losses.weighted_pair) against their float64 loop oracles, under jit / vmap /
grad / shard_map / pmap, on degenerate batches, and against pytorch-metric-learning
where it is installed."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmetric import losses
from jaxmetric.losses import weighted_pair as weighted_pair_losses

import oracles_pair_losses as oracles
import pair_loss_checks as checks
from pair_loss_checks import Case

ANCHOR_COUNTS = ("num_pos_pairs", "num_neg_pairs", "num_anchors")
BETA_PER_CLASS = np.linspace(0.8, 1.4, 10).astype(np.float32)  # labels go up to 9

CASES = [
    Case(losses.multi_similarity_loss, {}, oracles.multi_similarity, "cosine", ANCHOR_COUNTS),
    Case(losses.multi_similarity_loss, {"mining_epsilon": None}, oracles.multi_similarity,
         "cosine", ANCHOR_COUNTS),
    Case(losses.multi_similarity_loss, {"alpha": 1.0, "beta": 10.0, "base": 0.2,
                                        "mining_epsilon": 0.3},
         oracles.multi_similarity, "cosine", ANCHOR_COUNTS),
    Case(losses.circle_loss, {}, oracles.circle, "cosine", ANCHOR_COUNTS),
    Case(losses.circle_loss, {"m": 0.25, "gamma": 32.0}, oracles.circle, "cosine",
         ANCHOR_COUNTS),
    Case(losses.lifted_structure_loss, {}, oracles.lifted_structure, "l2", ANCHOR_COUNTS),
    Case(losses.lifted_structure_loss, {"distance": "squared_l2", "pos_margin": 0.2,
                                        "neg_margin": 1.5},
         oracles.lifted_structure, "squared_l2", ANCHOR_COUNTS),
    Case(losses.lifted_structure_loss, {"distance": "cosine", "neg_margin": 0.5},
         oracles.lifted_structure, "cosine", ANCHOR_COUNTS),
    Case(losses.margin_loss, {"beta": 1.0}, oracles.margin, "l2",
         ("num_pos_pairs", "num_neg_pairs", "mean_beta")),
    Case(losses.margin_loss, {"beta": BETA_PER_CLASS, "nu": 0.1, "pairs": "triplets"},
         oracles.margin, "l2", ("num_pos_pairs", "num_neg_pairs", "mean_beta")),
    Case(losses.margin_loss, {"beta": 0.6, "margin": 0.3, "distance": "cosine", "nu": 0.05},
         oracles.margin, "cosine", ("num_pos_pairs", "num_neg_pairs", "mean_beta")),
]
IDS = [c.id for c in CASES]
ONE_EACH = [0, 3, 5, 9]  # a case of every loss


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


@pytest.mark.parametrize("case", [c for c in CASES if c.fn is not losses.circle_loss],
                         ids=[c.id for c in CASES if c.fn is not losses.circle_loss])
def test_grad_matches_oracle(case):
    checks.check_grad_matches_oracle(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.fn is losses.circle_loss],
                         ids=[c.id for c in CASES if c.fn is losses.circle_loss])
def test_circle_grad_treats_the_weights_as_constants(case):
    """The paper's gradient: alpha_p, alpha_n held at their values (finite differences
    of the oracle with the weights computed from the unperturbed embeddings)."""
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=(8, 3)) * rng.uniform(0.5, 1.5, (8, 1))  # check's batch
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    checks.check_grad_matches_oracle(
        case, reference=lambda e: case.reference(e, labels, weights_from=x0)[0])


def test_margin_grad_of_beta_matches_oracle():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(9, 3)).astype(np.float32) * 0.6
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    for pairs in losses.MARGIN_PAIRS:
        for beta in (np.float64(0.9), np.array([0.7, 1.0, 1.3])):
            kw = dict(nu=0.2, pairs=pairs, reduction="mean")
            g = jax.grad(lambda b, kw=kw: losses.margin_loss(x, labels, b, **kw)[0])(
                jnp.asarray(beta, jnp.float32))
            ref = checks.numeric_grad(lambda b, kw=kw: oracles.margin(x, labels, b, **kw)[0],
                                      np.asarray(beta, np.float64))
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{pairs} {beta}")


@pytest.mark.parametrize("index", ONE_EACH, ids=[IDS[i] for i in ONE_EACH])
def test_vmap_bfloat16_reference_set(index):
    checks.check_vmap(CASES[index])
    checks.check_bfloat16(CASES[index])
    checks.check_reference_set(CASES[index])


@pytest.mark.parametrize("index", ONE_EACH, ids=[IDS[i] for i in ONE_EACH])
def test_memory_is_quadratic(index):
    checks.check_quadratic_memory(CASES[index])


def test_large_scales_and_identical_embeddings_stay_finite():
    """gamma = 256 and beta = 100 on coincident rows: the log-sum-exps subtract their
    maximum; every pair either coincides or is orthogonal."""
    x = np.tile(np.eye(3, dtype=np.float32), (3, 1))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    fns = [lambda e: losses.circle_loss(e, labels, gamma=256.0, m=0.25)[0],
           lambda e: losses.multi_similarity_loss(e, labels, beta=100.0, alpha=10.0)[0],
           lambda e: losses.lifted_structure_loss(e, labels, neg_margin=50.0)[0]]
    for fn in fns:
        loss, g = jax.jit(jax.value_and_grad(fn))(x)
        assert np.isfinite(loss) and np.isfinite(np.asarray(g)).all()


def test_multi_similarity_mining_selects_the_informative_pairs():
    """Anchor 0: positives at s = 0.9, 0.1; negatives at s = 0.3, -0.5. With epsilon
    0.1 the positive at 0.1 (< 0.3 + 0.1) and the negative at 0.3 (> 0.1 - 0.1) are
    kept, the easy positive and the easy negative are not."""
    angles = np.arccos([1.0, 0.9, 0.1, 0.3, -0.5])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 1])
    loss, info = losses.multi_similarity_loss(x, labels, reduction="none")
    s_pos, s_neg = 0.1, 0.3
    expected = (np.log1p(np.exp(-2.0 * (s_pos - 0.5))) / 2.0
                + np.log1p(np.exp(50.0 * (s_neg - 0.5))) / 50.0)
    np.testing.assert_allclose(loss[0], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, oracles.multi_similarity(x, labels, reduction="none")[0],
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------- data parallelism

DP_CASES = [
    Case(losses.multi_similarity_loss, {"reduction": "mean"}, oracles.multi_similarity,
         "cosine"),
    Case(losses.multi_similarity_loss, {"mining_epsilon": None, "reduction": "none"},
         oracles.multi_similarity, "cosine"),
    Case(losses.circle_loss, {"reduction": "mean_nonzero"}, oracles.circle, "cosine"),
    Case(losses.lifted_structure_loss, {"reduction": "sum"}, oracles.lifted_structure, "l2"),
    Case(losses.margin_loss, {"beta": np.array([0.8, 0.9, 1.0, 1.1], np.float32), "nu": 0.1,
                              "pairs": "triplets"}, oracles.margin, "l2"),
    Case(losses.margin_loss, {"beta": np.float32(1.0), "nu": 0.05, "reduction": "mean"},
         oracles.margin, "l2"),
]


@pytest.fixture(scope="module")
def data_parallel():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    return checks.run_data_parallel(DP_CASES, grad_kwargs=("beta",))


@pytest.mark.parametrize("index", range(len(DP_CASES)), ids=[c.id for c in DP_CASES])
def test_data_parallel_equals_single_device(data_parallel, index):
    checks.check_data_parallel(data_parallel, index)


# ----------------------------------------------------------------------- the API


def test_exported_from_losses():
    for name in weighted_pair_losses.__all__:
        if name.endswith("_loss"):
            assert getattr(losses, name) is getattr(weighted_pair_losses, name)
            assert name in losses.__all__


def test_docstring_examples():
    result = doctest.testmod(weighted_pair_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0, result


def test_bad_input_messages():
    x = jnp.ones((4, 3))
    y = jnp.array([0, 0, 1, 1])
    ms, circle = losses.multi_similarity_loss, losses.circle_loss
    lifted, margin = losses.lifted_structure_loss, losses.margin_loss
    cases = [
        (lambda: ms(x, y, alpha=0.0), "alpha must be > 0"),
        (lambda: ms(x, y, beta=-1.0), "beta must be > 0"),
        (lambda: ms(x, y, base=float("nan")), "base"),
        (lambda: ms(x, y, mining_epsilon=-0.1), "mining_epsilon must be >= 0"),
        (lambda: circle(x, y, gamma=0.0), "gamma must be > 0"),
        (lambda: circle(x, y, m=float("nan")), "m must be"),
        (lambda: lifted(x, y, neg_margin=-1.0), "neg_margin must be >= 0"),
        (lambda: lifted(x, y, pos_margin=-1.0), "pos_margin must be >= 0"),
        (lambda: lifted(x, y, distance="cos"), "unknown distance"),
        (lambda: margin(x, y, 1.0, margin=-0.2), "margin must be >= 0"),
        (lambda: margin(x, y, 1.0, nu=-1.0), "nu must be >= 0"),
        (lambda: margin(x, y, 1.0, pairs="some"), "unknown pairs 'some'"),
        (lambda: margin(x, y, jnp.ones((2, 2))), "beta must be a float scalar or a"),
        (lambda: margin(x, y, jnp.array([1, 2])), "beta must be a float"),
        (lambda: ms(x, y, reduction="avg"), "unknown reduction"),
        (lambda: circle(x[:1], y[:1]), "at least 2"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert losses.margin_loss(x, y, 1)[0] == losses.margin_loss(x, y, 1.0)[0]


# -------------------------------------------------- pytorch-metric-learning agreement


def _pml():
    """pytorch-metric-learning's modules (the test is skipped without it)."""
    pytest.importorskip("pytorch_metric_learning")
    import pytorch_metric_learning.distances
    import pytorch_metric_learning.losses
    import pytorch_metric_learning.miners
    import pytorch_metric_learning.reducers

    return pytorch_metric_learning


def _pml_batch(seed=0, b=24, classes=4, d=8):
    """A P x K batch (every anchor has positives and negatives), non-unit rows."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(b, d)) * rng.uniform(0.5, 2.0, (b, 1))).astype(np.float32)
    return x, np.repeat(np.arange(classes), b // classes).astype(np.int32)


def _torch(x, labels):
    torch = pytest.importorskip("torch")
    e = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    return e, torch.tensor(labels, dtype=torch.int64)


def _ours(fn, x, labels, *args, **kw):
    loss, g = jax.jit(jax.value_and_grad(lambda e: fn(e, labels, *args, **kw)[0]))(x)
    return float(loss), np.asarray(g)


def _assert_agree(ours, loss, e, msg=""):
    loss.backward()
    np.testing.assert_allclose(ours[0], float(loss.detach()), rtol=2e-5, err_msg=msg)
    np.testing.assert_allclose(ours[1], e.grad.numpy(), rtol=2e-4, atol=1e-6, err_msg=msg)


def test_multi_similarity_matches_pml():
    """The loss with its mining is PML's MultiSimilarityLoss given
    MultiSimilarityMiner's pairs; mining_epsilon=None is the loss alone."""
    pml = _pml()
    x, labels = _pml_batch()
    # a wide and a narrow setting: the miner keeps some pairs, not all
    for kw in ({}, {"alpha": 1.0, "beta": 20.0, "base": 0.1}):
        for epsilon in (0.1, 0.4, None):
            e, y = _torch(x, labels)
            loss_fn = pml.losses.MultiSimilarityLoss(**kw)
            pairs = None if epsilon is None else pml.miners.MultiSimilarityMiner(epsilon)(e, y)
            ours = _ours(losses.multi_similarity_loss, x, labels, mining_epsilon=epsilon, **kw)
            _assert_agree(ours, loss_fn(e, y, pairs), e, f"{kw} {epsilon}")


def test_circle_matches_pml():
    pml = _pml().losses
    x, labels = _pml_batch(1)
    for kw in ({}, {"m": 0.25, "gamma": 32.0}):
        e, y = _torch(x, labels)
        for reduction in ("mean_nonzero", "mean"):
            ours = _ours(losses.circle_loss, x, labels, reduction=reduction, **kw)
            e.grad = None
            _assert_agree(ours, pml.CircleLoss(**kw)(e, y), e, f"{kw} {reduction}")


def test_lifted_structure_matches_pml():
    """PML's GeneralizedLiftedStructureLoss on the same (non-normalised) Euclidean
    distances; every anchor of a P x K batch has a term."""
    pml = _pml()
    x, labels = _pml_batch(2)
    x = x * 0.3  # distances around the margin: some anchors have a zero loss
    for kw in ({}, {"neg_margin": 2.0, "pos_margin": 0.5}):
        e, y = _torch(x, labels)
        loss_fn = pml.losses.GeneralizedLiftedStructureLoss(
            **kw, distance=pml.distances.LpDistance(normalize_embeddings=False))
        ours = _ours(losses.lifted_structure_loss, x, labels, **kw)
        _assert_agree(ours, loss_fn(e, y), e, str(kw))


def test_margin_matches_pml():
    """pairs="triplets" with the default reduction is PML's MarginLoss: a fixed scalar
    beta, and a learned one per class with its regulariser (loss, embedding and beta
    gradients)."""
    pml = _pml()
    torch = pytest.importorskip("torch")
    x, labels = _pml_batch(3)
    x = x * 0.4
    distance = pml.distances.LpDistance(normalize_embeddings=False)
    e, y = _torch(x, labels)
    loss_fn = pml.losses.MarginLoss(margin=0.2, beta=1.2, distance=distance)
    ours = _ours(losses.margin_loss, x, labels, 1.2, pairs="triplets")
    _assert_agree(ours, loss_fn(e, y), e, "fixed beta")

    e, y = _torch(x, labels)
    loss_fn = pml.losses.MarginLoss(margin=0.3, nu=0.1, beta=1.0, learn_beta=True,
                                    num_classes=4, distance=distance).double()
    with torch.no_grad():
        loss_fn.beta.copy_(torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64))
    beta = jnp.array([0.9, 1.0, 1.1, 1.2])
    (loss, (g, g_beta)) = jax.jit(jax.value_and_grad(
        lambda e, b: losses.margin_loss(e, labels, b, margin=0.3, nu=0.1,
                                        pairs="triplets")[0], argnums=(0, 1)))(x, beta)
    _assert_agree((float(loss), np.asarray(g)), loss_fn(e, y), e, "learned beta")
    np.testing.assert_allclose(g_beta, loss_fn.beta.grad.numpy(), rtol=2e-4, atol=1e-6)


def test_pml_differences_on_anchors_without_positives():
    """Where this follows the papers and PML does not: an anchor without positives has
    no lifted-structure term here (log of an empty sum is -inf); PML gives its empty
    log-sum-exp 0 and charges [log sum_n e^(m - D_n)]_+. Removing it from PML's mean
    over all anchors recovers ours."""
    pml = _pml()
    torch = pytest.importorskip("torch")
    x, labels = _pml_batch(4, b=9, classes=3)
    x = x * 0.3
    labels = labels.copy()
    labels[-1] = 7
    loss_fn = pml.losses.GeneralizedLiftedStructureLoss(
        distance=pml.distances.LpDistance(normalize_embeddings=False),
        reducer=pml.reducers.DoNothingReducer())
    per_anchor = loss_fn(torch.tensor(x), torch.tensor(labels, dtype=torch.int64))
    per_anchor = per_anchor["loss"]["losses"].numpy().reshape(-1)
    ours, info = losses.lifted_structure_loss(x, labels, reduction="none")
    np.testing.assert_allclose(ours[:-1], per_anchor[:-1], rtol=1e-5, atol=1e-6)
    assert ours[-1] == 0.0 and per_anchor[-1] > 0.0
    assert info["anchor_num_selected"][-1] == 0.0
