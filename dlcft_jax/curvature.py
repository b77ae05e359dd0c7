"""Curvature of past tasks: exact head block, K-FAC of the linearized backbone.

Model: f(x) = W̄ᵀ z̄, z̄ = [z; 1], z = g_lin(x; ψ), MSE loss (docs/method.md
§2.1, §2.4).

Head (docs/method.md §5.7). The Hessian of the MSE loss with respect to the
head W̄ = [W; b] is exactly

    H_head = E[z̄ z̄ᵀ] ⊗ I_C,

independent of the labels and of the output row: every row, also the rows of
classes that the data never shows, has the same curvature. It is stored as
A_head = E[z̄ z̄ᵀ] (shape (D+1, D+1)) and S_head = I. When the head grows, the
new rows share A_head and are anchored at 0. With cross-entropy the output
Hessian is not I, and S_head is estimated like any other layer's.

Backbone (docs/method.md §5.1-5.4): K-FAC of the *linearized* model. For a
layer with primal input a (im2col patches for a convolution, with a trailing
1 when the layer has a bias) and g = ∂ℓ/∂(tangent output of the layer),

    A = E_{n,t}[a aᵀ]              mean over examples n and positions t,
    S = E_n[Σ_t g gᵀ]              sum over positions, mean over examples,
    F ≈ A ⊗ S                      (Grosse & Martens' KFC for convolutions).

In the linearized network a layer's tangent output is W0·ȧ + Δ·a, so the
gradient with respect to Δ pairs g with the *primal* input a of the
pre-trained network, and g propagates through Jacobians evaluated at ψ0 only:
both factors are those of the pre-trained network at ψ0, with the current head.
The loss is ℓ = ½‖f − ỹ‖² with pseudo-targets ỹ ~ N(f, I) drawn from the
model's predictive distribution, so ∂ℓ/∂f = −ε, ε ~ N(0, I), and E[S] is the
exact Gauss–Newton (= Fisher) factor; for cross-entropy ỹ ~ softmax(f).

Depthwise convolutions. Channel c has its own k·k filter w_c acting on the
k·k patch a_c of its own input channel, and its output g_c. Its Fisher is
block-diagonal over channels, and K-FAC of each block is

    F_c ≈ S_c · A_c,   A_c = E_{n,t}[a_c a_cᵀ] (k²×k²),  S_c = E_n[Σ_t g_c²],

stored as A (C, k², k²) and S (C,). Treating the layer as a dense conv with a
(C·k²)×(C·k²) A and a C×C S would put curvature on the zero off-diagonal
filters and mix channels; the per-channel form does neither. A depthwise bias
b_c belongs to channel c's block: a_c gets a trailing 1 and A becomes
(C, k²+1, k²+1).

Trace-restricted K-FAC (Gao et al., 2020) rescales each layer's A ⊗ S by
tr(F)/(tr A · tr S), with tr F = E_n‖∂ℓ_n/∂Δ‖² the exact per-example trace.
For a convolution that is E_n‖Σ_t g_t a_tᵀ‖², cross-position terms included;
the authors' code used E[‖a‖²‖g‖²] per position instead, which agrees for
dense layers only, so trace-restricted numbers on conv nets can differ.

Why not kfac-jax: its layer tags expect to see the loss and the parameters in
one forward pass, while DLCFT needs the statistics of a *linearized* network
(primal activations at ψ0, tangent gradients), a head that is kept exact and
grows, and depthwise layers written as a shift-and-sum. Doing it here takes a
method interceptor (`flax.linen.intercept_methods`) and a few einsums, and
works for any Flax Linen backbone built from `nn.Dense`, `nn.Conv` (plain or
depthwise) and `dlcft_jax.models.DepthwiseConv2D`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dlcft_jax import linearization as lin
from dlcft_jax.losses import masked_logits

Params = Any
Curvature = dict  # {'layers': {key: {'A','S','trace'}}, 'head': {'A','S'}}


class LayerSpec(NamedTuple):
    """What the estimator needs to know about one regularized layer."""

    kind: str  # 'dense' | 'conv' | 'depthwise'
    kernel_size: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: Any = 'VALID'
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(i) for i in v)


def _padding(p: Any, n: int) -> Any:
    if isinstance(p, str):
        if p.upper() in ('SAME', 'VALID'):
            return p.upper()
        raise ValueError(
            f'K-FAC does not support conv padding {p!r}; use SAME, '
            'VALID or explicit pairs.'
        )
    if isinstance(p, int):
        return ((p, p),) * n
    out = []
    for q in p:
        out.append((q, q) if isinstance(q, int) else (int(q[0]), int(q[1])))
    return tuple(out)


def layer_spec(module: nn.Module, x: jax.Array) -> LayerSpec | None:
    """The `LayerSpec` of a supported module called on input x, else None."""
    from dlcft_jax.models.depthwise import DepthwiseConv2D  # pylint: disable=g-import-not-at-top

    if isinstance(module, DepthwiseConv2D):
        n = len(module.kernel_size)
        return LayerSpec(
            'depthwise',
            tuple(module.kernel_size),
            _tuple(module.strides, n),
            _padding(module.padding, n),
            (1,) * n,
            (1,) * n,
        )
    if isinstance(module, nn.Dense):
        return LayerSpec('dense')
    if isinstance(module, nn.Conv):
        n = len(module.kernel_size)
        if x.ndim != n + 2:
            raise ValueError(
                f'K-FAC expects batched NHWC inputs to conv '
                f'{"/".join(module.path)}, got shape {x.shape}.'
            )
        groups = module.feature_group_count
        if groups == 1:
            kind = 'conv'
        elif groups == x.shape[-1] and module.features == x.shape[-1]:
            kind = 'depthwise'
        else:
            raise ValueError(
                f'Layer {"/".join(module.path)}: grouped convolutions other '
                'than depthwise (feature_group_count == in == out channels) '
                'are not supported by the K-FAC estimator; freeze the layer.'
            )
        return LayerSpec(
            kind,
            tuple(module.kernel_size),
            _tuple(module.strides, n),
            _padding(module.padding, n),
            _tuple(module.input_dilation, n),
            _tuple(module.kernel_dilation, n),
        )
    return None


def regularized_layers(delta: Params) -> dict[str, tuple[bool, tuple]]:
    """Maps each trainable layer's module key to (has_bias, kernel path)."""
    flat = traverse_util.flatten_dict(dict(delta))
    out = {}
    for path in flat:
        if path[-1] == 'kernel':
            mpath = path[1:-1] if path[0] == 'params' else path[:-1]
            out['/'.join(mpath)] = (path[:-1] + ('bias',) in flat, path[:-1])
    return out


