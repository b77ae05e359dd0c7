"""NCM and RanPAC on frozen features: task-by-task accumulation equals the
closed form on all data at once, and bad inputs fail with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from dlcft_jax import prototypes as pt


def _blobs(n, dim, num_classes, seed, spread=1.0, classes=None):
    """Gaussian blobs around random class centres; labels from `classes`."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((num_classes, dim))
    classes = np.arange(num_classes) if classes is None else classes
    y = rng.choice(np.asarray(classes), size=n)
    y[: len(classes)] = classes  # every listed class occurs
    z = centres[y] + spread * rng.standard_normal((n, dim))
    return z.astype(np.float32), y


# ----------------------------------------------------------------------------
# NCM.


def test_ncm_means_from_chunks_equal_direct_class_means():
    z, y = _blobs(90, 7, 5, seed=0, classes=[0, 1, 2, 4])  # class 3 unseen
    state0 = pt.ncm_init(5, 7)
    state = state0
    for rows in np.array_split(np.arange(90), 3):
        state = pt.ncm_update(state, z[rows], y[rows])
    means = pt.ncm_means(state)
    for c in (0, 1, 2, 4):
        np.testing.assert_allclose(
            means[c], z[y == c].astype(np.float64).mean(0), rtol=1e-12
        )
    np.testing.assert_array_equal(means[3], 0.0)
    np.testing.assert_array_equal(state.counts, np.bincount(y, minlength=5))
    # The update returns a new state and leaves the old one alone.
    np.testing.assert_array_equal(state0.sums, 0.0)
    np.testing.assert_array_equal(state0.counts, 0)


@pytest.mark.parametrize('metric', pt.NCM_METRICS)
def test_ncm_never_predicts_unseen_classes(metric):
    z, y = _blobs(40, 6, 4, seed=1, classes=[1, 3])
    state = pt.ncm_update(pt.ncm_init(4, 6), z, y)
    # Zero queries sit exactly on an unseen class's (zero) mean; queries far
    # from every seen mean would otherwise be closest to it too.
    rng = np.random.default_rng(2)
    queries = np.concatenate(
        [np.zeros((3, 6)), 50.0 * rng.standard_normal((20, 6)), z[:10]]
    )
    scores = pt.ncm_scores(state, queries, metric=metric)
    assert np.all(scores[:, [0, 2]] == -np.inf)
    assert np.all(np.isfinite(scores[:, [1, 3]]))
    assert set(scores.argmax(1)) <= {1, 3}


def test_ncm_argmax_matches_brute_force_nearest_mean():
    z, y = _blobs(120, 9, 6, seed=3, spread=3.0, classes=[0, 1, 2, 3, 5])
    state = pt.ncm_init(6, 9)
    for rows in np.array_split(np.arange(120), 2):
        state = pt.ncm_update(state, z[rows], y[rows])
    queries = _blobs(50, 9, 6, seed=4, spread=4.0)[0].astype(np.float64)
    seen = [0, 1, 2, 3, 5]
    means = {c: z[y == c].astype(np.float64).mean(0) for c in seen}

    cos = pt.ncm_scores(state, queries, metric='cosine')
    euc = pt.ncm_scores(state, queries, metric='euclidean')
    for i, q in enumerate(queries):
        cos_ref = {
            c: q @ m / (np.linalg.norm(q) * np.linalg.norm(m))
            for c, m in means.items()
        }
        dist_ref = {c: np.sum((q - m) ** 2) for c, m in means.items()}
        assert cos[i].argmax() == max(cos_ref, key=cos_ref.get)
        assert euc[i].argmax() == min(dist_ref, key=dist_ref.get)
        np.testing.assert_allclose(
            cos[i, seen], [cos_ref[c] for c in seen], rtol=1e-10
        )
        np.testing.assert_allclose(
            -euc[i, seen], [dist_ref[c] for c in seen], rtol=1e-10
        )
    # The two metrics are not the same ranking here, so both are exercised.
    assert np.any(cos.argmax(1) != euc.argmax(1))


# ----------------------------------------------------------------------------
# RanPAC.


