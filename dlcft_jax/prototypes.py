"""Training-free classifiers on frozen pre-trained features (NCM and RanPAC).

These are the baselines that continual-learning work on pre-trained models
compares against: the backbone stays frozen, its features z ∈ R^D are computed
once per example (by a jitted backbone elsewhere), and the classifier is built
from running sums on the host in closed form, with no gradients. Feeding the
tasks one after another gives exactly the classifier that all the data seen so
far would give at once, so neither method forgets by construction.

NCM, nearest class mean (SimpleCIL: Zhou et al., "Revisiting Class-Incremental
Learning with Pre-Trained Models", 2023). With n_c the number of examples of
class c seen so far,

    μ_c = (1 / n_c) Σ_{i: y_i = c} z_i,
    cosine:     s_c(z) = ⟨z / ‖z‖, μ_c / ‖μ_c‖⟩,
    euclidean:  s_c(z) = −‖z − μ_c‖²,

and the prediction is argmax_c s_c(z). Classes with n_c = 0 score −∞.

RanPAC, training-free phase (McDonnell et al., "RanPAC: Random Projections and
Pre-trained Models for Continual Learning", NeurIPS 2023). A random matrix
P ∈ R^{D×M}, P_ij ~ N(0, 1), drawn once from a seeded generator and then
fixed, lifts the features to h = ReLU(zᵀP) ∈ R^M; a ridge-regression head on
one-hot targets is accumulated through its sufficient statistics:

    G = Σ_i h_i h_iᵀ            (M, M),
    Q = Σ_i h_i onehot(y_i)ᵀ    (M, C),
    W = (G + λ I)⁻¹ Q,          s(z) = hᵀ W.

λ is chosen on a held-out part of the training data (`choose_ridge`,
`split_holdout`). Omitted from RanPAC: its first-session phase, which adapts
the backbone with a parameter-efficient method (adapters, SSF or VPT) by SGD
on the first task before freezing it. Only the frozen-feature random
projection and the ridge head are implemented here.

All functions are host-side NumPy: they accept NumPy or JAX arrays and return
NumPy arrays. States are immutable `NamedTuple`s; the update functions return
new states and leave their inputs unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:  # scipy ships with jax; the NumPy fallback keeps this module standalone.
    import scipy.linalg as _sla
except ImportError:  # pragma: no cover
    _sla = None

NCM_METRICS = ('cosine', 'euclidean')

# RanPAC uses 10,000; 5,000 keeps the (M, M) Gram in 200 MB.
DEFAULT_PROJ_DIM = 5000

# λ candidates for `choose_ridge`: 1e-8, 1e-7, ..., 1e14.
DEFAULT_RIDGES = 10.0 ** np.arange(-8, 15)

_EPS = 1e-12


# ----------------------------------------------------------------------------
# Input checks.


def _features(x, dim: int, what: str = 'features') -> np.ndarray:
    """`x` as a finite float64 (N, dim) array, or a ValueError."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f'Expected {what} of shape (N, {dim}) (feature dim {dim}), got '
            f'shape {x.shape}.'
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(
        x.dtype, np.complexfloating
    ):
        raise ValueError(f'Expected real {what}, got dtype {x.dtype}.')
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f'The {what} contain NaN or infinite values.')
    return x


def _labels(y, n: int, num_classes: int) -> np.ndarray:
    """`y` as an int64 (n,) array of labels in [0, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(
            f'Expected labels of shape ({n},), one per feature row, got '
            f'shape {y.shape}.'
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'Expected integer labels, got dtype {y.dtype}.')
    y = y.astype(np.int64, copy=False)
    if n and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0]
        raise ValueError(
            f'Label {bad} out of range: labels must lie in [0, {num_classes}).'
        )
    return y


def _positive_int(value: int, name: str) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    return int(value)


def _class_sums(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class sums of the rows of x, shape (num_classes, x.shape[1])."""
    out = np.zeros((num_classes, x.shape[1]), np.float64)
    np.add.at(out, y, x)
    return out


