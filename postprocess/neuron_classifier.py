"""Neuron-level E/I classifier: logistic regression on per-neuron features, CV by neuron.

Model (:class:`NeuronClassifier`): median imputation → standard scaling → L2 logistic
regression (``C`` fixed, ``class_weight="balanced"``), wrapped in scikit-learn's
``CalibratedClassifierCV`` (``sigmoid`` = Platt scaling by default) whose internal folds are
themselves grouped by neuron. The output ``p_excitatory`` is the calibrated probability that
the neuron is excitatory (label 1).

Decision rule (``decision``): ``balanced`` (default) re-weights the calibrated probability to
equal class priors, using the E fraction π of the *training* labels,

    p_bal = (p / π) / (p / π + (1 − p) / (1 − π)),   sign = +1 iff p_bal ≥ 0.5,

the Bayes rule for balanced accuracy (equal cost per class); ``bayes`` uses p ≥ 0.5 (the rule
for plain accuracy). Both come from training data only; no threshold is tuned on test folds.

Cross-validation (:func:`cross_validate`): stratified K-fold grouped by neuron
(``StratifiedGroupKFold``), so all rows of one neuron fall in the same fold; repeated with
different shuffles; the calibration folds inside each training fold are grouped the same way.
Metrics are computed on the out-of-fold predictions of each repeat (accuracy, balanced
accuracy, ROC-AUC, Brier score, log loss) and summarised as mean ± std over repeats, next to a
majority-class baseline (predict the training fold's majority class; AUC 0.5).
:func:`ablation` repeats the CV for each feature group alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from cleftwise.postprocess.errors import PostprocessError
from cleftwise.postprocess.neuron_features import FeatureTable

__all__ = ["NeuronClassifierConfig", "NeuronClassifier", "CVResult", "neuron_folds", "cross_validate",
           "ablation", "labels_from_signs", "binary_metrics"]

log = logging.getLogger(__name__)


@dataclass
class NeuronClassifierConfig:
    """Neuron-level classifier and its cross-validation (hyper-parameters are fixed)."""

    C: float = 1.0
    """inverse L2 strength of the logistic regression (scikit-learn's default; not tuned)"""
    class_weight: Optional[str] = "balanced"
    """``balanced`` or None"""
    calibration: str = "sigmoid"
    """``sigmoid`` (Platt) or ``isotonic``"""
    calibration_folds: int = 3
    """grouped folds inside each training set for the calibration"""
    decision: str = "balanced"
    """``balanced`` (equal class priors) or ``bayes`` (p ≥ 0.5)"""
    n_splits: int = 5
    """outer cross-validation folds"""
    n_repeats: int = 10
    """outer cross-validation repeats with different shuffles"""
    seed: int = 0
    max_iter: int = 2000
    min_confidence: float = 0.9
    """signs with a lower confidence are flagged weak"""


def _check_cfg(cfg: NeuronClassifierConfig) -> None:
    if cfg.decision not in ("balanced", "bayes"):
        raise PostprocessError(f"decision must be 'balanced' or 'bayes', got {cfg.decision!r}")
    if cfg.calibration not in ("sigmoid", "isotonic"):
        raise PostprocessError(f"calibration must be 'sigmoid' or 'isotonic', got {cfg.calibration!r}")
    if cfg.n_splits < 2 or cfg.calibration_folds < 2 or cfg.n_repeats < 1:
        raise PostprocessError("n_splits and calibration_folds must be >= 2, n_repeats >= 1")
    if cfg.class_weight not in (None, "balanced"):
        raise PostprocessError(f"class_weight must be 'balanced' or None, got {cfg.class_weight!r}")


def labels_from_signs(signs: pd.DataFrame) -> pd.Series:
    """Binary labels (1 = excitatory, 0 = inhibitory) indexed by neuron; sign-0 neurons dropped."""
    for c in ("neuron", "sign"):
        if c not in signs.columns:
            raise PostprocessError(f"labels_from_signs: sign table lacks column {c!r}")
    s = signs[signs["sign"] != 0]
    return pd.Series((s["sign"].to_numpy() > 0).astype(int), index=pd.Index(s["neuron"].astype(np.int64),
                                                                            name="neuron"))


def neuron_folds(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold grouped by neuron: ``[(train_idx, test_idx), ...]``.

    No group (neuron) appears in both parts of a fold. Raises when a class has fewer groups
    than ``n_splits``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    groups = np.asarray(groups)
    if len(y) != len(groups):
        raise PostprocessError(f"neuron_folds: {len(y)} labels but {len(groups)} group ids")
    for cls in (0, 1):
        n = len(np.unique(groups[y == cls]))
        if n < n_splits:
            raise PostprocessError(f"neuron_folds: class {cls} has {n} neurons, fewer than the "
                                   f"{n_splits} folds; use fewer folds or more labelled neurons")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.asarray(tr), np.asarray(te)) for tr, te in cv.split(np.zeros(len(y)), y, groups)]


