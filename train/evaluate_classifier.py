"""Evaluate a synapse transmitter classifier on neuron-held-out data: per synapse and per neuron.

Per synapse (:func:`synapse_metrics`): accuracy, balanced accuracy, per-class precision /
recall / F1 / support, confusion matrix (rows = true, columns = predicted), ROC-AUC and PR-AUC
(average precision) with class 0 (E by default) as the positive class; more than two classes
use one-vs-rest macro averages.

Threshold: with two classes the synapse is class 0 iff p0 ≥ τ. τ is chosen on the validation
split to maximise balanced accuracy (:func:`choose_threshold`) and then frozen for the test
split; the checkpoint exported with ``--export`` carries it (``extra.threshold``), and the
classify stage uses it. With more classes the prediction is the argmax.

Per neuron (Dale's principle: one transmitter per presynaptic neuron), :func:`neuron_table`:
the neuron's log-odds are the **mean** of its synapses' log-odds,
``L = mean_s logit(clip(p0_s, 1e-6, 1 - 1e-6))``, and the neuron is class 0 iff
``L ≥ logit(τ)`` — the same threshold as for a single synapse, and independent of how many
synapses a neuron has (a sum would make large neurons overconfident when synapse errors are
correlated). With more classes: the mean log-probability per class, argmax.
:func:`accuracy_vs_synapses` gives the neuron accuracy when only k randomly chosen synapses
per neuron are known (k = 1, 2, …; neurons with at least k synapses, ``repeats`` draws each).

Outputs (:func:`write_report`): ``<prefix>_eval.json``, ``<prefix>_eval.md`` and the figures
``<prefix>_confusion.png``, ``<prefix>_roc.png``, ``<prefix>_pr.png``, ``<prefix>_acc_vs_count.png``.

:func:`evaluate_checkpoint` runs all of it for one checkpoint (:class:`ClassifierEvalConfig`).
CLI::

    cleftwise evaluate-classifier --config train/configs/ei_3d.yaml \
        --checkpoint runs/ei/best.pt --out docs/reports --prefix ei [--tta] [--export models/weights/ei_vgg3d.pt]
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_curve,
                             precision_recall_fscore_support, roc_auc_score, roc_curve)

from cleftwise.models.checkpoint import load_model, resolve_device, save_checkpoint
from cleftwise.models.errors import ModelError
from cleftwise.postprocess.classify import predict_probs, probs_to_labels

from cleftwise.train.cubes import CubeSet, build_cube_sets, crop_cubes, split_summary
from cleftwise.train.report_io import jsonable, write_json_and_markdown
from cleftwise.train.errors import TrainError
from cleftwise.train.train_classifier import balanced_accuracy, load_classifier_config

__all__ = ["synapse_metrics", "choose_threshold", "neuron_table", "neuron_metrics",
           "accuracy_vs_synapses", "evaluate_sets", "write_report", "export_classifier",
           "ClassifierEvalConfig", "evaluate_checkpoint"]

log = logging.getLogger(__name__)

_EPS = 1e-6


# ------------------------------------------------------------------------------------------
# metrics (pure)
# ------------------------------------------------------------------------------------------

def choose_threshold(true: np.ndarray, p0: np.ndarray) -> float:
    """τ maximising balanced accuracy of "class 0 iff p0 ≥ τ" on (true (n,), p0 (n,)).

    Candidates are midpoints between sorted distinct scores (plus 0.5); ties go to the
    candidate closest to 0.5. Both classes must be present.
    """
    true = np.asarray(true)
    p0 = np.asarray(p0, dtype=np.float64)
    pos, neg = true == 0, true != 0
    if not pos.any() or not neg.any():
        raise TrainError("choose_threshold: validation needs synapses of both classes")
    s = np.unique(p0)
    cand = np.unique(np.concatenate([[0.5], (s[:-1] + s[1:]) / 2, [s[0], s[-1] + 1e-12]]))
    cand = np.clip(cand, 0.0, 1.0)
    # recall of class 0 = P(p0 >= τ | pos); of class 1 = P(p0 < τ | neg)
    ps, ns = np.sort(p0[pos]), np.sort(p0[neg])
    r0 = 1.0 - np.searchsorted(ps, cand, side="left") / len(ps)
    r1 = np.searchsorted(ns, cand, side="left") / len(ns)
    bal = (r0 + r1) / 2
    best = np.flatnonzero(np.isclose(bal, bal.max()))
    return float(cand[best[np.argmin(np.abs(cand[best] - 0.5))]])


def synapse_metrics(true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    threshold: Optional[float] = None) -> dict:
    """Per-synapse metrics of probabilities (n, C) against true class indices (n,)."""
    true = np.asarray(true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    nc = len(classes)
    pred = probs_to_labels(probs, threshold)
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=list(range(nc)), zero_division=0)
    out = {"n": int(len(true)), "threshold": threshold,
           "accuracy": float((pred == true).mean()) if len(true) else float("nan"),
           "balanced_accuracy": balanced_accuracy(true, pred, nc),
           "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, c in enumerate(classes)},
           "confusion": confusion_matrix(true, pred, labels=list(range(nc))).tolist(),
           "confusion_axes": "rows = true, columns = predicted, order = classes"}
    present = np.unique(true)
    if nc == 2 and len(present) == 2:
        y = (true == 0).astype(int)
        out["roc_auc"] = float(roc_auc_score(y, probs[:, 0]))
        out["pr_auc"] = float(average_precision_score(y, probs[:, 0]))
        out["positive_class"] = classes[0]
    elif nc > 2 and len(present) == nc:
        out["roc_auc"] = float(roc_auc_score(true, probs, multi_class="ovr", average="macro"))
        out["pr_auc"] = float(np.mean([average_precision_score(true == c, probs[:, c]) for c in range(nc)]))
    else:
        out["roc_auc"] = out["pr_auc"] = None
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def neuron_table(keys: np.ndarray, true: np.ndarray, probs: np.ndarray,
                 threshold: Optional[float] = None) -> pd.DataFrame:
    """One row per neuron: n_synapses, true (majority label), mean log-odds, p, pred (see module doc)."""
    keys = np.asarray(keys).astype(str)
    probs = np.asarray(probs, dtype=np.float64)
    df = pd.DataFrame({"neuron": keys, "true": np.asarray(true, dtype=np.int64)})
    nc = probs.shape[1]
    if nc == 2:
        df["score"] = _logit(probs[:, 0])
        g = df.groupby("neuron", sort=True)
        t = g.agg(n_synapses=("true", "size"), true=("true", lambda v: np.bincount(v).argmax()),
                  mean_log_odds=("score", "mean"))
        tau = 0.5 if threshold is None else float(threshold)
        t["p"] = 1.0 / (1.0 + np.exp(-t["mean_log_odds"]))
        t["pred"] = np.where(t["mean_log_odds"] >= _logit(np.array(tau)), 0, 1)
    else:
        lp = np.log(np.clip(probs, _EPS, 1.0))
        for c in range(nc):
            df[f"lp{c}"] = lp[:, c]
        g = df.groupby("neuron", sort=True)
        t = g.agg(n_synapses=("true", "size"), true=("true", lambda v: np.bincount(v).argmax()),
                  **{f"lp{c}": (f"lp{c}", "mean") for c in range(nc)})
        t["pred"] = t[[f"lp{c}" for c in range(nc)]].to_numpy().argmax(axis=1)
    t["correct"] = t["pred"] == t["true"]
    return t.reset_index()


def neuron_metrics(table: pd.DataFrame, min_synapses: int = 5) -> dict:
    """Neuron accuracy (all neurons and those with ≥ ``min_synapses``) from :func:`neuron_table`."""
    big = table[table["n_synapses"] >= min_synapses]
    return {"neurons": int(len(table)), "accuracy_all": float(table["correct"].mean()) if len(table) else None,
            "min_synapses": int(min_synapses), f"neurons_ge{min_synapses}": int(len(big)),
            "accuracy": float(big["correct"].mean()) if len(big) else None,
            "balanced_accuracy": balanced_accuracy(big["true"].to_numpy(), big["pred"].to_numpy(),
                                                   int(max(table["true"].max(), table["pred"].max()) + 1))
            if len(big) else None}


def accuracy_vs_synapses(keys: np.ndarray, true: np.ndarray, probs: np.ndarray,
                         threshold: Optional[float] = None, max_k: int = 20, repeats: int = 50,
                         seed: int = 0) -> pd.DataFrame:
    """Neuron accuracy from k random synapses per neuron, k = 1..max_k (rows: k, neurons, accuracy).

    For each k every neuron with ≥ k synapses is classified ``repeats`` times from a random
    k-subset of its synapses (same aggregation as :func:`neuron_table`); accuracy is the mean
    over neurons and draws.
    """
    keys = np.asarray(keys).astype(str)
    true = np.asarray(true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    groups = pd.Series(np.arange(len(keys))).groupby(keys).apply(lambda s: s.to_numpy())
    nc = probs.shape[1]
    score = _logit(probs[:, 0]) if nc == 2 else np.log(np.clip(probs, _EPS, 1.0))
    tau = _logit(np.array(0.5 if threshold is None else threshold))
    rows = []
    for k in range(1, max_k + 1):
        hits, total, neurons = 0, 0, 0
        for idx in groups:
            if len(idx) < k:
                continue
            neurons += 1
            label = np.bincount(true[idx]).argmax()
            for _ in range(repeats):
                pick = rng.choice(idx, size=k, replace=False)
                if nc == 2:
                    pred = 0 if score[pick].mean() >= tau else 1
                else:
                    pred = int(score[pick].mean(axis=0).argmax())
                hits += int(pred == label)
                total += 1
        if neurons == 0:
            break
        rows.append({"k": k, "neurons": neurons, "accuracy": hits / total})
    return pd.DataFrame(rows, columns=["k", "neurons", "accuracy"])


# ------------------------------------------------------------------------------------------
# evaluation of a checkpoint
# ------------------------------------------------------------------------------------------

def evaluate_sets(model, val: Optional[CubeSet], test: CubeSet, classes: Sequence[str],
                  cube_shape: Sequence[int], batch_size: int = 64, device="cpu", tta: bool = False,
                  threshold: Optional[float] = None, min_synapses: int = 5, max_k: int = 20,
                  seed: int = 0) -> dict:
    """Report dict: τ from ``val`` (unless given), then synapse and neuron metrics on ``test``."""
    t0 = time.perf_counter()
    report: dict = {"classes": list(classes), "tta": bool(tta)}
    if val is not None and len(val):
        pv = predict_probs(model, crop_cubes(val.cubes, cube_shape), batch_size, device, tta)
        if threshold is None and len(classes) == 2:
            threshold = choose_threshold(val.labels, pv[:, 0])
        report["val"] = synapse_metrics(val.labels, pv, classes, threshold)
        report["val_argmax"] = synapse_metrics(val.labels, pv, classes, None)
        report["val_neurons"] = neuron_metrics(neuron_table(val.neurons, val.labels, pv, threshold), min_synapses)
    report["threshold"] = threshold
    pt = predict_probs(model, crop_cubes(test.cubes, cube_shape), batch_size, device, tta)
    report["test"] = synapse_metrics(test.labels, pt, classes, threshold)
    report["test_argmax"] = synapse_metrics(test.labels, pt, classes, None)
    table = neuron_table(test.neurons, test.labels, pt, threshold)
    report["test_neurons"] = neuron_metrics(table, min_synapses)
    curve = accuracy_vs_synapses(test.neurons, test.labels, pt, threshold, max_k=max_k, seed=seed)
    report["test_acc_vs_count"] = curve.to_dict(orient="list")
    report["test_neuron_sizes"] = table["n_synapses"].describe().to_dict()
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["_arrays"] = {"test_true": test.labels, "test_probs": pt, "neuron_table": table}
    return report


def _plots(report: dict, out_dir: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = report["classes"]
    arrays = report["_arrays"]
    true, probs = arrays["test_true"], arrays["test_probs"]
    files = []

    cm = np.asarray(report["test"]["confusion"])
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    tau = report.get("threshold")
    ax.set_title(f"test synapses (τ={tau:.3f})" if tau is not None else "test synapses (argmax)", fontsize=9)
    fig.tight_layout()
    files.append(os.path.join(out_dir, f"{prefix}_confusion.png"))
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    if len(classes) == 2 and len(np.unique(true)) == 2:
        y = (true == 0).astype(int)
        fpr, tpr, _ = roc_curve(y, probs[:, 0])
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot(fpr, tpr, lw=1.5, label=f"AUC {report['test']['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel(f"false positive rate ({classes[1]} called {classes[0]})")
        ax.set_ylabel(f"true positive rate ({classes[0]})")
        ax.legend(loc="lower right")
        ax.set_title("ROC, test synapses", fontsize=9)
        fig.tight_layout()
        files.append(os.path.join(out_dir, f"{prefix}_roc.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

        prec, rec, _ = precision_recall_curve(y, probs[:, 0])
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot(rec, prec, lw=1.5, label=f"AP {report['test']['pr_auc']:.3f}")
        ax.axhline(y.mean(), color="k", ls=":", lw=0.8, label="chance")
        ax.set_xlabel(f"recall ({classes[0]})")
        ax.set_ylabel(f"precision ({classes[0]})")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left")
        ax.set_title("precision-recall, test synapses", fontsize=9)
        fig.tight_layout()
        files.append(os.path.join(out_dir, f"{prefix}_pr.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    curve = pd.DataFrame(report["test_acc_vs_count"])
    if len(curve):
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        ax.plot(curve["k"], curve["accuracy"], "o-", ms=3)
        ax.axhline(report["test"]["balanced_accuracy"], color="gray", ls=":", lw=0.8,
                   label="synapse balanced acc.")
        ax.set_xlabel("synapses known per neuron (k, random subsets)")
        ax.set_ylabel("neuron accuracy")
        ax.set_ylim(min(0.5, float(curve["accuracy"].min()) - 0.02), 1.005)
        ax2 = ax.twinx()
        ax2.bar(curve["k"], curve["neurons"], alpha=0.15, color="k", width=0.6)
        ax2.set_ylabel("neurons with ≥ k synapses", fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("per-neuron accuracy (mean log-odds)", fontsize=9)
        fig.tight_layout()
        files.append(os.path.join(out_dir, f"{prefix}_acc_vs_count.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _markdown(report: dict, files: list[str]) -> str:
    classes = report["classes"]
    t, tn = report["test"], report["test_neurons"]
    L = [f"# {report.get('title', 'Synapse classifier evaluation')}", ""]
    if report.get("checkpoint"):
        L += [f"Checkpoint: `{report['checkpoint']}` (sha256 `{report.get('weights_sha256', '')[:16]}…`)", ""]
    if report.get("splits"):
        L += ["## Data (neuron-held-out)", "", "| split | synapses | neurons | " +
              " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
        for name, s in report["splits"].items():
            L.append(f"| {name} | {s['synapses']} | {s['neurons']} | " +
                     " | ".join(str(s["per_class"].get(c, 0)) for c in classes) + " |")
        L.append("")
    L += ["## Per synapse (test)", "",
          f"Threshold τ = {_fmt(report.get('threshold'))} on p({classes[0]}), chosen on validation to maximise "
          f"balanced accuracy, then frozen. TTA: {'8 flips' if report.get('tta') else 'off'}.", "",
          "| metric | test (τ) | test (argmax) | validation (τ) |", "|---|---|---|---|"]
    v = report.get("val", {})
    ta = report.get("test_argmax", {})
    for k in ("n", "accuracy", "balanced_accuracy", "roc_auc", "pr_auc"):
        L.append(f"| {k} | {_fmt(t.get(k))} | {_fmt(ta.get(k))} | {_fmt(v.get(k))} |")
    L += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c in classes:
        pc = t["per_class"][c]
        L.append(f"| {c} | {pc['precision']:.4f} | {pc['recall']:.4f} | {pc['f1']:.4f} | {pc['support']} |")
    L += ["", "Confusion matrix (rows = true, columns = predicted): " + json.dumps(t["confusion"]), "",
          "## Per neuron (test)", "",
          "Dale's principle: a neuron's log-odds are the mean of its synapses' log-odds; it is "
          f"{classes[0]} iff that mean ≥ logit(τ).", "",
          f"- neurons: {tn['neurons']}; accuracy over all neurons: {_fmt(tn['accuracy_all'])}",
          f"- neurons with ≥ {tn['min_synapses']} synapses: {tn['neurons_ge' + str(tn['min_synapses'])]}; "
          f"accuracy {_fmt(tn['accuracy'])}; balanced accuracy {_fmt(tn['balanced_accuracy'])}", ""]
    curve = pd.DataFrame(report["test_acc_vs_count"])
    if len(curve):
        L += ["| k synapses | neurons with ≥ k | accuracy |", "|---|---|---|"]
        for _, r in curve.iterrows():
            L.append(f"| {int(r['k'])} | {int(r['neurons'])} | {r['accuracy']:.4f} |")
        L.append("")
    if files:
        L += ["## Figures", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files] + [""]
    for note in report.get("notes", []):
        L += [note, ""]
    return "\n".join(L) + "\n"


def write_report(report: dict, out_dir: str, prefix: str = "ei") -> dict:
    """Write ``<prefix>_eval.json``, ``<prefix>_eval.md`` and the PNGs; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    files = _plots(report, out_dir, prefix)
    js = os.path.join(out_dir, f"{prefix}_eval.json")
    md = os.path.join(out_dir, f"{prefix}_eval.md")
    write_json_and_markdown(report, js, md, _markdown(report, files))
    return {"json": js, "markdown": md, "figures": files}


