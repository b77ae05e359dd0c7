"""Fast depthwise 2-D convolution for CPU (shift-and-sum).

XLA's CPU backend lowers ``conv_general_dilated(..., feature_group_count=C)``
to a slow generic grouped convolution. A depthwise convolution is just a
per-channel weighted sum of ``kh * kw`` shifted (and, for stride > 1, strided)
views of the padded input, which XLA fuses into a single elementwise loop.

``depthwise_conv`` is bilinear in ``(x, kernel)`` and is written with plain
``lax.pad``/``lax.slice``/multiply/add, so forward mode (``jax.jvp``), reverse
mode (``jax.vjp``/``jax.grad``) and reverse-of-forward (grad of a function
that calls ``jax.jvp``) all come from JAX's own rules, and higher-order
derivatives keep working. A ``jax.custom_jvp`` is unnecessary: JAX's product
rule for the per-tap multiply already yields the bilinear rule
``dw(x_dot, k) + dw(x, k_dot)``. In reverse mode the transposes of the strided
slices are (interior-)pads that XLA fuses into one loop for the input
cotangent; the kernel cotangent is ``kh * kw`` per-channel reductions and
dominates the backward time. Hand-written alternatives for the backward pass
were measured and were not faster on this CPU: one reduction over the stacked
taps (2-3x slower), an einsum over stacked taps (2-3x slower), and a
space-to-depth (phase) formulation for stride 2 (no gain). A custom_vjp would
also break ``jax.jvp``, which the linearised network needs.

Measured on the 2-core development CPU (jax 0.10.2, float32, batch 32, jitted,
median of 5 runs, TF-SAME padding; ``xla`` = ``lax.conv_general_dilated``
with ``feature_group_count=C``; ``jvp`` = primal and tangent for tangents in
both x and kernel; ``vjp`` = forward plus cotangents for x and kernel)::

    H=W  C   k s | forward shift/xla | jvp shift/xla   | vjp shift/xla
    32   96  3 1 |  16.3 /  98.4 ms  |  30.5 / 107.5 ms | 65.0 /  345.2 ms
    32  144  3 2 |   3.4 /  39.7 ms  |   5.1 /  40.1 ms | 39.2 /  386.7 ms
    16  240  5 1 |   3.3 /  94.0 ms  |   9.0 /  95.0 ms | 103.4 / 490.5 ms
    16  672  5 2 |   4.9 /  91.3 ms  |   6.7 /  91.8 ms | 126.4 / 1201.1 ms
    16  480  3 1 |   4.1 / 124.3 ms  |  14.2 / 139.2 ms | 105.8 / 796.6 ms

The machine was shared with other jobs (load average about 2), so absolute
times are noisy; a second run under heavier load gave the same picture
(shift faster by 6-30x forward, 4-14x jvp, 6-11x vjp). Reproduce with
``python -c "from dlcft_jax.models import depthwise; depthwise._benchmark()"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]


def _check_args(x: jax.Array, kernel: jax.Array) -> None:
    """Validates the NHWC input and (kh, kw, 1, C) kernel shapes."""
    if x.ndim != 4:
        raise ValueError(
            f'depthwise_conv expects NHWC input, got shape {x.shape}'
        )
    c = x.shape[3]
    if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != c:
        raise ValueError(
            f'depthwise kernel must have shape (kh, kw, 1, C={c}), '
            f'got {kernel.shape}'
        )


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
) -> jax.Array:
    """Depthwise 2-D cross-correlation computed as a sum of shifted slices.

    Same result as ``lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=C)``.

    Args:
        x: Input of shape (N, H, W, C).
        kernel: Per-channel filters of shape (kh, kw, 1, C) (Flax HWIO depthwise
            layout).
        strides: (sh, sw) strides.
        padding: Explicit zero padding ((top, bottom), (left, right)).

    Returns:
        Output of shape (N, Ho, Wo, C) with
        Ho = (H + top + bottom - kh) // sh + 1 (same for W).
    """
    _check_args(x, kernel)
    sh, sw = (int(s) for s in strides)
    (pt, pb), (pl, pr) = ((int(a), int(b)) for a, b in padding)
    kh, kw = kernel.shape[0], kernel.shape[1]
    n, h, w, c = x.shape
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(
            f'empty output: input {x.shape}, kernel {kernel.shape}, '
            f'strides {(sh, sw)}, padding {padding}'
        )
    # lax.pad also accepts negative padding (cropping), which keeps the slice
    # bounds below simple for any explicit padding.
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(x, zero, ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    k = kernel[:, :, 0, :].astype(jnp.result_type(x, kernel))
    out = None
    for a in range(kh):
        for b in range(kw):
            tap = lax.slice(
                xp,
                (0, a, b, 0),
                (n, a + (ho - 1) * sh + 1, b + (wo - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            term = tap * k[a, b]
            out = term if out is None else out + term
    return out


def depthwise_conv_xla(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Padding = ((0, 0), (0, 0)),
) -> jax.Array:
    """Reference depthwise convolution via XLA's grouped convolution.

    Args:
        x: Input of shape (N, H, W, C).
        kernel: Filters of shape (kh, kw, 1, C).
        strides: (sh, sw) strides.
        padding: Explicit zero padding ((top, bottom), (left, right)).

    Returns:
        Output of shape (N, Ho, Wo, C).
    """
    _check_args(x, kernel)
    return lax.conv_general_dilated(
        x,
        kernel.astype(jnp.result_type(x, kernel)),
        window_strides=tuple(int(s) for s in strides),
        padding=tuple((int(a), int(b)) for a, b in padding),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=x.shape[-1],
    )


def same_padding(
    in_size: Sequence[int], kernel_size: Sequence[int], strides: Sequence[int]
) -> Padding:
    """Static TensorFlow "SAME" padding for one input size.

    The output has ceil(in / stride) pixels per axis; when the total padding
    is odd the extra pixel goes to the bottom/right (as in TensorFlow).

    Args:
        in_size: (H, W) of the input.
        kernel_size: (kh, kw).
        strides: (sh, sw).

    Returns:
        ((top, bottom), (left, right)).
    """
    pads = []
    for i, k, s in zip(in_size, kernel_size, strides, strict=True):
        o = -(-i // s)
        total = max((o - 1) * s + k - i, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)  # type: ignore[return-value]


class DepthwiseConv2D(nn.Module):
    """Depthwise 2-D convolution (no bias) with explicit padding.

    The attributes ``kernel_size``, ``strides`` and ``padding`` are plain
    explicit tuples so that code intercepting the call (e.g. a K-FAC curvature
    estimator using ``flax.linen.intercept_methods``) can rebuild the input
    patches from the module's input.

    Attributes:
        features: Number of channels C (must equal the input's channel count).
        kernel_size: (kh, kw).
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)) explicit zero padding.
        impl: 'shift' (shift-and-sum, fast on CPU) or 'xla' (grouped conv).
        kernel_init: Initializer for the (kh, kw, 1, C) kernel.
        dtype: Optional computation dtype.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    impl: str = 'shift'
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the depthwise convolution.

        Args:
            x: Input of shape (N, H, W, features).

        Returns:
            Output of shape (N, Ho, Wo, features).
        """
        if x.shape[-1] != self.features:
            raise ValueError(
                f'DepthwiseConv2D expects {self.features} input channels, '
                f'got {x.shape[-1]}'
            )
        kernel = self.param(
            'kernel',
            self.kernel_init,
            (self.kernel_size[0], self.kernel_size[1], 1, self.features),
        )
        if self.dtype is not None:
            x = x.astype(self.dtype)
            kernel = kernel.astype(self.dtype)
        if self.impl == 'shift':
            fn = depthwise_conv
        elif self.impl == 'xla':
            fn = depthwise_conv_xla
        else:
            raise ValueError(
                f"impl must be 'shift' or 'xla', got {self.impl!r}"
            )
        return fn(x, kernel, self.strides, self.padding)


def _benchmark() -> None:
    """Prints forward / jvp / vjp timings of shift-and-sum vs XLA."""
    import time  # pylint: disable=g-import-not-at-top

    import numpy as np  # pylint: disable=g-import-not-at-top

    def timeit(f, *args):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    configs = [
        (32, 96, 3, 1),
        (32, 144, 3, 2),
        (16, 240, 5, 1),
        (16, 672, 5, 2),
        (16, 480, 3, 1),
    ]
    print(
        'H=W  C    k s | forward shift/xla | jvp shift/xla    | vjp shift/xla'
    )
    for hw, c, k, s in configs:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((32, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
        pad = same_padding((hw, hw), (k, k), (s, s))
        row = []
        for fn in (depthwise_conv, depthwise_conv_xla):

            def f(x_, w_, fn=fn, s=s, pad=pad):
                return fn(x_, w_, (s, s), pad)

            fwd = jax.jit(f)
            jvp = jax.jit(lambda x_, w_, f=f: jax.jvp(f, (x_, w_), (x_, w_)))

            def vjp(x_, w_, f=f):
                y, pull = jax.vjp(f, x_, w_)
                return pull(y)

            row.append(
                (
                    timeit(fwd, x, w),
                    timeit(jax.jit(jvp), x, w),
                    timeit(jax.jit(vjp), x, w),
                )
            )
        (f1, j1, v1), (f2, j2, v2) = row
        print(
            f'{hw:<4} {c:<4} {k} {s} | {f1:5.1f} / {f2:6.1f} ms | '
            f'{j1:5.1f} / {j2:6.1f} ms | {v1:5.1f} / {v2:6.1f} ms'
        )


if __name__ == '__main__':
    _benchmark()
