"""Linearization of a network about its pre-trained weights.

DLCFT trains the first-order Taylor expansion of a pre-trained feature
extractor g about its pre-trained weights ψ0:

    g_lin(x; ψ) = g(x; ψ0) + J_ψ g(x; ψ0) · (ψ − ψ0),

which is exactly linear in ψ. One `jax.jvp` gives both terms at once: the
primal output g(x; ψ0) and the tangent output J·Δ with Δ = ψ − ψ0.

Only part of the parameters is trained: the kernels (and biases) of the
convolution and dense layers. BatchNorm statistics and affine parameters stay
at their pre-trained values, as in DLCFT (docs/method.md §2.2-2.3). The
trainable part is kept as a *sub-tree* of the full variables: the same nested
dicts, holding only the trainable leaves. `split` and `merge` move between
the two.

Gradient. For a linear model the gradient of any loss ℓ(g_lin) with respect to
ψ is J(ψ0)ᵀ ∂ℓ/∂g, whatever ψ is. Two exact ways to get it are offered:

* `grad_mode='jvp'` (default): plain autodiff through `jax.jvp` (JAX
  linearizes the tangent program and transposes it). It also supports
  forward-mode differentiation of f_lin.
* `grad_mode='vjp'`: a custom VJP whose backward pass is one `jax.vjp` of
  the *pre-trained* network, re-run from the primal inputs.

On the 2-core CPU used for development the two took the same time within
noise at 32 px and 'jvp' was 5% faster at 64 px for EfficientNet-Lite0
(`python -m benchmarks.step_speed --grad_modes=jvp,vjp` prints both), so the
simpler path is the default; 'vjp' stays for backends where transposing the
jvp program is the costlier of the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

Params = Any  # A pytree of arrays, usually nested dicts as produced by Flax.
ApplyFn = Callable[[Params, jax.Array], jax.Array]
Path = tuple[str, ...]
TrainablePredicate = Callable[[Path, Mapping[Path, Any]], bool]


def default_trainable(path: Path, flat: Mapping[Path, Any]) -> bool:
    """The paper's choice: conv/dense kernels and their biases; BN frozen.

    A leaf is trainable when it is a `kernel`, or a `bias` that sits in the same
    module as a `kernel` (so the `bias` of a BatchNorm, whose module has a
    `scale` and no `kernel`, stays frozen). Only leaves of the `params`
    collection qualify when the tree is a Flax variables dict.

    Args:
      path: the leaf's path of dict keys.
      flat: the whole flattened tree, to look at the leaf's siblings.

    Returns:
      Whether the leaf is trained.
    """
    # In a Flax variables dict only the 'params' collection holds weights.
    if (
        path[0] != 'params'
        and path[0] in _COLLECTIONS
        or path[0] == 'params'
        and len(path) == 1
    ):
        return False
    name = path[-1]
    if name == 'kernel':
        return True
    if name == 'bias':
        return path[:-1] + ('kernel',) in flat
    return False


_COLLECTIONS = ('batch_stats', 'perturbations', 'intermediates', 'cache')


def all_weights(path: Path, flat: Mapping[Path, Any]) -> bool:
    """`trainable='all'`: every weight, BatchNorm scale and bias included,
    never a collection of statistics (`batch_stats`, ...): those are not
    parameters (BatchNorm in training mode updates them itself)."""
    del flat
    if path[0] == 'params':
        return True
    return path[0] not in _COLLECTIONS and 'batch_stats' not in path


def _predicate(
    trainable: None | str | TrainablePredicate,
) -> TrainablePredicate:
    if trainable is None or trainable == 'default':
        return default_trainable
    if trainable == 'all':
        return all_weights
    if trainable == 'none':
        return lambda path, flat: False
    if callable(trainable):
        return trainable
    raise ValueError(
        f'trainable={trainable!r} is not understood: pass None (conv/dense '
        "kernels and biases), 'all' (every weight, no BatchNorm statistics), "
        "'none' or a callable (path, flat) -> bool."
    )


def split(
    params: Params, trainable: None | str | TrainablePredicate = None
) -> tuple[dict, dict]:
    """Splits nested-dict params into (trainable, frozen) sub-trees.

    Args:
      params: nested dicts of arrays, e.g. Flax variables
        `{'params': ..., 'batch_stats': ...}`.
      trainable: None for `default_trainable`, 'all', 'none', or a predicate
        `(path, flat_params) -> bool`.

    Returns:
      Two nested dicts with the same key structure as `params`, each holding
      only its own leaves; `merge(trainable, frozen)` gives `params` back.
    """
    pred = _predicate(trainable)
    flat = traverse_util.flatten_dict(dict(params))
    train = {k: v for k, v in flat.items() if pred(k, flat)}
    frozen = {k: v for k, v in flat.items() if k not in train}
    return (
        traverse_util.unflatten_dict(train),
        traverse_util.unflatten_dict(frozen),
    )


def merge(a: Params, b: Params) -> dict:
    """Merges two nested dicts with disjoint leaves (inverse of `split`)."""
    flat = traverse_util.flatten_dict(dict(a))
    for k, v in traverse_util.flatten_dict(dict(b)).items():
        if k in flat:
            raise ValueError(f'merge: leaf {"/".join(k)} is in both trees.')
        flat[k] = v
    return traverse_util.unflatten_dict(flat)


def _jvp_apply(
    apply_fn: ApplyFn,
    train0: Params,
    frozen: Params,
    delta: Params,
    x: jax.Array,
) -> jax.Array:
    primal, tangent = jax.jvp(
        lambda p: apply_fn(merge(p, frozen), x), (train0,), (delta,)
    )
    return jax.tree.map(jnp.add, primal, tangent)


# The same function with a reverse rule of its own (grad_mode='vjp').
_vjp_apply = jax.custom_vjp(_jvp_apply, nondiff_argnums=(0,))


def _vjp_apply_fwd(apply_fn, train0, frozen, delta, x):
    out = _jvp_apply(apply_fn, train0, frozen, delta, x)
    return out, (train0, frozen, x)


def _vjp_apply_bwd(apply_fn, res, cotangent):
    train0, frozen, x = res
    # ∂/∂Δ of <c, g(ψ0) + J(ψ0)Δ> = J(ψ0)ᵀ c: a vjp of the pre-trained net.
    _, vjp_fn = jax.vjp(lambda p: apply_fn(merge(p, frozen), x), train0)
    (g,) = vjp_fn(cotangent)
    # The pre-trained weights and the inputs are constants of the method.
    return None, None, g, None


_vjp_apply.defvjp(_vjp_apply_fwd, _vjp_apply_bwd)


def tangent_apply(
    apply_fn: ApplyFn,
    params0: Params,
    delta: Params,
    x: jax.Array,
    *,
    grad_mode: str = 'jvp',
) -> jax.Array:
    """Evaluates g(x; ψ0) + J(x; ψ0)·Δ with one `jax.jvp`.

    Args:
      apply_fn: `apply_fn(params, x)`, the network (BN in inference mode).
      params0: the full pre-trained variables ψ0.
      delta: the tangent Δ = ψ − ψ0 on the trainable leaves only (a sub-tree of
        `params0` with the same nested keys, as returned by `split`).
      x: a batch of inputs.
      grad_mode: 'jvp' (autodiff through the jvp; also forward-mode) or
        'vjp' (custom reverse rule: one vjp of the pre-trained network;
        reverse-mode only). See the module docstring.

    Returns:
      The linearized network output, with the structure of `apply_fn`'s output.
    """
    flat_delta = traverse_util.flatten_dict(dict(delta))
    flat0 = traverse_util.flatten_dict(dict(params0))
    missing = [k for k in flat_delta if k not in flat0]
    if missing:
        raise ValueError(
            'delta has leaves that params0 lacks: '
            + ', '.join('/'.join(k) for k in missing[:5])
        )
    train0 = traverse_util.unflatten_dict({k: flat0[k] for k in flat_delta})
    frozen = traverse_util.unflatten_dict(
        {k: v for k, v in flat0.items() if k not in flat_delta}
    )
    if grad_mode == 'vjp':
        return _vjp_apply(apply_fn, train0, frozen, delta, x)
    if grad_mode == 'jvp':
        return _jvp_apply(apply_fn, train0, frozen, delta, x)
    raise ValueError(f"grad_mode must be 'vjp' or 'jvp', got {grad_mode!r}.")


def shift(params0: Params, delta: Params) -> dict:
    """ψ0 + Δ: `params0` with each leaf of the sub-tree `delta` added."""
    flat0 = traverse_util.flatten_dict(dict(params0))
    for k, v in traverse_util.flatten_dict(dict(delta)).items():
        flat0[k] = flat0[k] + v
    return traverse_util.unflatten_dict(flat0)


def select(params: Params, like: Params) -> dict:
    """The leaves of `params` at the paths of the sub-tree `like`."""
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
        {k: flat[k] for k in traverse_util.flatten_dict(dict(like))}
    )


def shifted_apply(
    apply_fn: ApplyFn, params0: Params, delta: Params, x: jax.Array
) -> jax.Array:
    """Evaluates the non-linear network g(x; ψ0 + Δ) (plain fine-tuning)."""
    return apply_fn(shift(params0, delta), x)


def linearize(
    apply_fn: ApplyFn,
    params0: Params,
    trainable: None | str | TrainablePredicate = None,
    *,
    grad_mode: str = 'jvp',
) -> ApplyFn:
    """Returns f_lin(params, x) = f(x; ψ0) + J(x; ψ0)·(params − ψ0).

    The returned function has the signature of `apply_fn` (the neural-tangents
    convention). `params` has the structure of `params0`; its frozen leaves are
    ignored (they are held at `params0`), so f_lin is exactly linear in the
    trainable leaves and equals `apply_fn(params0, x)` at `params0`.

    Args:
      apply_fn: any `apply_fn(params, x)`, e.g. a Flax Linen `module.apply`
        wrapped with BN in inference mode.
      params0: the linearization point ψ0 (the pre-trained variables).
      trainable: which leaves are linearized and trained; see `split`.
      grad_mode: see `tangent_apply`.

    Returns:
      `f_lin(params, x)`.
    """
    train0, _ = split(params0, trainable)
    keys = list(traverse_util.flatten_dict(train0))

    def f_lin(params: Params, x: jax.Array) -> jax.Array:
        flat = traverse_util.flatten_dict(dict(params))
        flat0 = traverse_util.flatten_dict(dict(train0))
        delta = traverse_util.unflatten_dict(
            {k: flat[k] - flat0[k] for k in keys}
        )
        return tangent_apply(apply_fn, params0, delta, x, grad_mode=grad_mode)

    return f_lin


def zeros_like_trainable(
    params0: Params, trainable: None | str | TrainablePredicate = None
) -> dict:
    """A zero tangent Δ = 0 over the trainable leaves of `params0`."""
    train0, _ = split(params0, trainable)
    return jax.tree.map(jnp.zeros_like, train0)
