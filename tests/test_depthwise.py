"""Tests for the shift-and-sum depthwise convolution.

The shift-and-sum implementation must agree with XLA's grouped convolution
in value, forward-mode derivative (jvp), reverse-mode derivative (vjp) and
reverse-of-forward (grad of a function calling jax.jvp). The comparisons run
in float64 so the tolerance can be tight (1e-10).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dlcft_jax.models.depthwise import (
    DepthwiseConv2D,
    depthwise_conv,
    depthwise_conv_xla,
    same_padding,
)

_TOL = dict(rtol=1e-10, atol=1e-10)

# (H, W, C, kernel, strides, padding or None for TF-SAME).
_CASES = [
    (8, 8, 3, (3, 3), (1, 1), None),
    (8, 8, 4, (3, 3), (2, 2), None),  # even size, stride 2: pad (0, 1)
    (7, 9, 5, (3, 3), (2, 2), None),  # odd sizes, stride 2
    (9, 8, 2, (5, 5), (2, 2), None),
    (7, 7, 3, (5, 5), (1, 1), None),
    (6, 7, 3, (2, 4), (1, 2), None),  # even / non-square kernel
    (8, 8, 3, (3, 3), (1, 1), ((0, 0), (0, 0))),  # VALID
    (8, 7, 2, (3, 3), (2, 2), ((2, 0), (1, 3))),  # arbitrary asymmetric
    (5, 5, 2, (3, 3), (3, 3), ((1, 1), (1, 1))),  # stride 3
]


def _inputs(h, w, c, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float64)
    k = jnp.asarray(rng.standard_normal(kernel + (1, c)), jnp.float64)
    return x, k, rng


def _padding(h, w, kernel, strides, padding):
    return same_padding((h, w), kernel, strides) if padding is None else padding


@pytest.mark.parametrize('h,w,c,kernel,strides,padding', _CASES)
def test_matches_xla_value_jvp_vjp(x64, h, w, c, kernel, strides, padding):
    del x64
    x, k, rng = _inputs(h, w, c, kernel)
    pad = _padding(h, w, kernel, strides, padding)

    def shift(a, b):
        return depthwise_conv(a, b, strides, pad)

    def ref(a, b):
        return depthwise_conv_xla(a, b, strides, pad)

    # One jitted program per check keeps the (cold-cache) test time low.
    y = jax.jit(shift)(x, k)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, ref(x, k), **_TOL)

    x_dot = jnp.asarray(rng.standard_normal(x.shape))
    k_dot = jnp.asarray(rng.standard_normal(k.shape))

    def jvp(f):  # (x, k, x_dot, k_dot) -> the tangent of f
        return jax.jit(lambda *a: jax.jvp(f, a[:2], a[2:])[1])

    np.testing.assert_allclose(
        jvp(shift)(x, k, x_dot, k_dot), jvp(ref)(x, k, x_dot, k_dot), **_TOL
    )

    g = jnp.asarray(rng.standard_normal(y.shape))

    def vjp(f):  # (x, k, cotangent) -> the cotangents of x and k
        return jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))

    for got, want in zip(vjp(shift)(x, k, g), vjp(ref)(x, k, g), strict=True):
        np.testing.assert_allclose(got, want, **_TOL)


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_grad_of_jvp_matches_xla(x64, strides):
    """Reverse mode through a linearisation (jvp, then transpose)."""
    del x64
    x, k, rng = _inputs(7, 8, 3, (3, 3))
    pad = same_padding((7, 8), (3, 3), strides)
    x_dot = jnp.asarray(rng.standard_normal(x.shape))

    k_dir = jnp.asarray(rng.standard_normal(k.shape))

    def loss(fn, inputs, kernel, direction):
        # A linearised model's output, as in tangent-kernel fine-tuning:
        # f(x, k) + J f(x, k) . (x_dot, direction).
        out, tangent = jax.jvp(
            lambda a, b: fn(a, b, strides, pad),
            (inputs, kernel),
            (x_dot, direction),
        )
        return jnp.sum(jnp.tanh(out + tangent))

    argnums = (1, 2, 3)  # inputs, kernel and the tangent direction
    grad = jax.jit(jax.grad(loss, argnums), static_argnums=0)
    got = grad(depthwise_conv, x, k, k_dir)
    want = grad(depthwise_conv_xla, x, k, k_dir)
    for g_shift, g_xla in zip(got, want, strict=True):
        np.testing.assert_allclose(g_shift, g_xla, **_TOL)


def test_jit_float32_close_to_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 96)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((5, 5, 1, 96)), jnp.float32)
    pad = same_padding((16, 16), (5, 5), (2, 2))
    got = jax.jit(depthwise_conv, static_argnums=(2, 3))(x, k, (2, 2), pad)
    want = depthwise_conv_xla(x, k, (2, 2), pad)
    assert got.shape == (4, 8, 8, 96)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_same_padding_matches_lax_same():
    for size in (7, 8, 15, 16, 224):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                want = lax.padtype_to_pads((size, size), (k, k), (s, s), 'SAME')
                got = same_padding((size, size), (k, k), (s, s))
                assert [tuple(p) for p in want] == list(got), (size, k, s)
    # TF-SAME puts the odd pixel at the bottom/right.
    assert same_padding((224, 224), (3, 3), (2, 2)) == ((0, 1), (0, 1))
    assert same_padding((7, 7), (3, 3), (2, 2)) == ((1, 1), (1, 1))


def test_module_param_and_attributes():
    pad = ((0, 1), (1, 1))
    layer = DepthwiseConv2D(
        features=6, kernel_size=(3, 3), strides=(2, 1), padding=pad
    )
    x = jnp.asarray(
        np.random.default_rng(2).standard_normal((2, 8, 8, 6)), jnp.float32
    )
    variables = layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, variables) == {
        'params': {'kernel': (3, 3, 1, 6)}
    }
    y = layer.apply(variables, x)
    y_xla = layer.clone(impl='xla').apply(variables, x)
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
    assert y.shape == (2, 4, 8, 6)

    # An interceptor (as a K-FAC estimator would use) sees explicit
    # geometry and the module input.
    seen = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, DepthwiseConv2D):
            seen.append(
                (
                    module.kernel_size,
                    module.strides,
                    module.padding,
                    args[0].shape,
                )
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        layer.apply(variables, x)
    assert seen == [((3, 3), (2, 1), pad, (2, 8, 8, 6))]


def test_bad_arguments_raise():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match='kernel'):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 4)))
    with pytest.raises(ValueError, match='empty output'):
        depthwise_conv(x, jnp.zeros((5, 5, 1, 3)))
    with pytest.raises(ValueError, match='impl'):
        DepthwiseConv2D(3, impl='fft').init(jax.random.key(0), x)