class NeuronClassifier:
    """Calibrated, neuron-grouped logistic regression. ``fit(X, y, groups)`` then ``predict``."""

    def __init__(self, cfg: NeuronClassifierConfig = NeuronClassifierConfig()):
        _check_cfg(cfg)
        self.cfg = cfg
        self.model_ = None
        self.prior_: Optional[float] = None
        self.inner_folds_: list = []
        self.columns_: Optional[list] = None

    def _pipeline(self):
        from sklearn.impute import SimpleImputer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                             LogisticRegression(C=self.cfg.C, class_weight=self.cfg.class_weight,
                                                max_iter=self.cfg.max_iter))

    def fit(self, X, y, groups=None, seed: Optional[int] = None) -> "NeuronClassifier":
        """Fit on rows ``X`` (n, f) with labels ``y`` (1 = E) and neuron ids ``groups``."""
        from sklearn.calibration import CalibratedClassifierCV

        X, self.columns_ = _as_matrix(X)
        y = np.asarray(y).astype(int)
        if set(np.unique(y)) != {0, 1}:
            raise PostprocessError(f"NeuronClassifier.fit: labels must contain both 0 (I) and 1 (E), "
                                   f"got {sorted(set(np.unique(y).tolist()))}")
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        seed = self.cfg.seed if seed is None else seed
        self.inner_folds_ = neuron_folds(y, groups, self.cfg.calibration_folds, seed)
        self.model_ = CalibratedClassifierCV(self._pipeline(), method=self.cfg.calibration,
                                             cv=self.inner_folds_)
        self.model_.fit(X, y)
        self.prior_ = float(np.mean(y))
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Calibrated p(excitatory) per row."""
        if self.model_ is None:
            raise PostprocessError("NeuronClassifier: call fit() first")
        X, cols = _as_matrix(X)
        if self.columns_ is not None and cols is not None and cols != self.columns_:
            raise PostprocessError(f"NeuronClassifier: features {cols} differ from the training "
                                   f"features {self.columns_}")
        return self.model_.predict_proba(X)[:, list(self.model_.classes_).index(1)]

    def decision_proba(self, p: np.ndarray) -> np.ndarray:
        """p re-weighted by the decision rule (``balanced``: equal priors; ``bayes``: as is)."""
        return _rebalance(p, self.prior_) if self.cfg.decision == "balanced" else np.asarray(p, float)

    def signs(self, features) -> pd.DataFrame:
        """A sign source (neuron, sign, p_excitatory, confidence, weak, mixed, source) for
        :func:`cleftwise.postprocess.connectome.combine_signs`; ``features`` is a :class:`FeatureTable`
        or a frame indexed by neuron with the training columns."""
        frame = features.frame[self.columns_] if isinstance(features, FeatureTable) else features
        if self.columns_ is not None:
            missing = [c for c in self.columns_ if c not in frame.columns]
            if missing:
                raise PostprocessError(f"NeuronClassifier.signs: features lack columns {missing}")
            frame = frame[self.columns_]
        p = self.decision_proba(self.predict_proba(frame))
        sign = np.where(p >= 0.5, 1, -1)
        conf = np.maximum(p, 1 - p)
        return pd.DataFrame({"neuron": frame.index.to_numpy(np.int64), "sign": sign, "p_excitatory": p,
                             "confidence": conf, "weak": conf < self.cfg.min_confidence, "mixed": False,
                             "source": "classifier"})


def _as_matrix(X) -> tuple[np.ndarray, Optional[list]]:
    if isinstance(X, FeatureTable):
        X = X.frame
    if isinstance(X, pd.DataFrame):
        return X.to_numpy(np.float64), list(map(str, X.columns))
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise PostprocessError(f"features must be a 2-D (neurons, features) array, got shape {arr.shape}")
    return arr, None


def _rebalance(p: np.ndarray, prior: float) -> np.ndarray:
    p = np.clip(np.asarray(p, float), 1e-9, 1 - 1e-9)
    a, b = p / prior, (1 - p) / (1 - prior)
    return a / (a + b)


def binary_metrics(y: np.ndarray, p: np.ndarray, p_decision: Optional[np.ndarray] = None) -> dict:
    """accuracy, balanced accuracy (decision at ``p_decision`` ≥ 0.5), ROC-AUC, Brier, log loss of ``p``."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, brier_score_loss, log_loss,
                                 roc_auc_score)

    y = np.asarray(y).astype(int)
    p = np.asarray(p, float)
    pred = (p if p_decision is None else np.asarray(p_decision, float)) >= 0.5
    out = {"accuracy": float(accuracy_score(y, pred)),
           "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
           "roc_auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan"),
           "brier": float(brier_score_loss(y, p)),
           "log_loss": float(log_loss(y, np.clip(p, 1e-6, 1 - 1e-6), labels=[0, 1]))}
    tp = int(np.sum(pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    out.update(tpr_e=tp / max(int(np.sum(y == 1)), 1), tnr_i=tn / max(int(np.sum(y == 0)), 1))
    return out


@dataclass
class CVResult:
    """Out-of-fold predictions and metrics of a repeated, neuron-grouped cross-validation."""

    metrics: dict
    """metric → {"mean", "std"} over repeats (decision rule of the config)"""
    metrics_bayes: dict
    """the same with the p ≥ 0.5 rule"""
    baseline: dict
    """majority-class baseline metric → {"mean", "std"}"""
    per_repeat: list
    """one metrics dict per repeat"""
    p_excitatory: np.ndarray
    """(n_repeats, n_rows) calibrated out-of-fold p(E)"""
    p_decision: np.ndarray
    """(n_repeats, n_rows) probabilities after the decision rule"""
    folds: list
    """per repeat, the list of (train_idx, test_idx)"""
    inner_folds: list = field(default_factory=list)
    """per repeat and fold, the calibration folds as (train_idx, test_idx) into the training rows"""
    n_rows: int = 0
    n_excitatory: int = 0
    n_inhibitory: int = 0


def _summary(rows: Sequence[dict]) -> dict:
    keys = rows[0].keys()
    return {k: {"mean": float(np.mean([r[k] for r in rows])), "std": float(np.std([r[k] for r in rows]))}
            for k in keys}


def cross_validate(X, y, groups=None, cfg: NeuronClassifierConfig = NeuronClassifierConfig()) -> CVResult:
    """Repeated stratified K-fold CV grouped by neuron (see the module docstring).

    Args:
        X: (n, f) features (array, DataFrame or :class:`FeatureTable`), rows aligned with ``y``.
        y: (n,) labels, 1 = excitatory, 0 = inhibitory.
        groups: (n,) neuron id per row (default: each row its own neuron).
        cfg: fixed hyper-parameters, folds, repeats, decision rule.
    """
    _check_cfg(cfg)
    Xm, cols = _as_matrix(X)
    y = np.asarray(y).astype(int)
    if len(Xm) != len(y):
        raise PostprocessError(f"cross_validate: {len(Xm)} feature rows but {len(y)} labels")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    P = np.zeros((cfg.n_repeats, len(y)))
    D = np.zeros_like(P)
    per_repeat, bayes_rows, base_rows, all_folds, all_inner = [], [], [], [], []
    for r in range(cfg.n_repeats):
        folds = neuron_folds(y, groups, cfg.n_splits, cfg.seed + r)
        base_pred = np.zeros(len(y), int)
        inner = []
        for k, (tr, te) in enumerate(folds):
            model = NeuronClassifier(cfg).fit(Xm[tr], y[tr], groups[tr], seed=cfg.seed + 1000 * r + k)
            inner.append(model.inner_folds_)
            P[r, te] = model.predict_proba(Xm[te])
            D[r, te] = model.decision_proba(P[r, te])
            base_pred[te] = int(np.mean(y[tr]) >= 0.5)
        per_repeat.append(binary_metrics(y, P[r], D[r]))
        bayes_rows.append(binary_metrics(y, P[r]))
        from sklearn.metrics import accuracy_score, balanced_accuracy_score

        base_rows.append({"accuracy": float(accuracy_score(y, base_pred)),
                          "balanced_accuracy": float(balanced_accuracy_score(y, base_pred)),
                          "roc_auc": 0.5})
        all_folds.append(folds)
        all_inner.append(inner)
    log.info("cross_validate: %d rows, %d features, %d×%d folds", len(y), Xm.shape[1], cfg.n_repeats, cfg.n_splits)
    return CVResult(metrics=_summary(per_repeat), metrics_bayes=_summary(bayes_rows),
                    baseline=_summary(base_rows), per_repeat=per_repeat, p_excitatory=P, p_decision=D,
                    folds=all_folds, inner_folds=all_inner, n_rows=len(y),
                    n_excitatory=int(np.sum(y == 1)), n_inhibitory=int(np.sum(y == 0)))


def ablation(features: FeatureTable, y, groups=None, cfg: NeuronClassifierConfig = NeuronClassifierConfig(),
             sets: Optional[Mapping[str, Sequence[str]]] = None) -> list[dict]:
    """Cross-validate each feature set (default: every group alone, then all groups).

    Returns:
        one dict per set: ``name``, ``groups``, ``columns``, ``metrics`` (mean/std),
        ``metrics_bayes``.
    """
    if sets is None:
        sets = {g: [g] for g in features.groups}
        sets["all"] = list(features.groups)
    out = []
    for name, gs in sets.items():
        cols = features.columns(gs)
        res = cross_validate(features.frame[cols], y, groups, cfg)
        out.append({"name": name, "groups": list(gs), "columns": cols, "metrics": res.metrics,
                    "metrics_bayes": res.metrics_bayes})
    return out