def export_classifier(checkpoint: str, out_path: str, threshold: Optional[float], metrics: dict) -> str:
    """Re-save a checkpoint's weights at ``out_path`` with τ and the test metrics in ``extra``."""
    try:
        model, meta = load_model(checkpoint, device="cpu")
    except ModelError as e:
        raise TrainError(f"export: {e}") from e
    extra = dict(meta.extra)
    extra["threshold"] = threshold
    extra["evaluation"] = metrics
    saved = save_checkpoint(out_path, model, meta.config, meta.voxel_size, meta.model_type, extra=extra)
    return str(saved.weights_path)


@dataclass
class ClassifierEvalConfig:
    """One evaluation of a classifier checkpoint (:func:`evaluate_checkpoint`)."""

    config: str
    """the training YAML (its data section and split)"""
    checkpoint: str
    """classifier checkpoint (.pt/.json)"""
    out: str
    """folder for the JSON, Markdown and PNGs"""
    prefix: str = "ei"
    """file name prefix"""
    tta: bool = False
    """8-flip test-time augmentation"""
    threshold: Optional[float] = None
    """use this τ instead of choosing it on validation"""
    min_synapses: int = 5
    """neurons counted in the neuron accuracy"""
    export: Optional[str] = None
    """write the checkpoint with τ and metrics here (e.g. models/weights/x.pt)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    title: str = "E/I synapse classifier evaluation"
    """title of the Markdown report"""
    notes: Sequence[str] = field(default_factory=tuple)
    """paragraphs appended to the Markdown"""


def evaluate_checkpoint(cfg: ClassifierEvalConfig) -> tuple[dict, dict]:
    """Evaluate ``cfg.checkpoint`` on the validation and test splits of ``cfg.config``'s data,
    optionally export it with τ, and write the report; returns (report, {kind: path})."""
    tcfg = load_classifier_config(cfg.config)
    if tcfg.data.split_file is None:
        tcfg.data.split_file = os.path.join(tcfg.run_dir, "split.json")
    sets = build_cube_sets(tcfg.data, splits=("val", "test"))
    device = resolve_device(cfg.device)
    try:
        model, meta = load_model(cfg.checkpoint, device=device)
    except ModelError as e:
        raise TrainError(str(e)) from e
    ex_shape = tuple(meta.extra.get("cube_shape") or ())
    if ex_shape and ex_shape != tuple(tcfg.data.cube_shape):
        raise TrainError(f"checkpoint {cfg.checkpoint} takes cubes {ex_shape} but data.cube_shape is "
                         f"{tuple(tcfg.data.cube_shape)}")
    report = evaluate_sets(model, sets["val"], sets["test"], tcfg.data.classes, tcfg.data.cube_shape,
                           device=device, tta=cfg.tta, threshold=cfg.threshold,
                           min_synapses=cfg.min_synapses, seed=tcfg.seed)
    report.update(title=cfg.title, checkpoint=cfg.checkpoint, weights_sha256=meta.weights_sha256,
                  splits=split_summary(sets, tcfg.data.classes),
                  training=meta.extra.get("training"), trained_step=meta.extra.get("step"),
                  notes=list(cfg.notes))
    if cfg.export:
        summary = {"tau": report["threshold"], "test": {k: report["test"][k] for k in
                   ("n", "accuracy", "balanced_accuracy", "roc_auc", "pr_auc")},
                   "test_neurons": report["test_neurons"], "tta": cfg.tta}
        report["exported"] = export_classifier(cfg.checkpoint, cfg.export, report["threshold"],
                                               jsonable(summary))
    return report, write_report(report, cfg.out, cfg.prefix)
