"""Plain Python-loop oracles written straight from the loss formulas (float64).

Slow on purpose: every pair and triplet is visited explicitly, so these are the
readable specification the vectorised losses are tested against.

Both losses return ``(loss, num_selected, num_active)``: the reduced loss, the number
of terms (pairs / selected triplets) and of non-zero terms. With ``reduction="none"``
all three are float64 arrays over the anchors (rows of the batch).
"""

from __future__ import annotations

import numpy as np

DISTANCES = ("squared_l2", "l2", "cosine")


def distance_matrix(x, distance="squared_l2"):
    """``d[i, j]`` for every pair of rows: squared L2, L2 or cosine (``1 - cos``).

    For the cosine distance a zero vector has cosine 0 with everything (distance 1).
    """
    x = np.asarray(x, dtype=np.float64)
    b = len(x)
    d = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            if distance == "cosine":
                norms = np.linalg.norm(x[i]) * np.linalg.norm(x[j])
                cos = float(x[i] @ x[j]) / norms if norms > 0 else 0.0
                d[i, j] = min(max(1.0 - cos, 0.0), 2.0)
            else:
                diff = x[i] - x[j]
                d[i, j] = float(diff @ diff)
    if distance == "l2":
        return np.sqrt(d)
    if distance not in DISTANCES:
        raise ValueError(distance)
    return d


def _valid(labels, valid):
    return np.ones(len(labels), bool) if valid is None else np.asarray(valid, bool)


def _reduce(groups, reduction):
    """``groups``: per group, per anchor, the list of that anchor's terms.

    mean: all terms; mean_nonzero: the mean of each group's non-zero terms, added;
    sum; none: per anchor, its terms of every group.
    """
    b = len(groups[0])
    per_anchor = [[t for g in groups for t in g[a]] for a in range(b)]
    selected = sum(len(t) for t in per_anchor)
    active = sum(1 for t in per_anchor for v in t if v > 0)
    if reduction == "none":
        return (
            np.array([sum(t) for t in per_anchor], float),
            np.array([len(t) for t in per_anchor], float),
            np.array([sum(1 for v in t if v > 0) for t in per_anchor], float),
        )
    total = sum(sum(t) for t in per_anchor)
    if reduction == "sum":
        loss = total
    elif reduction == "mean":
        loss = total / selected if selected else 0.0
    else:
        loss = 0.0
        for g in groups:
            nonzero = [v for terms in g for v in terms if v > 0]
            loss += sum(nonzero) / len(nonzero) if nonzero else 0.0
    return loss, selected, active


def contrastive(x, labels, *, margin=1.0, pos_margin=0.0, power=2, distance="l2",
                reduction="mean", valid=None):
    d = distance_matrix(x, distance)
    ok = _valid(labels, valid)
    b = len(labels)
    pos_terms = [[] for _ in range(b)]
    neg_terms = [[] for _ in range(b)]
    for i in range(b):
        for j in range(b):
            if i == j or not (ok[i] and ok[j]):
                continue
            if labels[i] == labels[j]:
                pos_terms[i].append(max(d[i, j] - pos_margin, 0.0) ** power)
            else:
                neg_terms[i].append(max(margin - d[i, j], 0.0) ** power)
    return _reduce([pos_terms, neg_terms], reduction)


# ------------------------------------------------------------- triplet mining modes
# One function per mode: the (p, n) triplets it selects for anchor a, given the
# distance matrix, the anchor's positives and negatives, and the margin.


def _all(d, a, positives, negatives, margin):
    return [(p, n) for p in positives for n in negatives]


def _hard(d, a, positives, negatives, margin):
    return [(p, n) for p in positives for n in negatives if d[a, n] <= d[a, p]]


def _semihard(d, a, positives, negatives, margin):
    return [(p, n) for p in positives for n in negatives if d[a, p] < d[a, n] < d[a, p] + margin]


def _easy(d, a, positives, negatives, margin):
    return [(p, n) for p in positives for n in negatives if d[a, n] >= d[a, p] + margin]


def _hardest_negative(d, a, positives, negatives, margin):
    if not negatives:
        return []
    closest = min(negatives, key=lambda n: d[a, n])
    return [(p, closest) for p in positives]


def _batch_hard(d, a, positives, negatives, margin):
    if not (positives and negatives):
        return []
    return [(max(positives, key=lambda p: d[a, p]), min(negatives, key=lambda n: d[a, n]))]


def _semihard_facenet(d, a, positives, negatives, margin):
    out = []
    for p in positives:
        if not negatives:
            continue
        farther = [n for n in negatives if d[a, n] > d[a, p]]
        if farther:
            out.append((p, min(farther, key=lambda n: d[a, n])))
        else:
            out.append((p, max(negatives, key=lambda n: d[a, n])))
    return out


MINING = {
    "all": _all,
    "hard": _hard,
    "semihard": _semihard,
    "easy": _easy,
    "hardest_negative": _hardest_negative,
    "batch_hard": _batch_hard,
    "semihard_facenet": _semihard_facenet,
}


def triplet(x, labels, *, margin=0.2, mining="all", distance=None, squared=None,
            reduction="mean", valid=None):
    """``squared`` (True / False) is the losses' deprecated spelling of the distance.

    ``margin="soft"``: each selected triplet costs ``log(1 + exp(d_ap - d_an))``
    (Hermans et al. 2017) instead of the hinge; the modes that select by the margin
    ("semihard", "easy") are not defined then.
    """
    soft = margin == "soft"
    if soft and mining in ("semihard", "easy"):
        raise ValueError(f"no soft-margin {mining!r} mining")
    if distance is None:
        distance = "l2" if squared is False else "squared_l2"
    d = distance_matrix(x, distance)
    ok = _valid(labels, valid)
    b = len(labels)
    terms = [[] for _ in range(b)]
    for a in range(b):
        if not ok[a]:
            continue
        positives = [p for p in range(b) if p != a and ok[p] and labels[p] == labels[a]]
        negatives = [n for n in range(b) if ok[n] and labels[n] != labels[a]]
        for p, n in MINING[mining](d, a, positives, negatives, margin):
            if soft:
                terms[a].append(float(np.logaddexp(0.0, d[a, p] - d[a, n])))
            else:
                terms[a].append(max(d[a, p] - d[a, n] + margin, 0.0))
    return _reduce([terms], reduction)
