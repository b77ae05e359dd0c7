"""experiments.curvature_spectrum: the vanishing SCE curvature diagnostic."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlcft_jax import curvature as curv_lib
from dlcft_jax import linearization as lin
from experiments import curvature_spectrum as cs


class _MLP(nn.Module):
    """A two-layer feature extractor for vectors."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.leaky_relu(nn.Dense(8, name='fc1')(x), 0.01)
        return nn.Dense(6, name='fc2')(x)


def _blobs(num_classes: int = 3, per_class: int = 32, seed: int = 0):
    """Linearly separable data: tight Gaussian blobs on the first axes."""
    rng = np.random.default_rng(seed)
    means = 3.0 * np.eye(num_classes, 4)
    x = np.concatenate(
        [
            means[c] + 0.5 * rng.normal(size=(per_class, 4))
            for c in range(num_classes)
        ]
    ).astype(np.float32)
    y = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    return x, y


def _mlp():
    net = _MLP()
    return net.apply, net.init(jax.random.key(0), jnp.zeros((2, 4)))


def _fit(steps: int = 300, every: int = 50) -> dict:
    apply_fn, variables = _mlp()
    x, y = _blobs()
    return cs.run_spectrum(
        apply_fn,
        variables,
        x,
        y,
        steps=steps,
        every=every,
        batch_size=32,
        learning_rate=1e-2,
        weight_decay=0.0,
        clip_norm=0.0,
        curvature_batches=3,
        top_k=5,
    )


def test_sce_curvature_vanishes_as_the_model_fits_and_mse_does_not():
    result = _fit()
    sce, mse = result['losses']['sce'], result['losses']['mse']
    c = result['num_classes']
    assert c == 3 and result['layer'] == 'fc2'  # the last backbone layer
    # Both runs fit the separable data.
    assert sce['train_accuracy'][-1] == 1.0
    assert mse['train_accuracy'][-1] == 1.0
    assert sce['train_loss'][-1] < 1e-2 * sce['train_loss'][0]
    # SCE: the head's curvature falls by orders of magnitude, through its
    # output factor S = E[r rᵀ] (r = p − onehot(ỹ), ỹ ~ softmax): tr S → 0.
    assert sce['head_trace'][-1] < 1e-2 * sce['head_trace'][0]
    assert sce['head_trace_S'][-1] < 1e-2 * sce['head_trace_S'][0]
    # ... and so does the backbone layer's, whose S is built from the same r.
    assert sce['layer_trace'][-1] < 1e-2 * sce['layer_trace'][0]
    assert max(sce['head_top_k'][-1]) < 1e-2 * max(sce['head_top_k'][0])
    # MSE: S_head is exactly I at every record, so tr = tr(A)·C, and the
    # curvature does not vanish (the features grow to fit α = 15).
    assert mse['head_trace_S'] == [float(c)] * len(mse['steps'])
    np.testing.assert_allclose(
        mse['head_trace'], np.asarray(mse['head_trace_A']) * c, rtol=1e-12
    )
    assert mse['head_trace'][-1] > 0.5 * mse['head_trace'][0]
    assert mse['layer_trace'][-1] > 0.5 * mse['layer_trace'][0]
    # After the fit the two differ by orders of magnitude.
    assert sce['head_trace'][-1] < 1e-3 * mse['head_trace'][-1]


def test_runs_are_deterministic_and_well_formed():
    a = _fit(steps=20, every=10)
    b = _fit(steps=20, every=10)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    for name in ('sce', 'mse'):
        run = a['losses'][name]
        assert run['steps'] == [0, 10, 20]
        for key in cs.RECORD_KEYS:
            assert len(run[key]) == 3, key
        for top, trace in zip(
            run['head_top_k'], run['head_trace'], strict=True
        ):
            assert len(top) == 5 and top == sorted(top, reverse=True)
            assert top[0] >= 0 and sum(top) <= trace * (1 + 1e-9)
    # Same start: same network and head, so the same features (tr A) at step 0.
    assert (
        a['losses']['sce']['head_trace_A'][0]
        == a['losses']['mse']['head_trace_A'][0]
    )


def test_kron_spectrum_matches_the_explicit_matrix():
    rng = np.random.default_rng(0)
    ma, ms = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))
    A, S = ma @ ma.T, ms @ ms.T
    got = cs.kron_spectrum(A, S, top_k=5)
    eig = np.sort(np.linalg.eigvalsh(np.kron(A, S)))[::-1]
    np.testing.assert_allclose(got['top_k'], eig[:5], rtol=1e-10)
    np.testing.assert_allclose(got['trace'], np.trace(np.kron(A, S)))
    # Depthwise: block-diagonal over channels, S_c·A_c.
    mats = rng.normal(size=(3, 4, 4))
    Ad = mats @ np.swapaxes(mats, 1, 2)
    Sd = rng.uniform(0.5, 2.0, size=3)
    dense = curv_lib.kfac_dense_matrix({'A': Ad, 'S': Sd})
    got = cs.kron_spectrum(Ad, Sd, top_k=12)
    eig = np.sort(np.linalg.eigvalsh(dense))[::-1]
    np.testing.assert_allclose(got['top_k'], eig, rtol=1e-10)
    np.testing.assert_allclose(got['trace'], np.trace(dense))