def tapped_apply(
    apply_fn: lin.ApplyFn,
    params: Params,
    x: jax.Array,
    keys: Iterable[str],
    taps: Mapping[str, jax.Array] | None = None,
):
    """Runs `apply_fn` and records each listed layer's input and output.

    Args:
      apply_fn: `apply_fn(params, x)` built from Flax Linen modules.
      params: the variables to evaluate at.
      x: the inputs.
      keys: module keys ('/'-joined module paths) of the layers to record.
      taps: optional {key: array} added to each layer's output, so that the
        gradient with respect to a tap is the gradient with respect to that
        layer's output.

    Returns:
      (output, inputs, outputs, specs): `inputs`/`outputs` map keys to arrays,
      `specs` maps keys to `LayerSpec`.
    """
    keys = set(keys)
    inputs, outputs, specs = {}, {}, {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        key = '/'.join(module.path) if module.path else ''
        if context.method_name != '__call__' or key not in keys:
            return next_fun(*args, **kwargs)
        if key in inputs:
            raise ValueError(
                f'Layer {key} is called twice in one forward pass; '
                'K-FAC here needs each regularized layer used once.'
            )
        spec = layer_spec(module, args[0])
        if spec is None:
            raise ValueError(
                f'Trainable layer {key} ({type(module).__name__}) is not one '
                'K-FAC supports (nn.Dense, nn.Conv, DepthwiseConv2D); freeze '
                "it (create_state's trainable=) or use a diagonal regularizer "
                "(Penalty('ewc') or Penalty('mas'))."
            )
        y = next_fun(*args, **kwargs)
        if taps is not None:
            y = y + taps[key]
        inputs[key], outputs[key], specs[key] = args[0], y, spec
        return y

    with nn.intercept_methods(interceptor):
        out = apply_fn(params, x)
    missing = keys - set(inputs)
    if missing:
        raise ValueError(
            'These trainable layers were not seen in the forward '
            f'pass: {sorted(missing)[:5]}.'
        )
    return out, inputs, outputs, specs


def patches(x: jax.Array, spec: LayerSpec) -> jax.Array:
    """im2col patches of a conv input, shape (B, positions, C_in·kh·kw).

    The feature order is (C_in, kh, kw), which matches the kernel flattening
    `kernel.transpose(2, 0, 1, 3).reshape(-1, C_out)` of an HWIO kernel (see
    `kernel_matrix`). A 1×1 stride-1 convolution needs no copy.
    """
    b = x.shape[0]
    unit = (
        all(k == 1 for k in spec.kernel_size)
        and all(s == 1 for s in spec.strides)
        and all(d == 1 for d in spec.input_dilation)
        and (
            spec.padding == 'VALID'
            or spec.padding == 'SAME'
            or all(p == (0, 0) for p in spec.padding)
        )
    )
    if unit:
        return x.reshape(b, -1, x.shape[-1])
    p = jax.lax.conv_general_dilated_patches(
        x,
        spec.kernel_size,
        spec.strides,
        spec.padding,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return p.reshape(b, -1, p.shape[-1])


def kernel_matrix(
    kernel: jax.Array, bias: jax.Array | None, kind: str
) -> jax.Array:
    """The kernel as the matrix that K-FAC factors act on.

    dense (in, out) and conv HWIO (kh, kw, in, out) kernels become
    (in·kh·kw [+1], out) with the bias as the last row; depthwise kernels
    (kh, kw, 1, C) become (C, kh·kw [+1]) with the bias as the last column.
    """
    if kind == 'depthwise':
        kh, kw, _, c = kernel.shape
        mat = kernel.reshape(kh * kw, c).T
        if bias is not None:
            mat = jnp.concatenate([mat, bias[:, None]], axis=1)
        return mat
    if kernel.ndim > 2:
        kernel = jnp.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])
    if bias is not None:
        kernel = jnp.concatenate([kernel, bias[None, :]], axis=0)
    return kernel


