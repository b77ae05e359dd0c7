"""Curvature of past tasks as typed values, and the kinds that estimate them.

A quadratic penalty ½ δᵀ H δ (δ = θ − θ_{t−1}) needs three things of its
curvature H, whatever its form: the running average over finished tasks,
the quadratic form, and the product H δ (the penalty's gradient). The two
value types below share exactly that interface (in the spirit of kfac-jax's
curvature blocks, with far less machinery):

* `KroneckerCurvature`: one block A_l ⊗ S_l per conv / dense layer of the
  backbone (K-FAC; trace-restricted K-FAC rescales each block by
  tr F_l / (tr A_l · tr S_l)), and the head block A_head ⊗ S_head. With the
  MSE loss S_head = I and A_head = E[z̄z̄ᵀ], which is the head's exact
  Hessian, also for the rows of classes not seen yet (docs/method.md §5.7).
* `DiagonalCurvature`: one non-negative number per parameter (EWC, MAS).

Both are pytrees (`flax.struct`), so they live in an optimizer state, are
averaged on device, `pmap`ped and checkpointed like any array tree.

The kinds are small frozen (hashable) descriptions of how to estimate a value
from one batch of the task just trained; `estimate_curvature` averages them
over batches. Each takes what it needs and no more:

    kind.batch(model, params0, params, batch, rng, *, class_mask=None,
               axis_name=None) -> value

`model` is the `dlcft_jax.model.Model` being trained (backbone `apply_fn`,
linearized or not, the loss whose outputs the pseudo-targets follow), ψ0
and the parameters {'backbone': Δψ, 'head': ...} are values, `class_mask`
the active outputs ((C,) or (B, C)), `axis_name` a mapped axis to average
over. The kinds:

* `KFAC(restricted=False, head=True)`: K-FAC statistics of the model the
  state trains: the linearized backbone (DLCFT: factors at ψ0, pseudo-targets
  from the current model) or the non-linear network at ψ0 + Δ (OSLA, the
  ablation's non-linear rows). Pseudo-targets ỹ ~ N(f, I) for MSE and
  ỹ ~ softmax(f) for cross-entropy (Martens & Grosse, 2015; Grosse &
  Martens, 2016; Ritter et al., 2018 for the Laplace view that OSLA uses).
* `EWC(head=True)`: the diagonal of the *true* Fisher, E_x E_{ỹ~p(·|x)}
  [(∂ log p(ỹ|x)/∂θ)²], from per-example gradients with one label sampled
  from the model for each example (Kirkpatrick et al., 2017; the DLCFT
  authors' `EWCRegularizer` samples labels the same way). With the MSE loss
  the model's predictive distribution is N(f, I).
* `MAS(head=True)`: Ω = E_x |∂‖f(x)‖²/∂θ| over the active outputs (Aljundi
  et al., 2018), per-example gradients.

`head=False` leaves the head out of the penalty (task-IL, whose per-task
heads the paper does not regularize).

K-FAC supports Flax Linen `nn.Dense`, `nn.Conv` (plain or depthwise) and
`dlcft_jax.models.DepthwiseConv2D`; any other trainable layer makes the
estimator stop with a message naming the layer (freeze it, or use a diagonal
kind, which works for any network). Trainable leaves that are not the kernel
or bias of such a layer (e.g. BatchNorm scale and bias under
`trainable='all'`) get no K-FAC block and so no penalty; `create_state` warns
about them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dlcft_jax import curvature as curv_lib
from dlcft_jax import losses
from dlcft_jax import regularizer as reg_lib
from dlcft_jax.model import Model

Params = Any
Batch = Mapping[str, jax.Array]


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _symmetric(m: jax.Array) -> jax.Array:
    """½(M + Mᵀ) over the last two axes of a square factor; else M."""
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        return m
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


# ----------------------------------------------------------------------------
# Values.


class KroneckerCurvature(flax.struct.PyTreeNode):
    """Block-diagonal H = blockdiag(A_l ⊗ S_l, A_head ⊗ S_head).

    Attributes:
      layers: {module key: {'A', 'S'[, 'trace']}} for the backbone layers
        (see `dlcft_jax.curvature` for the layouts of dense, conv and
        depthwise factors).
      head: {'A': (D+1, D+1), 'S': (C, C)}, or None to leave the head out.
      restricted: static; scale each backbone block by tr F/(tr A · tr S).
    """

    layers: dict
    head: dict | None
    restricted: bool = flax.struct.field(pytree_node=False, default=False)

    def accumulate(self, new: KroneckerCurvature, num_tasks) -> Any:
        """The average over t+1 tasks, t = `num_tasks` already in `self`.

        The factors come out exactly symmetric, ½(M + Mᵀ) (a no-op, bit for
        bit, where the estimate already is, as on CPU): a checkpoint then
        holds their upper triangles only."""
        out = curv_lib.accumulate(self, new, num_tasks)
        return jax.tree.map(_symmetric, out)

    def as_dict(self) -> dict:
        """{'layers': ..., 'head': ...}: `dlcft_jax.regularizer`'s layout."""
        return {'layers': self.layers, 'head': self.head}

    def quadratic(self, delta: Params) -> jax.Array:
        """½ δᵀ H δ for δ = {'backbone': Δψ sub-tree, 'head': {...}}."""
        return reg_lib.quadratic_form(
            delta,
            self.as_dict(),
            restricted=self.restricted,
            with_head=self.head is not None,
        )

    def matvec(self, delta: Params) -> Params:
        """H δ, with the structure of δ (0 where H has no block)."""
        return jax.grad(self.quadratic)(delta)


