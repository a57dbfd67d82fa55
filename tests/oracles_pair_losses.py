"""Plain Python-loop oracles (float64) of the softmax and weighted pair losses, written
straight from the papers' formulas: one explicit loop over anchors, their positives and
their negatives, ``math.log`` / ``math.exp`` sums (no log-sum-exp tricks, so the inputs
must keep the exponents in range).

Every oracle takes ``(x, labels)`` and the loss's keyword arguments, ``valid`` (padded
rows take part in nothing) and optionally a reference set ``ref=(ref_x, ref_labels,
ref_valid)`` (anchors from ``x``, positives and negatives from the reference, no
"self" pair), and returns ``(loss, num_terms, num_active)`` like :mod:`oracles`: with
``reduction="none"`` float64 arrays over the anchors.
"""

from __future__ import annotations

import math

import numpy as np


def pair_rows(x, labels, valid, ref, metric):
    """Per anchor: (is valid anchor, values to every column, positives, negatives).

    ``metric``: "cosine_similarity", "l2", "squared_l2", "cosine" (1 - cos),
    "unit_squared" (2 - 2 cos, the squared distance of the normalised rows) or "snr"
    (var(x_j - x_i) / var(x_i) of the normalised rows, Yuan et al. 2019).
    """
    x = np.asarray(x, np.float64)
    ok = np.ones(len(x), bool) if valid is None else np.asarray(valid, bool)
    if ref is None:
        cols, col_labels, col_ok, is_ref = x, labels, ok, False
    else:
        cols, col_labels, col_ok = ref
        cols = np.asarray(cols, np.float64)
        col_ok = np.ones(len(cols), bool) if col_ok is None else np.asarray(col_ok, bool)
        is_ref = True
    out = []
    for i in range(len(x)):
        values = np.zeros(len(cols))
        for j in range(len(cols)):
            if not (ok[i] and col_ok[j]):
                continue
            if metric in ("cosine_similarity", "cosine", "unit_squared"):
                norms = np.linalg.norm(x[i]) * np.linalg.norm(cols[j])
                cos = float(x[i] @ cols[j]) / norms if norms > 0 else 0.0
                values[j] = {"cosine_similarity": cos, "cosine": 1.0 - cos,
                             "unit_squared": 2.0 - 2.0 * cos}[metric]
            elif metric == "snr":
                values[j] = snr_distance(x[i], cols[j])
            else:
                sq = float((x[i] - cols[j]) @ (x[i] - cols[j]))
                values[j] = math.sqrt(sq) if metric == "l2" else sq
        positives = [j for j in range(len(cols)) if ok[i] and col_ok[j]
                     and col_labels[j] == labels[i] and (is_ref or j != i)]
        negatives = [j for j in range(len(cols)) if ok[i] and col_ok[j]
                     and col_labels[j] != labels[i]]
        out.append((bool(ok[i]), values, positives, negatives))
    return out


def snr_distance(a, b) -> float:
    """var(b - a) / var(a) of the L2-normalised vectors (a zero vector stays zero; the
    anchor's variance floored at 1e-12, as in jaxmetric.distances)."""
    def unit(v):
        v = np.asarray(v, np.float64)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v
    a, b = unit(a), unit(b)
    return float(np.var(b - a) * len(a) / max(np.var(a) * len(a), 1e-12))


def _reduce(terms, reduction):
    """``terms``: per anchor, the list of its terms. mean over all terms, mean_nonzero
    over the non-zero ones, sum, none: per anchor."""
    if reduction == "none":
        return (np.array([sum(t) for t in terms], float),
                np.array([len(t) for t in terms], float),
                np.array([sum(1 for v in t if v != 0) for t in terms], float))
    flat = [v for t in terms for v in t]
    nonzero = [v for v in flat if v != 0]
    if reduction == "sum":
        loss = sum(flat)
    elif reduction == "mean":
        loss = sum(flat) / len(flat) if flat else 0.0
    else:
        loss = sum(nonzero) / len(nonzero) if nonzero else 0.0
    return loss, len(flat), len(nonzero)


def _log_sum_exp(values):
    return math.log(sum(math.exp(v) for v in values))


# -------------------------------------------------------------------------- softmax


def supcon(x, labels, *, temperature=0.1, reduction="mean", valid=None, ref=None):
    """Khosla et al. 2020, L^sup_out: -1/|P(i)| sum_p log(exp(s_ip/t) / sum_{a in A(i)}
    exp(s_ia/t)), A(i) = P(i) + N(i); anchors without positives have no term."""
    terms = []
    for _, s, positives, negatives in pair_rows(x, labels, valid, ref, "cosine_similarity"):
        if not positives:
            terms.append([])
            continue
        denominator = sum(math.exp(s[a] / temperature) for a in positives + negatives)
        log_probs = [math.log(math.exp(s[p] / temperature) / denominator) for p in positives]
        terms.append([-sum(log_probs) / len(positives)])
    return _reduce(terms, reduction)