def _closed_form(p, z, y, num_classes, ridge):
    """(HᵀH + λI)⁻¹ HᵀY on all data at once, with H = ReLU(Z P)."""
    h = np.maximum(z.astype(np.float64) @ p.astype(np.float64), 0.0)
    onehot = np.eye(num_classes)[y]
    return np.linalg.solve(h.T @ h + ridge * np.eye(h.shape[1]), h.T @ onehot)


@pytest.mark.parametrize('ridge', [1e-3, 0.5, 1e4])
def test_ranpac_task_by_task_equals_closed_form_on_all_data(ridge):
    dim, num_classes, proj_dim = 12, 6, 40
    z, y = _blobs(150, dim, num_classes, seed=5)
    state0 = pt.ranpac_init(dim, num_classes, proj_dim=proj_dim, seed=7)
    state = state0
    for task_classes in ([0, 1], [2, 3], [4, 5]):  # disjoint classes per task
        rows = np.isin(y, task_classes)
        state = pt.ranpac_update(state, z[rows], y[rows])
    assert state.count == 150
    assert state0.count == 0 and not np.any(state0.gram)

    w = pt.ranpac_solve(state, ridge)
    want = _closed_form(state.projection, z, y, num_classes, ridge)
    assert w.shape == (proj_dim, num_classes) and w.dtype == np.float64
    rel = np.linalg.norm(w - want) / np.linalg.norm(want)
    assert rel < 1e-8, rel
    np.testing.assert_allclose(
        w, want, rtol=1e-8, atol=1e-8 * np.abs(want).max()
    )


def test_ranpac_projection_is_fixed_by_the_seed():
    a = pt.ranpac_init(30, 3, proj_dim=200, seed=11).projection
    b = pt.ranpac_init(30, 3, proj_dim=200, seed=11).projection
    c = pt.ranpac_init(30, 3, proj_dim=200, seed=12).projection
    assert a.shape == (30, 200) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Standard normal entries (6000 draws: mean, std within a few SEs).
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1.0) < 0.05


def test_ranpac_scores_are_relu_projection_times_head():
    dim, num_classes = 8, 4
    z, y = _blobs(60, dim, num_classes, seed=13)
    state = pt.ranpac_update(
        pt.ranpac_init(dim, num_classes, proj_dim=32, seed=0), z, y
    )
    w = pt.ranpac_solve(state, 1.0)
    queries = _blobs(20, dim, num_classes, seed=14)[0]
    h = np.maximum(
        queries.astype(np.float64) @ state.projection.astype(np.float64), 0.0
    )
    np.testing.assert_allclose(pt.ranpac_features(state, queries), h)
    np.testing.assert_allclose(
        pt.ranpac_scores(state, w, queries), h @ w, rtol=1e-12
    )
    # And the head actually classifies its (well separated) training data.
    assert np.mean(pt.ranpac_scores(state, w, z).argmax(1) == y) > 0.9


def test_choose_ridge_picks_best_validation_accuracy():
    dim, num_classes, proj_dim, seed = 10, 4, 24, 3
    z, y = _blobs(120, dim, num_classes, seed=15, spread=4.0)
    tr, va = pt.split_holdout(len(y), fraction=0.2, seed=0)
    candidates = 10.0 ** np.arange(-2, 7)
    best, acc = pt.choose_ridge(
        z[tr],
        y[tr],
        z[va],
        y[va],
        num_classes=num_classes,
        proj_dim=proj_dim,
        seed=seed,
        candidates=candidates,
    )
    # A direct loop with plain NumPy (every class occurs in the train part).
    assert set(y[tr]) == set(range(num_classes))
    p = pt.ranpac_init(dim, num_classes, proj_dim, seed).projection
    h_va = np.maximum(z[va].astype(np.float64) @ p.astype(np.float64), 0.0)
    direct = {}
    for r in candidates:
        w = _closed_form(p, z[tr], y[tr], num_classes, r)
        direct[float(r)] = np.mean((h_va @ w).argmax(1) == y[va])
    assert acc.keys() == direct.keys()
    np.testing.assert_allclose(list(acc.values()), list(direct.values()))
    top = max(direct.values())
    assert best == max(r for r, a in direct.items() if a == top)
    assert len(set(direct.values())) > 1  # the choice is not trivial


