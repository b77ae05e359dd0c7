"""The model part of a method: what network is trained, as pure functions.

A method's model is the pre-trained backbone g(x; ψ0 + Δψ), trained either
linearized about ψ0 (DLCFT: g_lin = g(ψ0) + J(ψ0)Δψ, one `jax.jvp`) or as
the non-linear network, with the exact linear head f = W z + b on top.
`Model` holds what is fixed for a run (the backbone's `apply_fn`, whether
it is linearized, the gradient mode, and the loss whose output distribution
the curvature estimators sample from); the values (ψ0, and the parameters
{'backbone': Δψ, 'head': {'kernel', 'bias'}}) are passed in. The step, the
curvature estimators (`dlcft_jax.curvature_kinds`) and a user's loop all
call these functions, so none of them needs the `TrainState`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from dlcft_jax import linearization as lin

Params = Any


@dataclasses.dataclass(frozen=True)
class Model:
    """The trained network of a method (hashable: static under jit).

    Attributes:
      apply_fn: the backbone `apply_fn(variables, x) -> features`, BatchNorm
        in inference mode.
      linearized: train g_lin (DLCFT) instead of the non-linear network.
      loss: 'mse' or 'ce': the output distribution of the curvature's
        pseudo-targets (Gaussian or categorical).
      grad_mode: 'jvp' or 'vjp' (`linearization.tangent_apply`).
      train_apply_fn: the non-linear backbone with BatchNorm in training
        mode, `(variables, x) -> (features, {'batch_stats': ...})`, for
        methods that train the statistics (Mammoth's ER / DER / DER++);
        None: BatchNorm frozen in training too (DLCFT).
    """

    apply_fn: Callable[..., jax.Array]
    linearized: bool = True
    loss: str = 'mse'
    grad_mode: str = 'jvp'
    train_apply_fn: Callable[..., Any] | None = None

    def features(self, params0: Params, params: Params, x: jax.Array):
        """z = g_lin(x; ψ0 + Δψ) (linearized) or g(x; ψ0 + Δψ)."""
        if self.linearized:
            return lin.tangent_apply(
                self.apply_fn,
                params0,
                params['backbone'],
                x,
                grad_mode=self.grad_mode,
            )
        return lin.shifted_apply(self.apply_fn, params0, params['backbone'], x)

    def logits(self, params0: Params, params: Params, x: jax.Array):
        """f = W z + b on the features."""
        return head_apply(params, self.features(params0, params, x))

    def train_logits(
        self,
        params0: Params,
        params: Params,
        x: jax.Array,
        rng: jax.Array | None = None,
    ):
        """(f, new BatchNorm statistics or None) of a training step; `rng`
        reaches a `train_apply_fn` whose `needs_rng` attribute is true
        (stochastic depth)."""
        if self.train_apply_fn is None:
            return self.logits(params0, params, x), None
        args = (lin.shift(params0, params['backbone']), x)
        if getattr(self.train_apply_fn, 'needs_rng', False):
            args += (rng,)
        z, mutated = self.train_apply_fn(*args)
        return head_apply(params, z), mutated['batch_stats']


def head_apply(params: Params, z: jax.Array) -> jax.Array:
    """f = W z + b."""
    return z @ params['head']['kernel'] + params['head']['bias']