class DiagonalCurvature(flax.struct.PyTreeNode):
    """H = diag(d): one non-negative value per parameter (EWC, MAS).

    Attributes:
      diag: a tree with the structure of the trained parameters.
    """

    diag: Params

    def accumulate(self, new: DiagonalCurvature, num_tasks) -> Any:
        """The average over t+1 tasks, t = `num_tasks` already in `self`."""
        return curv_lib.accumulate(self, new, num_tasks)

    def quadratic(self, delta: Params) -> jax.Array:
        """½ Σ d δ²."""
        leaves = jax.tree.leaves(
            jax.tree.map(lambda d, x: jnp.sum(d * x * x), self.diag, delta)
        )
        return 0.5 * sum(leaves, jnp.zeros((), jnp.float32))

    def matvec(self, delta: Params) -> Params:
        """d ⊙ δ."""
        return jax.tree.map(jnp.multiply, self.diag, delta)


Curvature = KroneckerCurvature | DiagonalCurvature


# ----------------------------------------------------------------------------
# Kinds (estimators).


def _weighted_mean(per_example, weights, axis_name):
    """Σ_n w_n x_n / Σ_n w_n over the batch (and the mapped axis)."""
    if weights is None:
        weights = jnp.ones((per_example.shape[0],), per_example.dtype)
    w = weights.reshape((-1,) + (1,) * (per_example.ndim - 1))
    total = jnp.sum(per_example * w, axis=0)
    norm = jnp.sum(weights)
    if axis_name is not None:
        total, norm = jax.lax.psum((total, norm), axis_name)
    return total / jnp.maximum(norm, 1e-12)


