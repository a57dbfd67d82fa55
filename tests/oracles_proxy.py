"""Plain Python-loop oracles of the proxy and margin-softmax losses (float64).

Written straight from the papers' formulas, one (row, class) pair at a time, with no
log-sum-exp tricks (the test inputs keep the exponentials in range): the readable
specification that ``jaxmetric.losses.proxy`` and ``jaxmetric.losses.margin_softmax``
are tested against. A zero vector has cosine 0 with everything, as in the library.

Each oracle returns ``(loss, per_row_or_None, counts)``; ``counts`` holds the info
counts the loss reports, and ``valid`` marks the real rows (padded rows are skipped).
"""

from __future__ import annotations

import math

import numpy as np


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b) / norms if norms > 0 else 0.0


def _rows(labels, valid):
    ok = np.ones(len(labels), bool) if valid is None else np.asarray(valid, bool)
    return [i for i in range(len(labels)) if ok[i]]


def _pair_counts(x, labels, w, rows):
    c = len(w)
    pos = [1.0 - cosine(x[i], w[labels[i]]) for i in rows]
    neg = [1.0 - cosine(x[i], w[k]) for i in rows for k in range(c) if k != labels[i]]
    return {
        "num_pos_pairs": len(pos),
        "num_neg_pairs": len(neg),
        "mean_pos_distance": sum(pos) / len(pos) if pos else 0.0,
        "mean_neg_distance": sum(neg) / len(neg) if neg else 0.0,
    }


def proxy_anchor(x, labels, proxies, *, margin=0.1, alpha=32.0, valid=None):
    """Kim et al. 2020, Eq. (4)."""
    rows = _rows(labels, valid)
    c = len(proxies)
    with_pos = [p for p in range(c) if any(labels[i] == p for i in rows)]
    pos_sum, neg_sum = 0.0, 0.0
    active_pos, active_neg = 0, 0
    for p in range(c):
        pos_exp, neg_exp = 0.0, 0.0
        for i in rows:
            s = cosine(x[i], proxies[p])
            if labels[i] == p:
                pos_exp += math.exp(-alpha * (s - margin))
                active_pos += s < margin
            else:
                neg_exp += math.exp(alpha * (s + margin))
                active_neg += s > -margin
        pos_sum += math.log(1.0 + pos_exp)
        neg_sum += math.log(1.0 + neg_exp)
    loss = (pos_sum / len(with_pos) if with_pos else 0.0) + neg_sum / c
    counts = _pair_counts(x, labels, proxies, rows)
    counts |= {
        "num_proxies_with_positives": len(with_pos),
        "num_active_pos_pairs": active_pos,
        "num_active_neg_pairs": active_neg,
    }
    return loss, None, counts


def _reduce_rows(per_row, active, labels, rows, x, w, reduction):
    counts = _pair_counts(x, labels, w, rows)
    counts |= {"num_rows": len(rows), "num_active_rows": sum(active[i] for i in rows)}
    return _reduce(per_row, labels, rows, counts, reduction)


def _reduce(per_row, labels, rows, counts, reduction):
    """(loss, per-row losses (B,), counts) of the rows' terms under ``reduction``."""
    full = np.zeros(len(labels))
    full[rows] = [per_row[i] for i in rows]
    total = float(full.sum())
    if reduction == "none":
        return full, full, counts
    if reduction == "sum":
        return total, full, counts
    return (total / len(rows) if rows else 0.0), full, counts


def proxy_nca(x, labels, proxies, *, softmax_scale=1.0, positive_in_denominator=False,
              reduction="mean", valid=None):
    """Movshovitz-Attias et al. 2017: NCA against the proxies, on the squared distance
    of the normalised vectors; the paper's denominator holds the other proxies only."""
    rows = _rows(labels, valid)
    c = len(proxies)
    per_row, active = {}, {}
    for i in rows:
        d = [2.0 - 2.0 * cosine(x[i], proxies[k]) for k in range(c)]
        own = math.exp(-softmax_scale * d[labels[i]])
        others = [math.exp(-softmax_scale * d[k]) for k in range(c) if k != labels[i]]
        denominator = sum(others) + (own if positive_in_denominator else 0.0)
        per_row[i] = -math.log(own / denominator)
        active[i] = d[labels[i]] >= min(d[k] for k in range(c) if k != labels[i])
    return _reduce_rows(per_row, active, labels, rows, x, proxies, reduction)


def _margin_softmax(x, labels, weights, psi, scale, reduction, valid):
    rows = _rows(labels, valid)
    c = len(weights)
    per_row, active = {}, {}
    for i in rows:
        cos = [cosine(x[i], weights[k]) for k in range(c)]
        own = psi(cos[labels[i]])
        others = [math.exp(scale * cos[k]) for k in range(c) if k != labels[i]]
        per_row[i] = -math.log(math.exp(scale * own) / (math.exp(scale * own) + sum(others)))
        active[i] = c > 1 and own <= max(cos[k] for k in range(c) if k != labels[i])
    return _reduce_rows(per_row, active, labels, rows, x, weights, reduction)


