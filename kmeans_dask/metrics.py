"""Clustering quality: labels in, numbers out (scikit-learn's metrics underneath).

Nothing here knows about Dask or the estimator: every function takes NumPy
arrays of true labels and cluster labels.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def contingency(true: np.ndarray, pred: np.ndarray, n_clusters: int, n_classes: int) -> np.ndarray:
    """Counts of (cluster, class) pairs, shape (n_clusters, n_classes)."""
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if true.shape != pred.shape:
        raise ValueError(f"true labels {true.shape} and cluster labels {pred.shape} differ in shape")
    flat = np.bincount(pred * n_classes + true, minlength=n_clusters * n_classes)
    return flat.reshape(n_clusters, n_classes)


def majority_mapping(true, pred, n_clusters: int, n_classes: int) -> np.ndarray:
    """The most common true class of every cluster (ties: the lower class).

    A cluster with no member is mapped to the most common class overall.

    Examples
    --------
    >>> majority_mapping([0, 0, 1, 1, 1], [0, 0, 0, 1, 1], 3, 2).tolist()
    [0, 1, 1]
    """
    table = contingency(true, pred, n_clusters, n_classes)
    mapping = table.argmax(axis=1)
    mapping[table.sum(axis=1) == 0] = int(table.sum(axis=0).argmax())
    return mapping


def cluster_report(true, pred, mapping: np.ndarray, class_names) -> dict:
    """Accuracy of the mapped clusters and the label-free clustering scores.

    Parameters
    ----------
    true : array of shape (n,)
        True class of every row.
    pred : array of shape (n,)
        Cluster of every row.
    mapping : array of shape (n_clusters,)
        Class assigned to each cluster (see :func:`majority_mapping`).
    class_names : sequence of str

    Returns
    -------
    dict
        ``accuracy``, ``nmi``, ``ari``, ``homogeneity``, ``completeness``,
        ``v_measure``, ``n``, and ``clusters``: for every cluster its
        ``size``, mapped ``label`` and its three most common classes with counts.
    """
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    k, c = len(mapping), len(class_names)
    table = contingency(true, pred, k, c)
    h, comp, v = skm.homogeneity_completeness_v_measure(true, pred)
    clusters = []
    for j in range(k):
        top = np.argsort(-table[j], kind="stable")[:3]
        clusters.append({
            "cluster": j,
            "size": int(table[j].sum()),
            "label": class_names[mapping[j]],
            "top": [[class_names[t], int(table[j, t])] for t in top if table[j, t] > 0],
        })
    return {
        "n": int(len(true)),
        "accuracy": float(skm.accuracy_score(true, mapping[pred])),
        "nmi": float(skm.normalized_mutual_info_score(true, pred)),
        "ari": float(skm.adjusted_rand_score(true, pred)),
        "homogeneity": float(h),
        "completeness": float(comp),
        "v_measure": float(v),
        "clusters": clusters,
    }


def format_report(report: dict, title: str = "") -> str:
    """A readable table of :func:`cluster_report`'s output."""
    lines = [title] if title else []
    lines.append(f"rows {report['n']}  accuracy {report['accuracy']:.4f}  NMI {report['nmi']:.4f}  "
                 f"ARI {report['ari']:.4f}")
    lines.append(f"homogeneity {report['homogeneity']:.4f}  completeness {report['completeness']:.4f}  "
                 f"V-measure {report['v_measure']:.4f}"
                 + (f"  inertia {report['inertia']:.6g}" if "inertia" in report else ""))
    lines.append(f"{'cluster':>7} {'size':>6}  {'label':<14} most common")
    for c in report["clusters"]:
        top = ", ".join(f"{name} {count}" for name, count in c["top"])
        lines.append(f"{c['cluster']:>7} {c['size']:>6}  {c['label']:<14} {top}")
    return "\n".join(lines)