def ntxent(x, labels, *, temperature=0.07, reduction="mean", valid=None, ref=None):
    """Chen et al. 2020 / Sohn 2016 with labels: per positive pair,
    -log(exp(s_ip/t) / (exp(s_ip/t) + sum_{n in N(i)} exp(s_in/t)))."""
    terms = []
    for _, s, positives, negatives in pair_rows(x, labels, valid, ref, "cosine_similarity"):
        anchor = []
        for p in positives:
            numerator = math.exp(s[p] / temperature)
            denominator = numerator + sum(math.exp(s[n] / temperature) for n in negatives)
            anchor.append(-math.log(numerator / denominator))
        terms.append(anchor)
    return _reduce(terms, reduction)


# ----------------------------------------------------------------- weighted pairs


def multi_similarity(x, labels, *, alpha=2.0, beta=50.0, base=0.5, mining_epsilon=0.1,
                     reduction="mean", valid=None, ref=None):
    """Wang et al. 2019: mine P~ = {p: s_ip - eps < max_n s_in}, N~ = {n: s_in + eps >
    min_p s_ip} (all pairs when eps is None), then 1/alpha log(1 + sum_P~ exp(-alpha
    (s_ip - base))) + 1/beta log(1 + sum_N~ exp(beta (s_in - base))); every valid anchor
    has a term (the paper's 1/m)."""
    terms = []
    for ok, s, positives, negatives in pair_rows(x, labels, valid, ref, "cosine_similarity"):
        if not ok:
            terms.append([])
            continue
        if mining_epsilon is not None:
            max_neg = max((s[n] for n in negatives), default=-math.inf)
            min_pos = min((s[p] for p in positives), default=math.inf)
            positives = [p for p in positives if s[p] - mining_epsilon < max_neg]
            negatives = [n for n in negatives if s[n] + mining_epsilon > min_pos]
        pos = math.log1p(sum(math.exp(-alpha * (s[p] - base)) for p in positives)) / alpha
        neg = math.log1p(sum(math.exp(beta * (s[n] - base)) for n in negatives)) / beta
        terms.append([pos + neg])
    return _reduce(terms, reduction)


def circle(x, labels, *, m=0.4, gamma=80.0, reduction="mean", valid=None, ref=None,
           weights_from=None):
    """Sun et al. 2020, pair-wise labels: log(1 + sum_n exp(gamma a_n (s_n - m)) sum_p
    exp(-gamma a_p (s_p - 1 + m))), a_p = [1 + m - s_p]_+, a_n = [s_n + m]_+, for the
    anchors with a positive and a negative.

    ``weights_from``: embeddings to compute the weights a_p, a_n from (default ``x``):
    holding them fixed while ``x`` moves gives the gradient with the weights as
    constants, the paper's.
    """
    rows = pair_rows(x, labels, valid, ref, "cosine_similarity")
    base = rows if weights_from is None else pair_rows(weights_from, labels, valid, ref,
                                                   "cosine_similarity")
    terms = []
    for (_, s, positives, negatives), (_, s0, _, _) in zip(rows, base, strict=True):
        if not (positives and negatives):
            terms.append([])
            continue
        neg = sum(math.exp(gamma * max(s0[n] + m, 0.0) * (s[n] - m)) for n in negatives)
        pos = sum(math.exp(-gamma * max(1 + m - s0[p], 0.0) * (s[p] - 1 + m))
                  for p in positives)
        terms.append([math.log1p(neg * pos)])
    return _reduce(terms, reduction)


def lifted_structure(x, labels, *, neg_margin=1.0, pos_margin=0.0, distance="l2",
                     reduction="mean", valid=None, ref=None):
    """Hermans et al. 2017, eq. 5 (+ pos_margin): [log sum_p exp(D_ip - pos_margin) +
    log sum_n exp(neg_margin - D_in)]_+ for the anchors with a positive and a negative."""
    terms = []
    for _, dist, positives, negatives in pair_rows(x, labels, valid, ref, distance):
        if not (positives and negatives):
            terms.append([])
            continue
        value = (_log_sum_exp([dist[p] - pos_margin for p in positives])
                 + _log_sum_exp([neg_margin - dist[n] for n in negatives]))
        terms.append([max(value, 0.0)])
    return _reduce(terms, reduction)


