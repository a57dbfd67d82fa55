"""Plain Python-loop oracles written straight from the loss formulas (float64).

Slow on purpose: every pair and triplet is visited explicitly, so these are the
readable specification the vectorised losses are tested against.
"""

from __future__ import annotations

import numpy as np


def distance_matrix(x, squared):
    x = np.asarray(x, dtype=np.float64)
    b = len(x)
    d = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            diff = x[i] - x[j]
            d[i, j] = float(diff @ diff)
    return d if squared else np.sqrt(d)


def _valid(labels, valid):
    return np.ones(len(labels), bool) if valid is None else np.asarray(valid, bool)


def contrastive(x, labels, *, margin=1.0, pos_margin=0.0, power=2, reduction="mean", valid=None):
    d = distance_matrix(x, squared=False)
    ok = _valid(labels, valid)
    pos_terms, neg_terms = [], []
    b = len(labels)
    for i in range(b):
        for j in range(b):
            if i == j or not (ok[i] and ok[j]):
                continue
            if labels[i] == labels[j]:
                pos_terms.append(max(d[i, j] - pos_margin, 0.0) ** power)
            else:
                neg_terms.append(max(margin - d[i, j], 0.0) ** power)
    if reduction == "sum":
        return sum(pos_terms) + sum(neg_terms)
    if reduction == "mean":
        n = len(pos_terms) + len(neg_terms)
        return (sum(pos_terms) + sum(neg_terms)) / n if n else 0.0
    nz_p = [t for t in pos_terms if t > 0]
    nz_n = [t for t in neg_terms if t > 0]
    return (sum(nz_p) / len(nz_p) if nz_p else 0.0) + (sum(nz_n) / len(nz_n) if nz_n else 0.0)


def triplet(x, labels, *, margin=0.2, mining="all", squared=True, reduction="mean", valid=None):
    """Returns (loss, num_selected, num_active)."""
    d = distance_matrix(x, squared=squared)
    ok = _valid(labels, valid)
    b = len(labels)
    terms = []
    for a in range(b):
        if not ok[a]:
            continue
        positives = [p for p in range(b) if p != a and ok[p] and labels[p] == labels[a]]
        negatives = [n for n in range(b) if ok[n] and labels[n] != labels[a]]
        if mining == "batch_hard":
            if positives and negatives:
                dp = max(d[a, p] for p in positives)
                dn = min(d[a, n] for n in negatives)
                terms.append(max(dp - dn + margin, 0.0))
            continue
        for p in positives:
            dp = d[a, p]
            if mining == "hardest_negative":
                if negatives:
                    terms.append(max(dp - min(d[a, n] for n in negatives) + margin, 0.0))
                continue
            if mining == "semihard_facenet":
                if negatives:
                    farther = [d[a, n] for n in negatives if d[a, n] > dp]
                    dn = min(farther) if farther else max(d[a, n] for n in negatives)
                    terms.append(max(dp - dn + margin, 0.0))
                continue
            for n in negatives:
                dn = d[a, n]
                keep = {
                    "all": True,
                    "hard": dn <= dp,
                    "semihard": dp < dn < dp + margin,
                    "easy": dn >= dp + margin,
                }[mining]
                if keep:
                    terms.append(max(dp - dn + margin, 0.0))
    total = sum(terms)
    active = sum(1 for t in terms if t > 0)
    if reduction == "sum":
        loss = total
    elif reduction == "mean":
        loss = total / len(terms) if terms else 0.0
    else:
        loss = total / active if active else 0.0
    return loss, len(terms), active