def arcface(x, labels, weights, *, margin=0.5, scale=64.0, large_angle="plain",
            reduction="mean", valid=None):
    """Deng et al. 2019, Eq. (3): cos(theta + m) for the own class, through the angle;
    ``large_angle`` as in the library's docstring."""
    def psi(cos):
        theta = math.acos(min(max(cos, -1.0), 1.0))
        if large_angle == "threshold" and theta > math.pi - margin:
            return cos - margin * math.sin(margin)
        if large_angle == "easy" and cos <= 0:
            return cos
        return math.cos(theta + margin)
    return _margin_softmax(x, labels, weights, psi, scale, reduction, valid)


def cosface(x, labels, weights, *, margin=0.35, scale=64.0, reduction="mean", valid=None):
    """Wang et al. 2018, Eq. (4): cos(theta) - m for the own class."""
    return _margin_softmax(x, labels, weights, lambda cos: cos - margin, scale, reduction,
                           valid)


def normalized_softmax(x, labels, weights, *, temperature=0.05, reduction="mean",
                       valid=None):
    """Zhai & Wu 2019: the softmax of cos / T, no margin."""
    return _margin_softmax(x, labels, weights, lambda cos: cos, 1.0 / temperature,
                           reduction, valid)


# ------------------------------------------------------- several vectors per class


def expand_centers(w, k):
    """(C, K, D) float64 centers made from (C, D) class vectors: center 0 is the
    vector itself, center t > 0 the vector plus 0.6 t times itself rolled by t (a
    fixed, differentiable map, so the class-vector checks cover sub-centers)."""
    w = np.asarray(w, np.float64)
    return np.stack([w + 0.6 * t * np.roll(w, t, axis=-1) for t in range(k)], axis=1)


def _pooled_softmax(x, labels, centers, pool, own_logit, scale, reduction, valid,
                    extra=0.0):
    """Cross-entropy of ``scale`` times the pooled class similarities, the own class's
    replaced by ``own_logit(S_own)``; every row's term plus ``extra``. Counts on the
    pooled similarities."""
    rows = _rows(labels, valid)
    c = len(centers)
    sims = {i: [pool([cosine(x[i], centers[k][t]) for t in range(len(centers[k]))])
                for k in range(c)] for i in rows}
    per_row, active = {}, {}
    for i in rows:
        s = sims[i]
        own = own_logit(s[labels[i]])
        others = [math.exp(scale * s[k]) for k in range(c) if k != labels[i]]
        per_row[i] = -math.log(math.exp(scale * own) / (math.exp(scale * own) + sum(others)))
        per_row[i] += extra
        active[i] = c > 1 and own <= max(s[k] for k in range(c) if k != labels[i])
    pos = [1.0 - sims[i][labels[i]] for i in rows]
    neg = [1.0 - sims[i][k] for i in rows for k in range(c) if k != labels[i]]
    counts = {
        "num_pos_pairs": len(pos),
        "num_neg_pairs": len(neg),
        "mean_pos_distance": sum(pos) / len(pos) if pos else 0.0,
        "mean_neg_distance": sum(neg) / len(neg) if neg else 0.0,
        "num_rows": len(rows),
        "num_active_rows": sum(active[i] for i in rows),
    }
    return _reduce(per_row, labels, rows, counts, reduction)


def subcenter_arcface(x, labels, weights, *, centers=3, margin=0.5, scale=64.0,
                      large_angle="plain", reduction="mean", valid=None):
    """Deng et al. 2020: ArcFace on the largest cosine over a class's sub-centers;
    ``weights`` (C, D) are expanded by :func:`expand_centers`."""
    def psi(cos):
        theta = math.acos(min(max(cos, -1.0), 1.0))
        if large_angle == "threshold" and theta > math.pi - margin:
            return cos - margin * math.sin(margin)
        if large_angle == "easy" and cos <= 0:
            return cos
        return math.cos(theta + margin)
    return _pooled_softmax(x, labels, expand_centers(weights, centers), max, psi, scale,
                           reduction, valid)


def soft_triple(x, labels, weights, *, centers=10, la=20.0, gamma=0.1, margin=0.01,
                tau=0.0, reduction="mean", valid=None):
    """Qian et al. 2019, Eqs. (7)-(10): the soft maximum over a class's centers, a
    margin on the own class, and the regulariser of the centers' distances."""
    w = expand_centers(weights, centers)

    def soft_max(s):
        e = [math.exp(v / gamma) for v in s]
        return sum(ei * v for ei, v in zip(e, s, strict=True)) / sum(e)

    reg = 0.0
    if centers > 1:
        for c in range(len(w)):
            for t in range(centers):
                for u in range(t + 1, centers):
                    reg += math.sqrt(2.0 + 1e-5 - 2.0 * cosine(w[c][t], w[c][u]))
        reg /= len(w) * centers * (centers - 1)
    return _pooled_softmax(x, labels, w, soft_max, lambda s: s - margin, la, reduction,
                           valid, extra=tau * reg)