def margin(x, labels, beta, *, margin=0.2, nu=0.0, pairs="all", distance="l2",
           reduction="mean_nonzero", valid=None, ref=None):
    """Wu et al. 2017: [margin + y_ij (D_ij - beta_i)]_+ + nu beta_i over every pair
    ("all"), or over every triplet (a, p, n): [margin + D_ap - beta_a]_+ + [margin -
    D_an + beta_a]_+ + nu beta_a ("triplets", PML's MarginLoss). beta_i = beta, or
    beta[labels[i]] when beta is an array. Reductions: the sum of everything over the
    number of hinge terms ("mean"), of non-zero hinge terms ("mean_nonzero"), the sum,
    or per anchor ("none")."""
    beta = np.asarray(beta, np.float64)
    hinges, regs = [], []
    for i, (_, dist, positives, negatives) in enumerate(pair_rows(x, labels, valid, ref,
                                                              distance)):
        b_i = float(beta) if beta.ndim == 0 else float(beta[labels[i]])
        pos = lambda p, b_i=b_i, dist=dist: max(margin + dist[p] - b_i, 0.0)  # noqa: E731
        neg = lambda n, b_i=b_i, dist=dist: max(margin - dist[n] + b_i, 0.0)  # noqa: E731
        if pairs == "all":
            h = [pos(p) for p in positives] + [neg(n) for n in negatives]
            r = nu * b_i * len(h)
        else:
            h, r = [], 0.0
            for p in positives:
                for n in negatives:
                    h += [pos(p), neg(n)]
                    r += nu * b_i
        hinges.append(h)
        regs.append(r)
    if reduction == "none":
        return (np.array([sum(h) + r for h, r in zip(hinges, regs, strict=True)]),
                np.array([len(h) for h in hinges], float),
                np.array([sum(1 for v in h if v > 0) for h in hinges], float))
    total = sum(sum(h) for h in hinges) + sum(regs)
    n = sum(len(h) for h in hinges)
    active = sum(1 for h in hinges for v in h if v > 0)
    if reduction == "sum":
        return total, n, active
    divisor = n if reduction == "mean" else active
    return total / max(divisor, 1), n, active


# ------------------------------------------------------------------- SNR, ranking


def snr_contrastive(x, labels, *, margin=1.0, pos_margin=0.0, power=1,
                    reduction="mean_nonzero", valid=None, ref=None):
    """Yuan et al. 2019 / PML's SignalToNoiseRatioContrastiveLoss: the contrastive loss
    of every ordered pair on SNR distances; "mean_nonzero" per group (positive pairs,
    negative pairs), added."""
    pos_terms, neg_terms = [], []
    for _, dist, positives, negatives in pair_rows(x, labels, valid, ref, "snr"):
        pos_terms.append([max(dist[p] - pos_margin, 0.0) ** power for p in positives])
        neg_terms.append([max(margin - dist[n], 0.0) ** power for n in negatives])
    if reduction != "mean_nonzero":
        return _reduce([p + n for p, n in zip(pos_terms, neg_terms, strict=True)], reduction)
    loss, num, active = 0.0, 0, 0
    for group in (pos_terms, neg_terms):
        flat = [v for t in group for v in t]
        nonzero = [v for v in flat if v != 0]
        loss += sum(nonzero) / len(nonzero) if nonzero else 0.0
        num, active = num + len(flat), active + len(nonzero)
    return loss, num, active


def fastap(x, labels, *, num_bins=10, reduction="mean", valid=None):
    """Cakir et al. 2019, Eq. (8), with PML's bins: centers l * 4 / L, triangular
    pulses of half-width 4 / L, on the squared distances of the normalised rows."""
    delta = 4.0 / num_bins
    terms = []
    for ok, dist, positives, negatives in pair_rows(x, labels, valid, None, "unit_squared"):
        if not (ok and positives):
            terms.append([])
            continue
        h_pos = [sum(max(0.0, 1 - abs(dist[j] - k * delta) / delta) for j in positives)
                 for k in range(num_bins + 1)]
        h_neg = [sum(max(0.0, 1 - abs(dist[j] - k * delta) / delta) for j in negatives)
                 for k in range(num_bins + 1)]
        ap = 0.0
        for k in range(num_bins + 1):  # bin k: its center k * delta
            big_h_pos, big_h = sum(h_pos[: k + 1]), sum(h_pos[: k + 1]) + sum(h_neg[: k + 1])
            if big_h > 0:
                ap += h_pos[k] * big_h_pos / big_h
        terms.append([1.0 - ap / len(positives)])
    return _reduce(terms, reduction)


def smooth_ap(x, labels, *, temperature=0.01, include_anchor=False, reduction="mean",
              valid=None):
    """Brown et al. 2020, Eq. (12): each positive's sigmoid-smoothed rank among the
    positives over its rank among all rows; ``include_anchor``: the anchor is ranked
    and counted as a positive (the authors' code, PML)."""
    def g(u):
        return 1.0 / (1.0 + math.exp(-u / temperature))

    terms = []
    for i, (ok, sim, positives, negatives) in enumerate(
            pair_rows(x, labels, valid, None, "cosine_similarity")):
        if not (ok and positives):
            terms.append([])
            continue
        if include_anchor:
            sim = sim.copy()
            norm = np.linalg.norm(x[i])
            sim[i] = 1.0 if norm > 0 else 0.0
            positives = positives + [i]
        ranked = positives + negatives
        ap = 0.0
        for p in positives:
            rank_pos = 1.0 + sum(g(sim[j] - sim[p]) for j in positives if j != p)
            rank_all = 1.0 + sum(g(sim[j] - sim[p]) for j in ranked if j != p)
            ap += rank_pos / rank_all
        terms.append([1.0 - ap / len(positives)])
    return _reduce(terms, reduction)