@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC (or trace-restricted K-FAC) of the trained model.

    Attributes:
      restricted: trace-restricted K-FAC (Gao et al., 2020).
      head: include the head block (False: task-IL).
    """

    restricted: bool = False
    head: bool = True

    name = 'kfac'

    def batch(
        self,
        model: Model,
        params0: Params,
        params: Params,
        batch: Batch,
        rng: jax.Array,
        *,
        class_mask: jax.Array | None = None,
        axis_name: str | None = None,
    ) -> KroneckerCurvature:
        """Statistics of one batch at `params` (pure); see `Kind`."""
        stats = curv_lib.batch_curvature(
            model.apply_fn,
            params0,
            params['backbone'],
            params['head'],
            batch['image'],
            rng,
            linearized=model.linearized,
            loss=model.loss,
            class_mask=class_mask,
            weights=batch.get('weight'),
            with_trace=self.restricted,
            axis_name=axis_name,
        )
        return KroneckerCurvature(
            layers=stats['layers'],
            head=stats['head'] if self.head else None,
            restricted=self.restricted,
        )


def _diagonal(
    model, params0, params, batch, objective, stat, head, mask, axis_name
):
    """E_n[stat(∂ objective(f(x_n; θ), m_n, n)/∂θ)], vmapped per example.

    `objective(logits (C,), mask (C,), n)` is a scalar; each example runs as
    a batch of one, so BatchNorm (frozen, inference mode) and every other
    layer see the shapes they expect. The mean is weighted by
    `batch['weight']` (over all devices with `axis_name`).
    """
    n = batch['image'].shape[0]
    num_classes = params['head']['bias'].shape[-1]
    if mask is None:
        mask = jnp.ones((num_classes,), params['head']['bias'].dtype)
    masks = jnp.broadcast_to(mask, (n, num_classes))

    def one(x, m, i):
        def per_example(p):
            return objective(model.logits(params0, p, x[None])[0], m, i)

        return jax.grad(per_example)(params)

    grads = jax.vmap(one)(batch['image'], masks, jnp.arange(n))
    diag = jax.tree.map(
        lambda g: _weighted_mean(stat(g), batch.get('weight'), axis_name),
        grads,
    )
    if not head:
        diag = {**diag, 'head': _zeros_like(diag['head'])}
    return DiagonalCurvature(diag=diag)


@dataclasses.dataclass(frozen=True)
class _DiagonalKind:
    """A diagonal kind: E_n[stat(∂ objective_n/∂θ)] over a batch.

    A subclass gives `stat` and `objective(model, batch, rng, axis_name)`,
    which returns the per-example scalar `fn(logits (C,), mask (C,), n)`
    (see `_diagonal`).

    Attributes:
      head: include the head (False: task-IL).
    """

    head: bool = True

    def batch(
        self,
        model: Model,
        params0: Params,
        params: Params,
        batch: Batch,
        rng: jax.Array,
        *,
        class_mask: jax.Array | None = None,
        axis_name: str | None = None,
    ) -> DiagonalCurvature:
        """The diagonal of one batch at `params` (pure); see `Kind`."""
        objective = self.objective(model, batch, rng, axis_name)
        return _diagonal(
            model,
            params0,
            params,
            batch,
            objective,
            self.stat,
            self.head,
            class_mask,
            axis_name,
        )


@dataclasses.dataclass(frozen=True)
class EWC(_DiagonalKind):
    """Diagonal of the true Fisher with labels sampled from the model.

    E_n[(∂ log p(ỹ_n | x_n)/∂θ)²], ỹ_n ~ p(·|x_n). Example n draws from
    `fold_in(rng, global index of n)`, so the draws do not depend on how the
    batch is split over devices.
    """

    name = 'ewc'
    stat = staticmethod(jnp.square)

    def objective(self, model, batch, rng, axis_name):
        """−log p(ỹ_n | x_n) with ỹ_n drawn from the model."""
        n = batch['image'].shape[0]
        offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
            offset + jnp.arange(n)
        )
        mse = model.loss == 'mse'

        def neg_log_lik(logits, m, i):
            if mse:
                # p(y|x) = N(f, I) on the active outputs: −log p = ½‖ỹ − f‖².
                eps = jax.random.normal(keys[i], logits.shape, logits.dtype)
                target = jax.lax.stop_gradient(logits + eps)
                return 0.5 * jnp.sum(m * jnp.square(target - logits))
            ml = losses.masked_logits(logits, m)
            y = jax.random.categorical(keys[i], jax.lax.stop_gradient(ml))
            return -jax.nn.log_softmax(ml)[y]

        return neg_log_lik


@dataclasses.dataclass(frozen=True)
class MAS(_DiagonalKind):
    """Memory-aware synapses: Ω = E_n |∂‖f(x_n)‖²/∂θ| (active outputs)."""

    name = 'mas'
    stat = staticmethod(jnp.abs)

    def objective(self, model, batch, rng, axis_name):
        """‖f(x_n)‖² over the active outputs (`rng` is unused)."""
        del model, batch, rng, axis_name

        def sq_norm(logits, m, i):
            del i
            return jnp.sum(m * jnp.square(logits))

        return sq_norm


CurvatureKind = KFAC | EWC | MAS

#: Kinds by the names that `methods.Penalty.kind` accepts.
KINDS = {
    'kfac': lambda head: KFAC(restricted=False, head=head),
    'tkfac': lambda head: KFAC(restricted=True, head=head),
    'ewc': lambda head: EWC(head=head),
    'mas': lambda head: MAS(head=head),
}


def zeros(
    kind: CurvatureKind,
    model: Model,
    params0: Params,
    params: Params,
    example_batch: Batch,
) -> Curvature:
    """A zero curvature of `kind` with the shapes the model gives."""
    shapes = jax.eval_shape(
        lambda: kind.batch(
            model, params0, params, example_batch, jax.random.key(0)
        )
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