# ----------------------------------------------------------------------------
# NCM (SimpleCIL).


class NCMState(NamedTuple):
    """Running per-class feature sums.

    Attributes:
      sums: (C, D) float64, the sum of the features of each class.
      counts: (C,) int64, the number of examples of each class.
    """

    sums: np.ndarray
    counts: np.ndarray


def ncm_init(num_classes: int, dim: int) -> NCMState:
    """An empty NCM state for `num_classes` classes and `dim`-dim features."""
    num_classes = _positive_int(num_classes, 'num_classes')
    dim = _positive_int(dim, 'dim')
    return NCMState(
        sums=np.zeros((num_classes, dim), np.float64),
        counts=np.zeros((num_classes,), np.int64),
    )


def ncm_update(state: NCMState, features, labels) -> NCMState:
    """Adds the rows of `features` to the sums of their classes.

    Args:
      state: The current state.
      features: (N, D) features.
      labels: (N,) integer labels in [0, C).

    Returns:
      The new state; `state` is left unchanged.

    Raises:
      ValueError: On a feature-dim mismatch, non-finite features, or labels of
        the wrong shape, dtype or range.
    """
    num_classes, dim = state.sums.shape
    x = _features(features, dim)
    y = _labels(labels, x.shape[0], num_classes)
    return NCMState(
        sums=state.sums + _class_sums(x, y, num_classes),
        counts=state.counts + np.bincount(y, minlength=num_classes),
    )


def ncm_means(state: NCMState) -> np.ndarray:
    """The (C, D) class means; rows of classes never seen are zero."""
    counts = np.maximum(state.counts, 1).astype(np.float64)
    return state.sums / counts[:, None]


def ncm_scores(state: NCMState, features, metric: str = 'cosine') -> np.ndarray:
    """Scores (N, C) whose arg-max over classes is the NCM prediction.

    Args:
      state: The accumulated class sums.
      features: (N, D) features to classify.
      metric: 'cosine' for the cosine similarity between the L2-normalised
        features and class means (SimpleCIL), or 'euclidean' for minus the
        squared Euclidean distance to the class means.

    Returns:
      (N, C) float64 scores; −inf for classes never seen.

    Raises:
      ValueError: On an unknown metric, a feature-dim mismatch, or a state in
        which no class has been seen yet.
    """
    if metric not in NCM_METRICS:
        raise ValueError(
            f'Unknown NCM metric {metric!r}; valid metrics: '
            f'{", ".join(NCM_METRICS)}.'
        )
    x = _features(features, state.sums.shape[1])
    seen = state.counts > 0
    if not np.any(seen):
        raise ValueError('No class has been seen yet: call ncm_update first.')
    means = ncm_means(state)
    if metric == 'cosine':
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        mn = means / np.maximum(
            np.linalg.norm(means, axis=1, keepdims=True), _EPS
        )
        scores = xn @ mn.T
    else:
        # ‖x − μ‖² = ‖x‖² − 2⟨x, μ⟩ + ‖μ‖², clipped at 0 against round-off.
        sq = (
            np.sum(x * x, axis=1)[:, None]
            - 2.0 * (x @ means.T)
            + np.sum(means * means, axis=1)[None, :]
        )
        scores = -np.maximum(sq, 0.0)
    return np.where(seen[None, :], scores, -np.inf)


# ----------------------------------------------------------------------------
# RanPAC (random projection + ridge head).


class RanPACState(NamedTuple):
    """The fixed projection and the ridge head's sufficient statistics.

    Attributes:
      projection: (D, M) float32, the random matrix P (fixed by the seed).
      gram: (M, M) float64, G = Σ h hᵀ.
      cross: (M, C) float64, Q = Σ h onehot(y)ᵀ.
      count: The number of examples accumulated.
    """

    projection: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    count: int


