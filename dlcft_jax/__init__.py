"""dlcft_jax: Deep Linear Continual Fine-Tuning (Shon et al., ECCV 2022) in JAX.

The public API:

* `step(state, batch)`: the jitted DLCFT training step (compiled once per
  input shape); `train_state.step` is the pure per-device function with an
  `axis_name`, and `parallel` wraps it with `pmap` / `shard_map`.
* `create_state`, `begin_task`, `end_task`, `estimate_curvature`, `predict`:
  the task loop around it.
* `Method` and `METHODS`: a method as one record of parts (`Network`,
  data terms, `Penalty`, `Optimizer`, `Replay`, trainer), and the paper's
  methods and baselines as records (`dlcft_jax.methods`).
* `linearize`, `tangent_apply`: the linearized network; `Model`: the
  trained network of a method (linearized or not, exact head) as pure
  functions of (ψ0, parameters, inputs).
* `penalty.quadratic_penalty`: the penalty of past tasks as an optax
  transformation for your own chain; `curvature_kinds`: the curvature values
  (K-FAC, diagonal) and their estimators (K-FAC, EWC, MAS).
* `prototypes`: training-free baselines on frozen features (NCM, RanPAC).
* `losses`, `curvature`, `regularizer`: the maths, as pure functions.
"""

import jax as _jax

from dlcft_jax import (
    curvature,
    curvature_kinds,
    data_terms,
    linearization,
    losses,
    methods,
    model,
    parallel,
    penalty,
    prototypes,
    regularizer,
    train_state,
)
from dlcft_jax.curvature_kinds import (
    EWC,
    KFAC,
    MAS,
    DiagonalCurvature,
    KroneckerCurvature,
)
from dlcft_jax.linearization import linearize, merge, split, tangent_apply
from dlcft_jax.methods import (
    METHODS,
    Method,
    Network,
    Optimizer,
    Penalty,
    Replay,
)
from dlcft_jax.model import Model
from dlcft_jax.train_state import (
    TrainState,
    begin_task,
    create_state,
    end_task,
    estimate_curvature,
    predict,
)

__version__ = '0.1.0'

#: The jitted per-device step on one device: `step(state, batch)`.
step = _jax.jit(train_state.step, static_argnames=('axis_name',))

__all__ = [
    'DiagonalCurvature',
    'EWC',
    'KFAC',
    'KroneckerCurvature',
    'MAS',
    'METHODS',
    'Method',
    'Model',
    'Network',
    'Optimizer',
    'Penalty',
    'Replay',
    'TrainState',
    'begin_task',
    'create_state',
    'curvature',
    'curvature_kinds',
    'end_task',
    'estimate_curvature',
    'linearization',
    'data_terms',
    'linearize',
    'losses',
    'merge',
    'methods',
    'model',
    'parallel',
    'penalty',
    'predict',
    'prototypes',
    'regularizer',
    'split',
    'step',
    'tangent_apply',
    'train_state',
]
