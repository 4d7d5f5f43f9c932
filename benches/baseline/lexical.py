"""Lexical baseline for docs/detector.md: character 3-5-gram TF-IDF logistic
regression fitted on train.jsonl, threshold = best F1 with FPR <= 3 % on dev,
reported on dev and transfer at that threshold (transfer is never tuned on).

Usage: python3 benches/baseline/lexical.py [DATA_DIR] [--with-hard data/hard_negatives.jsonl]
Needs scikit-learn (pip install scikit-learn). Prints one JSON object.
"""
import json
import sys

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def figures(y, s, t):
    p = s >= t
    tp = int(((y == 1) & p).sum()); fp = int(((y == 0) & p).sum())
    fn = int(((y == 1) & ~p).sum()); tn = int(((y == 0) & ~p).sum())
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else None
    return {"n": len(y), "tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": prec, "recall": rec,
            "f1": f1, "fpr": fp / (fp + tn) if fp + tn else None,
            "auroc": roc_auc_score(y, s) if 0 < y.sum() < len(y) else None}


def main():
    args = sys.argv[1:]
    extra = []
    if "--with-hard" in args:
        i = args.index("--with-hard"); extra = rows(args[i + 1]); del args[i:i + 2]
    d = args[0] if args else "../shared/data"
    train, dev, transfer = rows(f"{d}/train.jsonl") + extra, rows(f"{d}/dev.jsonl"), rows(f"{d}/transfer.jsonl")
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True, max_features=200000)
    X = vec.fit_transform([r["text"] for r in train])
    y = np.array([r["label"] == "malicious" for r in train], dtype=int)
    clf = LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced").fit(X, y)
    out = {}
    sd = clf.predict_proba(vec.transform([r["text"] for r in dev]))[:, 1]
    yd = np.array([r["label"] == "malicious" for r in dev], dtype=int)
    best = (None, -1)
    for t in np.unique(sd):
        f = figures(yd, sd, t)
        if f["fpr"] is not None and f["fpr"] <= 0.03 and (f["f1"] or 0) > best[1]:
            best = (t, f["f1"])
    t = float(best[0])
    out["threshold"] = t
    for name, data in (("dev", dev), ("transfer", transfer)):
        s = clf.predict_proba(vec.transform([r["text"] for r in data]))[:, 1]
        yy = np.array([r["label"] == "malicious" for r in data], dtype=int)
        out[name] = figures(yy, s, t)
        out[name]["by_source"] = {}
        for src in sorted({r["source"] for r in data}):
            m = np.array([r["source"] == src for r in data])
            out[name]["by_source"][src] = figures(yy[m], s[m], t)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