def ranpac_init(
    dim: int,
    num_classes: int,
    proj_dim: int = DEFAULT_PROJ_DIM,
    seed: int = 0,
) -> RanPACState:
    """An empty RanPAC state with P ~ N(0, 1) drawn from a seeded generator.

    Args:
      dim: D, the backbone's feature dimension.
      num_classes: C, the total number of classes over all tasks.
      proj_dim: M, the random-projection dimension. RanPAC uses 10,000; the
        default 5,000 keeps the (M, M) float64 Gram in 200 MB.
      seed: Seed of the `np.random.Generator` that draws P; the same seed
        gives the same P.

    Returns:
      The state, with zero statistics.
    """
    dim = _positive_int(dim, 'dim')
    num_classes = _positive_int(num_classes, 'num_classes')
    proj_dim = _positive_int(proj_dim, 'proj_dim')
    rng = np.random.default_rng(seed)
    return RanPACState(
        projection=rng.standard_normal((dim, proj_dim), dtype=np.float32),
        gram=np.zeros((proj_dim, proj_dim), np.float64),
        cross=np.zeros((proj_dim, num_classes), np.float64),
        count=0,
    )


def ranpac_features(state: RanPACState, z) -> np.ndarray:
    """h = ReLU(z P), shape (N, M), computed in float64.

    Raises:
      ValueError: If z is not (N, D) with D the projection's input dim, or
        holds non-finite values.
    """
    x = _features(z, state.projection.shape[0])
    return np.maximum(x @ state.projection.astype(np.float64), 0.0)


def ranpac_update(state: RanPACState, z, labels) -> RanPACState:
    """Adds the examples (z, labels) to G and Q.

    Arguments, result and errors as in `ncm_update`, with z the (N, D)
    backbone features: a new state is returned and `state` is left unchanged.
    """
    h = ranpac_features(state, z)
    num_classes = state.cross.shape[1]
    y = _labels(labels, h.shape[0], num_classes)
    return RanPACState(
        projection=state.projection,
        gram=state.gram + h.T @ h,
        cross=state.cross + _class_sums(h, y, num_classes).T,
        count=state.count + h.shape[0],
    )