def _with_ones(a: jax.Array) -> jax.Array:
    """Appends a 1 to the last axis: the input that multiplies a bias."""
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1)


def _example_weights(b: int, weights: jax.Array | None, dtype) -> jax.Array:
    """(B,) example weights (ones when None) and their sum, at least 1e-12."""
    w = jnp.ones((b,), dtype) if weights is None else weights.astype(dtype)
    return w, jnp.maximum(jnp.sum(w), 1e-12)


def _per_example_trace(
    a: jax.Array, g: jax.Array, w: jax.Array, norm: jax.Array
) -> jax.Array:
    """Σ_n w_n ‖Σ_t g_{n,t} a_{n,t}ᵀ‖² / Σ w, by the cheaper of two exact
    forms; a depthwise layer (a: (B, T, C, k), g: (B, T, C)) sums one such
    term per channel."""
    t, p, o = a.shape[1], a.shape[-1], g.shape[-1]
    if a.ndim == 4:
        grad = jnp.einsum('btck,btc->bck', a, g)
        per = jnp.sum(jnp.square(grad), axis=(1, 2))
    elif p * o <= t * t:
        grad = jnp.einsum('btp,bto->bpo', a, g)
        per = jnp.sum(jnp.square(grad), axis=(1, 2))
    else:
        ga = jnp.einsum('btp,bsp->bts', a, a)
        gg = jnp.einsum('bto,bso->bts', g, g)
        per = jnp.sum(ga * gg, axis=(1, 2))
    return jnp.sum(w * per) / norm


def layer_factors(
    spec: LayerSpec,
    x: jax.Array,
    g: jax.Array,
    has_bias: bool,
    with_trace: bool = True,
    weights: jax.Array | None = None,
) -> dict:
    """K-FAC factors of one layer from its input and output gradient.

    Args:
      spec: the layer's `LayerSpec`.
      x: the primal input of the layer, (B, ..., C_in).
      g: per-example gradients with respect to the layer's output (the
        pseudo-loss is summed over the batch), (B, ..., C_out).
      has_bias: whether the layer's bias is regularized (appends a 1 to a).
      with_trace: also compute the exact per-example Fisher trace (needed only
        by trace-restricted K-FAC; it costs a per-example gradient).
      weights: optional (B,) example weights (0 for padding rows): every
        expectation over examples becomes Σ_n w_n (·) / Σ_n w_n.

    Returns:
      {'A', 'S'[, 'trace']} for this batch (see the module docstring).
    """
    b = x.shape[0]
    if spec.kind == 'dense':
        a = x.reshape(b, -1, x.shape[-1])
    else:
        a = patches(x, spec)
    gm = g.reshape(b, -1, g.shape[-1])
    t = a.shape[1]
    w, norm = _example_weights(b, weights, a.dtype)
    if spec.kind == 'depthwise':
        # One (k, k) factor A_c and one number S_c per channel c.
        a = a.reshape(b, t, gm.shape[-1], -1)
        a_sub, s_sub = 'b,btck,btcl->ckl', 'b,btc,btc->c'
    else:
        a_sub, s_sub = 'b,btp,btq->pq', 'b,bto,btp->op'
    if has_bias:
        a = _with_ones(a)
    out = {
        'A': jnp.einsum(a_sub, w, a, a) / (norm * t),
        'S': jnp.einsum(s_sub, w, gm, gm) / norm,
    }
    if with_trace:
        out['trace'] = _per_example_trace(a, gm, w, norm)
    return out