@pytest.mark.parametrize('loss', ['ce', 'mse'])
def test_one_layer_estimate_equals_the_full_estimator(loss):
    """Measuring at ψ0 + Δ with a zero one-layer Δ changes nothing."""
    from dlcft_jax.models.small_cnn import init_small

    apply_fn, params0 = init_small(jax.random.key(1), (4, 8, 8, 3))
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    delta, _ = lin.split(params0)
    delta = jax.tree.map(
        lambda d: 0.1 * jax.random.normal(jax.random.key(3), d.shape), delta
    )
    head = {
        'kernel': jax.random.normal(jax.random.key(4), (6, 5)),
        'bias': jnp.zeros(5),
    }
    rng = jax.random.key(5)
    full = curv_lib.batch_curvature(
        apply_fn, params0, delta, head, x, rng, linearized=False, loss=loss
    )
    order = cs.layer_order(apply_fn, params0, delta, x)
    assert order == ['conv', 'dw', 'pw', 'fc']
    point = lin.shift(params0, delta)
    for key in ('dw', 'fc'):
        one = cs.make_measure(apply_fn, loss)(
            point, cs.layer_delta(delta, key), head, x, rng
        )
        assert list(one['layers']) == [key]
        for f in ('A', 'S'):
            np.testing.assert_allclose(
                one['layers'][key][f],
                full['layers'][key][f],
                rtol=1e-5,
                atol=1e-6,
            )
            np.testing.assert_allclose(
                one['head'][f], full['head'][f], rtol=1e-5, atol=1e-6
            )
    with pytest.raises(ValueError, match='not a trainable'):
        cs.layer_delta(delta, 'bn')


def test_cli_small_cnn_writes_json_png_and_table(tmp_path, npz_dir, run_module):
    out = tmp_path / 'spectrum'
    proc = run_module(
        'experiments.curvature_spectrum',
        '--backbone=small_cnn',
        '--image_size=16',
        f'--npz_dir={npz_dir}',
        '--steps=24',
        '--every=8',
        '--batch_size=16',
        '--curvature_batches=2',
        '--top_k=4',
        f'--out={out}',
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / 'spectrum.json').read_text())
    assert result['flags']['backbone'] == 'small_cnn'
    assert result['flags']['learning_rate'] == 1e-4
    assert result['num_classes'] == 4  # the 4-class slice
    assert result['layer'] == 'fc'  # small_cnn's last layer
    assert set(result['losses']) == {'sce', 'mse'}
    for name, run in result['losses'].items():
        assert run['loss'] == name and run['layer'] == 'fc'
        assert run['steps'] == [0, 8, 16, 24]
        for key in cs.RECORD_KEYS:
            assert len(run[key]) == 4, key
        assert all(len(t) == 4 for t in run['head_top_k'] + run['layer_top_k'])
        assert all(v > 0 for v in run['head_trace'] + run['layer_trace'])
        np.testing.assert_allclose(
            run['head_trace'],
            np.multiply(run['head_trace_A'], run['head_trace_S']),
            rtol=1e-12,
        )
    # At step 0 both runs are the same network and head, measured on the
    # same images: tr A agrees; S differs by the loss (C for MSE, < 1 for SCE).
    sce, mse = result['losses']['sce'], result['losses']['mse']
    assert sce['head_trace_A'][0] == mse['head_trace_A'][0]
    assert sce['layer_trace_A'][0] == mse['layer_trace_A'][0]
    assert mse['head_trace_S'] == [4.0] * 4
    assert 0 < sce['head_trace_S'][0] < 1
    np.testing.assert_allclose(mse['train_loss'][0], 112.5, rtol=0.05)
    png = (out / 'spectrum.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    # The printed table: first and last trace and their ratio per block.
    lines = proc.stdout.splitlines()
    head = next(line for line in lines if line.startswith('loss'))
    assert 'trace @ step 0' in head and 'trace @ step 24' in head
    row = next(
        line for line in lines if line.startswith('SCE') and ' head ' in line
    )
    first, last, ratio = row.split()[2:5]
    np.testing.assert_allclose(float(first), sce['head_trace'][0], rtol=1e-4)
    np.testing.assert_allclose(float(last), sce['head_trace'][-1], rtol=1e-4)
    np.testing.assert_allclose(
        float(ratio), float(last) / float(first), rtol=1e-3
    )
    assert any(line.startswith('MSE') and ' fc ' in line for line in lines)