def test_choose_ridge_breaks_ties_towards_the_larger_ridge():
    z, y = _blobs(60, 6, 3, seed=16, spread=0.1)  # trivially separable
    best, acc = pt.choose_ridge(
        z[:40],
        y[:40],
        z[40:],
        y[40:],
        num_classes=3,
        proj_dim=16,
        seed=0,
        candidates=[1e-2, 1e-1, 1.0],
    )
    assert set(acc.values()) == {1.0}
    assert best == 1.0


def test_choose_ridge_ignores_classes_absent_from_the_train_part():
    # Class 0 has no training rows, so its column of W is zero. A zero query
    # gives h = 0 and all-zero scores: without masking, the arg-max would be
    # class 0; among the trained classes {1, 2} it is class 1.
    z, y = _blobs(40, 5, 3, seed=17, classes=[1, 2])
    best, acc = pt.choose_ridge(
        z,
        y,
        np.zeros((4, 5)),
        np.ones(4, np.int64),
        num_classes=3,
        proj_dim=16,
        seed=0,
        candidates=[1e-1, 1e2],
    )
    assert acc == {0.1: 1.0, 100.0: 1.0} and best == 100.0


def test_split_holdout_is_disjoint_complete_and_seeded():
    tr, va = pt.split_holdout(50, fraction=0.2, seed=4)
    assert len(va) == 10 and len(tr) == 40
    assert not set(tr) & set(va)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), range(50))
    tr2, va2 = pt.split_holdout(50, fraction=0.2, seed=4)
    np.testing.assert_array_equal(va, va2)
    np.testing.assert_array_equal(tr, tr2)
    assert not np.array_equal(va, pt.split_holdout(50, 0.2, seed=5)[1])
    # At least one row on each side, even for tiny n or extreme fractions.
    for n, frac in ((2, 0.2), (3, 0.01), (3, 0.99)):
        tr, va = pt.split_holdout(n, frac)
        assert len(tr) >= 1 and len(va) >= 1 and len(tr) + len(va) == n


# ----------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_value_errors_naming_the_problem():
    ncm = pt.ncm_init(3, 4)
    with pytest.raises(ValueError, match=r'Label 3 out of range.*\[0, 3\)'):
        pt.ncm_update(ncm, np.zeros((2, 4)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r'Label -1 out of range'):
        pt.ncm_update(ncm, np.zeros((2, 4)), np.array([-1, 0]))
    with pytest.raises(ValueError, match=r'feature dim 4.*\(2, 5\)'):
        pt.ncm_update(ncm, np.zeros((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r'integer labels'):
        pt.ncm_update(ncm, np.zeros((2, 4)), np.array([0.0, 1.0]))
    ncm = pt.ncm_update(ncm, np.ones((2, 4)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"'manhattan'.*cosine, euclidean"):
        pt.ncm_scores(ncm, np.ones((1, 4)), metric='manhattan')
    with pytest.raises(ValueError, match=r'feature dim 4'):
        pt.ncm_scores(ncm, np.ones((1, 3)))
    with pytest.raises(ValueError, match=r'No class has been seen'):
        pt.ncm_scores(pt.ncm_init(3, 4), np.ones((1, 4)))

    rp = pt.ranpac_init(4, 3, proj_dim=8)
    with pytest.raises(ValueError, match=r'Label 5 out of range.*\[0, 3\)'):
        pt.ranpac_update(rp, np.zeros((2, 4)), np.array([5, 0]))
    with pytest.raises(ValueError, match=r'feature dim 4.*\(2, 6\)'):
        pt.ranpac_update(rp, np.zeros((2, 6)), np.array([0, 1]))
    with pytest.raises(ValueError, match=r'NaN'):
        pt.ranpac_update(rp, np.full((1, 4), np.nan), np.array([0]))
    with pytest.raises(ValueError, match=r'ridge must be positive'):
        pt.ranpac_solve(rp, 0.0)
    with pytest.raises(ValueError, match=r'W of shape \(8, 3\)'):
        pt.ranpac_scores(rp, np.zeros((8, 2)), np.zeros((1, 4)))

    with pytest.raises(ValueError, match=r'n >= 2'):
        pt.split_holdout(1)
    with pytest.raises(ValueError, match=r'fraction'):
        pt.split_holdout(10, fraction=1.0)