def ranpac_solve(state: RanPACState, ridge: float) -> np.ndarray:
    """The ridge head W = (G + λ I)⁻¹ Q, shape (M, C), in float64.

    G + λI is symmetric positive definite for λ > 0, so it is factorised by
    Cholesky (scipy); if round-off makes the factorisation fail (λ far below
    the scale of G), LU with partial pivoting (`np.linalg.solve`) is used.

    Columns of classes with no data are zero, so those classes score 0 in
    `ranpac_scores`; restrict the arg-max to the classes seen so far.

    Raises:
      ValueError: If ridge is not a positive finite number.
      np.linalg.LinAlgError: (a ValueError) if G + λI is numerically singular.
    """
    ridge = float(ridge)
    if not (np.isfinite(ridge) and ridge > 0.0):
        raise ValueError(f'ridge must be positive and finite, got {ridge!r}.')
    a = state.gram + ridge * np.eye(state.gram.shape[0])
    factor = None
    if _sla is not None:
        try:
            factor = _sla.cho_factor(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            # Not positive definite in floating point (a tiny ridge on a
            # rank-deficient Gram): the LU solve below still answers.
            factor = None
    if factor is not None:
        return _sla.cho_solve(factor, state.cross, check_finite=False)
    return np.linalg.solve(a, state.cross)


def ranpac_scores(state: RanPACState, w, z) -> np.ndarray:
    """Scores s = h W, shape (N, C), with h = ReLU(z P).

    Args:
      state: The state whose projection P defines h.
      w: (M, C) head from `ranpac_solve`.
      z: (N, D) backbone features.

    Raises:
      ValueError: On a shape mismatch of w or z.
    """
    w = np.asarray(w)
    if w.shape != state.cross.shape:
        raise ValueError(
            f'Expected W of shape {state.cross.shape} (proj_dim, '
            f'num_classes), got {w.shape}.'
        )
    return ranpac_features(state, z) @ w


def split_holdout(
    n: int, fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n) into train and validation indices.

    The validation part has round(fraction · n) rows, clipped so that each
    part has at least one. RanPAC holds out 20% of a task's data to choose λ.

    Args:
      n: The number of rows, at least 2.
      fraction: The share of rows held out for validation, in (0, 1).
      seed: Seed of the permutation.

    Returns:
      (train_idx, val_idx): disjoint sorted int64 arrays whose union is
      range(n).

    Raises:
      ValueError: If n < 2 or fraction is not in (0, 1).
    """
    if int(n) != n or n < 2:
        raise ValueError(
            f'split_holdout needs n >= 2 rows (at least one for training and '
            f'one for validation), got n={n!r}.'
        )
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'fraction must lie in (0, 1), got {fraction!r}.')
    n = int(n)
    n_val = min(max(int(round(fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def choose_ridge(
    z_train,
    y_train,
    z_val,
    y_val,
    *,
    num_classes: int,
    proj_dim: int,
    seed: int,
    candidates=DEFAULT_RIDGES,
) -> tuple[float, dict[float, float]]:
    """Picks λ by validation accuracy of the RanPAC head fit on the train part.

    For each candidate λ, W = (G + λI)⁻¹ Q is fit on (z_train, y_train) with
    the projection given by (proj_dim, seed), and scored by its accuracy on
    (z_val, y_val). Only classes present in y_train compete in the arg-max
    (the others have zero columns in W). Ties go to the larger λ.

    Args:
      z_train: (N_train, D) features to fit on.
      y_train: (N_train,) integer labels in [0, num_classes).
      z_val: (N_val, D) held-out features.
      y_val: (N_val,) held-out labels.
      num_classes: C.
      proj_dim: M; use the same value (and seed) as the final RanPAC state.
      seed: Seed of the projection.
      candidates: The λ values to try, all positive.

    Returns:
      (best_ridge, {ridge: validation accuracy in [0, 1]}). A candidate whose
      system is numerically singular gets NaN and is never chosen.

    Raises:
      ValueError: On bad inputs (see `ranpac_update`), an empty train or
        validation set, non-positive or no candidates, or when every
        candidate fails.
    """
    ridges = np.asarray(candidates, dtype=np.float64).reshape(-1)
    if ridges.size == 0 or not np.all(np.isfinite(ridges) & (ridges > 0)):
        raise ValueError(
            f'candidates must be a non-empty list of positive ridges, got '
            f'{candidates!r}.'
        )
    dim = np.asarray(z_train).shape[-1] if np.ndim(z_train) == 2 else -1
    if dim < 1:
        raise ValueError(
            f'Expected z_train of shape (N, D), got shape {np.shape(z_train)}.'
        )
    state = ranpac_init(dim, num_classes, proj_dim=proj_dim, seed=seed)
    state = ranpac_update(state, z_train, y_train)
    h_val = ranpac_features(state, z_val)
    yv = _labels(y_val, h_val.shape[0], num_classes)
    if state.count == 0 or h_val.shape[0] == 0:
        raise ValueError(
            'choose_ridge needs at least one training and one validation row.'
        )
    seen = np.bincount(np.asarray(y_train), minlength=num_classes) > 0
    accuracy = {}
    for ridge in ridges:
        try:
            w = ranpac_solve(state, ridge)
        except np.linalg.LinAlgError:
            accuracy[float(ridge)] = float('nan')
            continue
        scores = np.where(seen[None, :], h_val @ w, -np.inf)
        accuracy[float(ridge)] = float(np.mean(scores.argmax(axis=1) == yv))
    valid = [(acc, r) for r, acc in accuracy.items() if not np.isnan(acc)]
    if not valid:
        raise ValueError('Every ridge candidate gave a singular system.')
    return max(valid)[1], accuracy
