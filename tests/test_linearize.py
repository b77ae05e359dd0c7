"""The linearized network: value at ψ0, exact linearity, jvp vs finite
differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dlcft_jax import linearization as lin
from dlcft_jax.models.small_cnn import init_small


def _setup(seed=0, impl='xla'):
    apply_fn, v = init_small(jax.random.key(seed), depthwise_impl=impl)
    x = jax.random.normal(jax.random.key(seed + 10), (4, 8, 8, 3))
    return apply_fn, v, x


def _random_like(tree, seed, scale=0.1):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            scale * jax.random.normal(k, leaf.shape, leaf.dtype)
            for k, leaf in zip(keys, leaves, strict=True)
        ],
    )


def _add(a, b, s=1.0):
    return jax.tree.map(lambda u, w: u + s * w, a, b)


def test_default_trainable_selects_conv_and_dense_weights_only():
    _, v, _ = _setup()
    train, frozen = lin.split(v)
    flat = {'/'.join(k) for k in traverse_util.flatten_dict(train)}
    assert flat == {
        'params/conv/kernel',
        'params/dw/kernel',
        'params/pw/kernel',
        'params/pw/bias',
        'params/fc/kernel',
        'params/fc/bias',
    }
    fro = {'/'.join(k) for k in traverse_util.flatten_dict(frozen)}
    assert 'params/bn/scale' in fro and 'params/bn/bias' in fro
    assert 'batch_stats/bn/mean' in fro
    assert lin.merge(train, frozen).keys() == v.keys()


@pytest.mark.parametrize('impl', ['xla', 'shift'])
def test_f_lin_at_params0_equals_f(impl):
    with jax.enable_x64(True):
        apply_fn, v, x = _setup(impl=impl)
        v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
        x = x.astype(jnp.float64)
        f_lin = lin.linearize(apply_fn, v)
        np.testing.assert_allclose(
            f_lin(v, x), apply_fn(v, x), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize('grad_mode', ['vjp', 'jvp'])
def test_f_lin_is_exactly_linear_in_params(grad_mode):
    with jax.enable_x64(True):
        apply_fn, v, x = _setup()
        v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
        x = x.astype(jnp.float64)
        train0, _ = lin.split(v)
        d1, d2 = _random_like(train0, 1), _random_like(train0, 2)
        f0 = apply_fn(v, x)

        def f(d):
            return (
                lin.tangent_apply(apply_fn, v, d, x, grad_mode=grad_mode) - f0
            )

        a, b = 0.7, -2.3
        combo = jax.tree.map(lambda p, q: a * p + b * q, d1, d2)
        np.testing.assert_allclose(
            f(combo), a * f(d1) + b * f(d2), rtol=1e-10, atol=1e-12
        )
        # Frozen leaves (BN) of `params` are ignored: they stay at ψ0.
        f_lin = lin.linearize(apply_fn, v)
        moved = jax.tree_util.tree_map_with_path(
            lambda p, leaf: (
                leaf + 1.0 if 'bn' in jax.tree_util.keystr(p) else leaf
            ),
            v,
        )
        np.testing.assert_allclose(f_lin(moved, x), f0, atol=1e-12)


def test_jvp_matches_finite_differences():
    with jax.enable_x64(True):
        apply_fn, v, x = _setup()
        v = jax.tree.map(lambda a: a.astype(jnp.float64), v)
        x = x.astype(jnp.float64)
        train0, frozen = lin.split(v)
        d = _random_like(train0, 3)
        tangent = lin.tangent_apply(apply_fn, v, d, x) - apply_fn(v, x)
        h = 1e-6

        def f_at(s):
            return apply_fn(lin.merge(_add(train0, d, s), frozen), x)

        fd = (f_at(h) - f_at(-h)) / (2 * h)
        np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-8)


def test_vjp_gradient_equals_autodiff_through_jvp():
    apply_fn, v, x = _setup()
    train0, _ = lin.split(v)
    d = _random_like(train0, 4)
    target = jax.random.normal(jax.random.key(5), (4, 6))

    def loss(delta, mode):
        out = lin.tangent_apply(apply_fn, v, delta, x, grad_mode=mode)
        return 0.5 * jnp.sum(jnp.square(out - target))

    g_vjp = jax.grad(loss)(d, 'vjp')
    g_jvp = jax.grad(loss)(d, 'jvp')
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        g_vjp,
        g_jvp,
    )


def test_shifted_apply_is_the_nonlinear_network():
    apply_fn, v, x = _setup()
    train0, frozen = lin.split(v)
    d = _random_like(train0, 6)
    np.testing.assert_allclose(
        lin.shifted_apply(apply_fn, v, d, x),
        apply_fn(lin.merge(_add(train0, d), frozen), x),
        rtol=1e-6,
        atol=1e-6,
    )


def test_bad_trainable_argument_is_explained():
    _, v, _ = _setup()
    with pytest.raises(ValueError, match='trainable'):
        lin.split(v, trainable='conv-only')