def head_factor(z: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """A_head = E[z̄ z̄ᵀ] with z̄ = [z; 1]; the head Hessian is A_head ⊗ I.

    Args:
      z: (B, D) features entering the head.
      weights: optional (B,) example weights (0 for padding rows).

    Returns:
      (D+1, D+1) second moment of the augmented features.
    """
    zb = _with_ones(z)
    if weights is None:
        return zb.T @ zb / z.shape[0]
    return (zb * weights[:, None]).T @ zb / jnp.maximum(jnp.sum(weights), 1e-12)


def pseudo_residual(
    logits: jax.Array,
    rng: jax.Array,
    loss: str,
    class_mask: jax.Array | None,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """∂ℓ/∂f for pseudo-targets drawn from the model's predictive distribution.

    MSE: ỹ ~ N(f, I), so f − ỹ = −ε with ε ~ N(0, I) (the sign does not matter
    for second moments). Cross-entropy: ỹ ~ softmax(f), so
    ∂ℓ/∂f = p − onehot(ỹ).
    Inactive outputs (class_mask 0) are not part of the loss and get 0.

    Row i draws from `fold_in(rng, offset + i)`, so with `offset` the global
    index of the first row a batch split over devices draws the same targets
    as the whole batch on one device.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
        offset + jnp.arange(logits.shape[0])
    )
    if loss == 'mse':
        r = jax.vmap(
            lambda k: jax.random.normal(k, logits.shape[1:], logits.dtype)
        )(keys)
    else:
        ml = masked_logits(logits, class_mask)
        y = jax.vmap(jax.random.categorical)(keys, ml)
        r = jax.nn.softmax(ml, axis=-1) - jax.nn.one_hot(
            y, logits.shape[-1], dtype=logits.dtype
        )
    if class_mask is not None:
        r = r * class_mask
    return r


def batch_curvature(
    apply_fn: lin.ApplyFn,
    params0: Params,
    delta: Params,
    head: Params,
    x: jax.Array,
    rng: jax.Array,
    *,
    linearized: bool = True,
    loss: str = 'mse',
    class_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    with_trace: bool = False,
    axis_name: str | None = None,
) -> Curvature:
    """The curvature statistics of one batch (pure; jit/pmap it).

    Args:
      apply_fn: the backbone `apply_fn(variables, x) -> z`.
      params0: the pre-trained variables ψ0.
      delta: the trainable tangent Δ (sub-tree of params0).
      head: {'kernel': (D, C), 'bias': (C,)}.
      x: a batch of inputs (training augmentation on, as in the paper).
      rng: PRNG key for the pseudo-targets.
      linearized: True for DLCFT (layer statistics at ψ0, head features
        g_lin(x; ψ)); False for a non-linear network (all at ψ0 + Δ).
      loss: 'mse' or 'ce' (which pseudo-target distribution, and whether S_head
        is exactly I).
      class_mask: (C,) or (B, C) active outputs.
      weights: optional (B,) example weights, 0 for padding rows: each
        statistic is Σ_n w_n (·) / Σ_n w_n (over all devices with
        `axis_name`), so padding rows do not enter the curvature.
      with_trace: also estimate each layer's Fisher trace (trace-restricted
        K-FAC).
      axis_name: if given, statistics are averaged over this mapped axis.

    Returns:
      {'layers': {key: {'A', 'S'[, 'trace']}}, 'head': {'A', 'S'}}.
    """
    layers = regularized_layers(delta)
    point = params0 if linearized else lin.shift(params0, delta)

    def head_out(z):
        return z @ head['kernel'] + head['bias']

    def fwd(taps):
        z, inputs, _, _ = tapped_apply(apply_fn, point, x, layers, taps)
        return head_out(z), (z, inputs)

    # Shapes of every layer output, to build zero taps; the specs are static
    # Python values recorded while tracing.
    specs = {}

    def layer_outputs():
        _, _, outs, sp = tapped_apply(apply_fn, point, x, layers)
        specs.update(sp)
        return outs

    outs = jax.eval_shape(layer_outputs)
    taps = {k: jnp.zeros(v.shape, v.dtype) for k, v in outs.items()}
    logits, vjp_fn, (z, inputs) = jax.vjp(fwd, taps, has_aux=True)
    if linearized:
        z = lin.tangent_apply(apply_fn, params0, delta, x)
        logits = head_out(z)
    # The global index of the first row: device-count-invariant targets.
    offset = (
        0
        if axis_name is None
        else jax.lax.axis_index(axis_name) * logits.shape[0]
    )
    r = pseudo_residual(logits, rng, loss, class_mask, offset)
    (grads,) = vjp_fn(r)
    stats = {
        'layers': {
            k: layer_factors(
                specs[k],
                inputs[k],
                grads[k],
                layers[k][0],
                with_trace,
                weights,
            )
            for k in layers
        }
    }
    num_classes = head['kernel'].shape[-1]
    w, norm = _example_weights(r.shape[0], weights, r.dtype)
    if loss == 'mse':
        s_head = jnp.eye(num_classes, dtype=z.dtype)
    else:
        s_head = (r * w[:, None]).T @ r / norm
    stats['head'] = {'A': head_factor(z, weights), 'S': s_head}
    if axis_name is not None:
        if weights is None:  # equal shards: the mean of the devices' means
            stats = jax.lax.pmean(stats, axis_name)
        else:  # each device's mean, weighted by its share of Σ w
            total = jax.lax.psum(jnp.sum(w), axis_name)
            share = jnp.sum(w) / jnp.maximum(total, 1e-12)
            stats = jax.lax.psum(
                jax.tree.map(lambda v: v * share, stats), axis_name
            )
    return stats


def accumulate(
    running: Curvature, new: Curvature, num_tasks: jax.Array | int
) -> Curvature:
    """Running average over tasks, X̄ ← (t·X̄ + X)/(t+1) (docs/method.md §4.3).

    Args:
      running: the average over the first `num_tasks` tasks (ignored when
        num_tasks is 0).
      new: the statistics of the task just finished.
      num_tasks: t, the number of tasks already in `running`.

    Returns:
      The average over t+1 tasks. The penalty later multiplies it by the task
      count, so t·R uses Σ_i (factors of task i)/t · t, as in the authors'
      code.
    """
    t = jnp.asarray(num_tasks, jnp.float32)
    return jax.tree.map(lambda a, b: (t * a + b) / (t + 1.0), running, new)


def grow_head(
    head: Params,
    centre_head: Params,
    head_curv: Mapping[str, Any],
    num_new: int,
    *,
    loss: str = 'mse',
) -> tuple[dict, dict, dict]:
    """Appends `num_new` classes to a (D, C) head (docs/method.md §5.7).

    The new rows are zero and anchored at zero. A_head = E[z̄z̄ᵀ] is shared by
    all rows, old and new, so it is kept; S_head becomes the identity of the
    new size (exact for MSE; for cross-entropy the old S is kept and padded with
    the identity for the new rows).

    Args:
      head: {'kernel': (D, C), 'bias': (C,)}.
      centre_head: the head's anchor θ_{t−1}, same shapes.
      head_curv: {'A': (D+1, D+1), 'S': (C, C)}.
      num_new: how many outputs to add.
      loss: 'mse' or 'ce'.

    Returns:
      (head, centre_head, head_curv) with C + num_new outputs.
    """

    def pad(p):
        return {
            'kernel': jnp.pad(p['kernel'], ((0, 0), (0, num_new))),
            'bias': jnp.pad(p['bias'], ((0, num_new),)),
        }

    c = head['kernel'].shape[-1]
    s = head_curv['S']
    if loss == 'mse':
        s_new = jnp.eye(c + num_new, dtype=s.dtype)
    else:
        s_new = jnp.pad(s, ((0, num_new), (0, num_new)))
        s_new = s_new.at[c:, c:].set(jnp.eye(num_new, dtype=s.dtype))
    return pad(head), pad(centre_head), {'A': head_curv['A'], 'S': s_new}


def kfac_dense_matrix(factors: Mapping[str, jax.Array]) -> np.ndarray:
    """The explicit Kronecker matrix of one layer (for tests; small layers).

    For a kernel matrix K (from `kernel_matrix`) flattened row-major, the
    penalty ½ vec(K)ᵀ M vec(K) with this M equals the factored form.
    """
    A, S = np.asarray(factors['A']), np.asarray(factors['S'])
    if S.ndim == 1:  # depthwise: block-diagonal over channels, rows = channels
        blocks = [S[c] * A[c] for c in range(S.shape[0])]
        n = sum(b.shape[0] for b in blocks)
        m = np.zeros((n, n), A.dtype)
        i = 0
        for blk in blocks:
            m[i : i + blk.shape[0], i : i + blk.shape[0]] = blk
            i += blk.shape[0]
        return m
    return np.kron(A, S)
