"""Training state and the per-device DLCFT step.

The state is an explicit pytree (`TrainState`): the trainable parameters
θ = (Δψ, W, b), the pre-trained backbone variables ψ0, the optimizer state,
the anchor θ_{t−1} ("centre"), the accumulated curvature, the active-class
mask and the counters. The network `apply_fn`, the optimizer `tx` and the
`MethodConfig` are static fields.

`step(state, batch, *, axis_name=None)` is pure and per-device. Given an
`axis_name` it averages gradients and metrics over that mapped axis
(`jax.lax.pmean`), so the same function runs under `jax.jit` on one device,
under `jax.pmap`, or inside `jax.shard_map` (see `dlcft_jax.parallel`).

One step of task t (spec §4, §3.5, §8):

    L   = mean_batch ℓ(f(x; θ), y)                 (MSE or cross-entropy)
    J   = (L + t·R(θ)) / (t + 1)                    (R: K-FAC penalty;
                                                     J = L without one)
    g   = ∇J + κ (θ − θ_{t−1})                      (proximal damping κ)
    g   ← clip_by_global_norm(g, c)
    g   ← g + λ θ_decay                             (coupled L2, inside Adam)
    θ   ← θ − η_k · adam(g),   η_k = η (1 − k / N_t)

θ_decay is Δψ for the linearized backbone (so L2 pulls toward ψ0, as weight
decay on the paper's tangent parameters does), ψ0 + Δψ for the non-linear
network, and (W, b) for the head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dlcft_jax import curvature as curv_lib
from dlcft_jax import linearization as lin
from dlcft_jax import losses
from dlcft_jax import regularizer as reg_lib

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Static description of a method (hashable: it is part of the jit key).

    Attributes:
      linearized: train g_lin (DLCFT) instead of the non-linear network.
      loss: 'mse' (α-scaled one-hot) or 'ce' (softmax cross-entropy).
      alpha: the MSE label scale α.
      regularizer: 'kfac', 'tkfac' (trace-restricted) or 'none'.
      proximal: κ of the proximal damping κ(θ − θ_{t−1}) added to the gradient
        (0 disables it).
      optimizer: 'adam' or 'sgd' (heavy-ball momentum).
      learning_rate: η at the start of each task.
      schedule: 'linear' (to 0 at the end of the task) or 'constant'.
      momentum: SGD momentum.
      b1, b2, eps: Adam's parameters.
      weight_decay: coupled L2 coefficient λ.
      clip_norm: global-norm clipping threshold (0 disables it).
      grad_mode: 'jvp' or 'vjp', see `linearization.tangent_apply`.
      regularize_head: include the head in the penalty (False for task-IL,
        whose per-task heads the paper leaves unregularized).
    """

    linearized: bool = True
    loss: str = 'mse'
    alpha: float = losses.ALPHA
    regularizer: str = 'kfac'
    proximal: float = 1e-4
    optimizer: str = 'adam'
    learning_rate: float = 1e-4
    schedule: str = 'linear'
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-5
    clip_norm: float = 1.0
    grad_mode: str = 'jvp'
    regularize_head: bool = True

    def __post_init__(self):
        checks = [
            (
                self.loss in ('mse', 'ce'),
                f"loss must be 'mse' or 'ce', got {self.loss!r}",
            ),
            (
                self.regularizer in ('kfac', 'tkfac', 'none'),
                f"regularizer must be 'kfac', 'tkfac' or 'none', got "
                f'{self.regularizer!r}',
            ),
            (
                self.optimizer in ('adam', 'sgd'),
                f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}",
            ),
            (
                self.schedule in ('linear', 'constant'),
                f"schedule must be 'linear' or 'constant', got {self.schedule!r}",
            ),
            (self.learning_rate > 0, 'learning_rate must be > 0'),
            (
                self.weight_decay >= 0
                and self.proximal >= 0
                and self.clip_norm >= 0,
                'weight_decay, proximal and clip_norm must be >= 0',
            ),
            (
                self.grad_mode in ('vjp', 'jvp'),
                f"grad_mode must be 'vjp' or 'jvp', got {self.grad_mode!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f'MethodConfig: {msg}.')

    @classmethod
    def dlcft(cls, **overrides) -> 'MethodConfig':
        """Linearized + MSE + K-FAC, Adam 1e-4 (spec §5)."""
        return cls(**overrides)

    @classmethod
    def finetune(cls, **overrides) -> 'MethodConfig':
        """Plain fine-tuning: non-linear network, cross-entropy, no penalty,
        SGD momentum 0.9, lr 1e-3 (the paper's non-linear baselines, spec §5)."""
        kw = dict(
            linearized=False,
            loss='ce',
            regularizer='none',
            proximal=0.0,
            optimizer='sgd',
            learning_rate=1e-3,
        )
        kw.update(overrides)
        return cls(**kw)


def make_optimizer(config: MethodConfig) -> optax.GradientTransformation:
    """Clip → coupled L2 → Adam/momentum; the step applies −η_k itself.

    The learning rate is left out of `tx` because its schedule depends on the
    per-task step count N_t, which is a dynamic value in the state (a new task
    with another N_t must not trigger a recompilation).
    """
    parts = []
    if config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if config.optimizer == 'adam':
        parts.append(optax.scale_by_adam(config.b1, config.b2, config.eps))
    elif config.momentum > 0:
        parts.append(optax.trace(decay=config.momentum))
    return optax.chain(*parts) if parts else optax.identity()


class TrainState(flax.struct.PyTreeNode):
    """Everything a DLCFT run carries between steps (a pytree).

    Attributes:
      step: int32, steps taken in the current task.
      task: int32, t: the number of tasks finished (the penalty weight).
      num_steps: int32, N_t, the length of the current task's schedule.
      params: {'backbone': Δψ (trainable sub-tree of ψ0), 'head': {'kernel'
        (D, C), 'bias' (C,)}}.
      centre: θ_{t−1}, same structure as `params`.
      opt_state: the optimizer state.
      curvature: {'layers': {key: {'A', 'S', 'trace'}}, 'head': {'A', 'S'}},
        the running average over finished tasks ({} without a regularizer).
      class_mask: (C,) float32, 1 for active outputs.
      params0: the full pre-trained backbone variables ψ0.
      apply_fn: static, the backbone `apply_fn(variables, x) -> features`.
      tx: static, see `make_optimizer`.
      config: static `MethodConfig`.
    """

    step: jax.Array
    task: jax.Array
    num_steps: jax.Array
    params: Params
    centre: Params
    opt_state: Any
    curvature: Any
    class_mask: jax.Array
    params0: Params
    apply_fn: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    config: MethodConfig = flax.struct.field(pytree_node=False)


def create_state(
    apply_fn: Callable[..., jax.Array],
    params0: Params,
    *,
    num_classes: int,
    example_input: jax.Array,
    config: MethodConfig = MethodConfig(),
    trainable: Any = None,
    head: Optional[Params] = None,
    num_steps: int = 1,
) -> TrainState:
    """Builds the initial state: Δψ = 0, a zero head (unless given), t = 0.

    Args:
      apply_fn: backbone `apply_fn(variables, x) -> (B, D)` features, BN in
        inference mode.
      params0: the pre-trained variables ψ0.
      num_classes: C, the width of the head (all classes of the run; use
        `class_mask` for a growing head).
      example_input: an input batch of the shape the step will see (only its
        shape and dtype are used).
      config: the method.
      trainable: which backbone leaves are trained, see `linearize.split`.
      head: an initial head {'kernel': (D, C), 'bias': (C,)}; zeros if None
        (the paper's class-IL choice, which also keeps the rows of unseen
        classes at their anchor 0).
      num_steps: N_0 for the first task's schedule.

    Returns:
      The `TrainState`.
    """
    # Own copies on the device: steps that donate the state then never
    # invalidate the caller's pre-trained variables.
    params0 = jax.tree.map(jnp.array, params0)
    delta = lin.zeros_like_trainable(params0, trainable)
    feat = jax.eval_shape(apply_fn, params0, example_input)
    if len(feat.shape) != 2:
        raise ValueError(
            f'apply_fn must return (batch, features); got shape {feat.shape}.'
        )
    dim = feat.shape[-1]
    if head is None:
        head = {
            'kernel': jnp.zeros((dim, num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32),
        }
    if head['kernel'].shape != (dim, num_classes):
        raise ValueError(
            f'head kernel must be ({dim}, {num_classes}), got '
            f"{head['kernel'].shape}."
        )
    params = {'backbone': delta, 'head': head}
    if config.regularizer == 'none':
        curvature = {}
    else:
        shapes = jax.eval_shape(
            lambda: curv_lib.batch_curvature(
                apply_fn,
                params0,
                delta,
                head,
                example_input,
                jax.random.key(0),
                linearized=config.linearized,
                loss=config.loss,
                with_trace=config.regularizer == 'tkfac',
            )
        )
        curvature = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    tx = make_optimizer(config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        task=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        params=params,
        # A copy, not the same buffers: a step that donates its input state
        # must not see one buffer twice.
        centre=_copy(params),
        opt_state=tx.init(params),
        curvature=curvature,
        class_mask=jnp.ones((num_classes,), jnp.float32),
        params0=params0,
        apply_fn=apply_fn,
        tx=tx,
        config=config,
    )


def _copy(tree: Params) -> Params:
    return jax.tree.map(jnp.copy, tree)


def features(state: TrainState, params: Params, x: jax.Array) -> jax.Array:
    """z = g_lin(x; ψ0 + Δψ) (DLCFT) or g(x; ψ0 + Δψ) (non-linear)."""
    if state.config.linearized:
        return lin.tangent_apply(
            state.apply_fn,
            state.params0,
            params['backbone'],
            x,
            grad_mode=state.config.grad_mode,
        )
    return lin.shifted_apply(
        state.apply_fn, state.params0, params['backbone'], x
    )


def apply_model(state: TrainState, params: Params, x: jax.Array) -> jax.Array:
    """f = W̄ᵀ[z; 1], the head kept exact on top of the (linearized) backbone."""
    z = features(state, params, x)
    return z @ params['head']['kernel'] + params['head']['bias']


def learning_rate(state: TrainState) -> jax.Array:
    """η_k = η·(1 − k/N_t) (linear decay to 0 within each task) or η."""
    lr = state.config.learning_rate
    if state.config.schedule == 'constant':
        return jnp.asarray(lr, jnp.float32)
    frac = state.step.astype(jnp.float32) / jnp.maximum(
        state.num_steps.astype(jnp.float32), 1.0
    )
    return lr * jnp.clip(1.0 - frac, 0.0, 1.0)


def _decay_params(state: TrainState, params: Params) -> Params:
    """What coupled L2 pulls toward 0: Δψ (linearized) or ψ0 + Δψ."""
    if state.config.linearized:
        return params
    train0 = lin.select(state.params0, params['backbone'])
    return {
        'backbone': jax.tree.map(jnp.add, params['backbone'], train0),
        'head': params['head'],
    }


def step(
    state: TrainState, batch: Batch, *, axis_name: Optional[str] = None
) -> tuple[TrainState, Metrics]:
    """One optimization step of the current task (pure, per device).

    Args:
      state: the `TrainState`.
      batch: {'image': inputs for `apply_fn`, 'label': (B,) int32}, optionally
        'class_mask' (B, C) (per-example active outputs, e.g. task-IL heads)
        and 'weight' (B,) example weights.
      axis_name: the mapped axis to average gradients and metrics over, when
        the step runs under `pmap` or `shard_map`; None on one device.

    Returns:
      (new_state, metrics): metrics is a flat dict of scalars: 'loss' (the
      objective J_t), 'data_loss' (L_t), 'penalty' (R), 'accuracy',
      'grad_norm' (before clipping), 'learning_rate'.
    """
    cfg = state.config
    labels = batch['label']
    class_mask = batch.get('class_mask', state.class_mask)
    weights = batch.get('weight')
    loss_fn = losses.loss_fn(cfg.loss)

    def data_loss(params):
        logits = apply_model(state, params, batch['image'])
        return loss_fn(
            logits,
            labels,
            alpha=cfg.alpha,
            class_mask=class_mask,
            weights=weights,
        ), logits

    (loss_t, logits), grads = jax.value_and_grad(data_loss, has_aux=True)(
        state.params
    )
    acc = losses.accuracy(
        logits, labels, class_mask=class_mask, weights=weights
    )
    if axis_name is not None:
        grads, loss_t, acc = jax.lax.pmean((grads, loss_t, acc), axis_name)

    t = state.task.astype(jnp.float32)
    if cfg.regularizer != 'none':
        restricted = cfg.regularizer == 'tkfac'

        def with_penalty():
            return reg_lib.penalty_value_and_grad(
                state.params,
                state.centre,
                state.curvature,
                restricted=restricted,
                with_head=cfg.regularize_head,
            )

        def without_penalty():
            return (
                jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, state.params),
            )

        # Task 0 has no past: skip the penalty's matrix products entirely.
        pen, pen_grads = jax.lax.cond(
            state.task > 0, with_penalty, without_penalty
        )
        grads = jax.tree.map(
            lambda g, h: (g + t * h) / (t + 1.0), grads, pen_grads
        )
        objective = reg_lib.task_objective(loss_t, pen, t)
    else:
        # Without a penalty there is no past to weigh against: J_t = L_t.
        pen = jnp.zeros((), jnp.float32)
        objective = loss_t

    if cfg.proximal > 0:
        grads = jax.tree.map(
            lambda g, p, c: g + cfg.proximal * (p - c),
            grads,
            state.params,
            state.centre,
        )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(
        grads, state.opt_state, _decay_params(state, state.params)
    )
    lr = learning_rate(state)
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state
    )
    metrics = {
        'loss': objective,
        'data_loss': loss_t,
        'penalty': pen,
        'accuracy': acc,
        'grad_norm': grad_norm,
        'learning_rate': lr,
    }
    return new_state, metrics


def begin_task(
    state: TrainState, *, num_steps: int, class_mask: Optional[jax.Array] = None
) -> TrainState:
    """Starts a task: fresh optimizer moments, schedule of N_t steps.

    The anchor θ_{t−1} is the current parameters (set by `end_task`, or the
    initial ones for the first task). `class_mask` activates the outputs of
    the classes seen so far (class-IL) and keeps the shape of the head fixed,
    so no step is recompiled when classes arrive; the rows of new classes are
    still at their anchor 0 and share the head curvature (spec §3.4).

    Args:
      state: the state after the previous task.
      num_steps: N_t.
      class_mask: (C,) active outputs, or None to keep the current mask.

    Returns:
      The state ready for `step`.
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
    mask = (
        state.class_mask
        if class_mask is None
        else jnp.asarray(class_mask, jnp.float32).reshape(
            state.class_mask.shape
        )
    )
    return state.replace(
        step=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        opt_state=state.tx.init(state.params),
        class_mask=mask,
    )


def curvature_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    axis_name: Optional[str] = None,
) -> curv_lib.Curvature:
    """K-FAC and head statistics of one batch at the current parameters."""
    return curv_lib.batch_curvature(
        state.apply_fn,
        state.params0,
        state.params['backbone'],
        state.params['head'],
        batch['image'],
        rng,
        linearized=state.config.linearized,
        loss=state.config.loss,
        class_mask=batch.get('class_mask', state.class_mask),
        with_trace=state.config.regularizer == 'tkfac',
        axis_name=axis_name,
    )


_curvature_step_jit = jax.jit(curvature_step)
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


def estimate_curvature(
    state: TrainState,
    batches: Iterable[Batch],
    rng: jax.Array,
    stats_fn: Optional[Callable[..., Any]] = None,
) -> curv_lib.Curvature:
    """Averages `curvature_step` over batches of the task just trained.

    Args:
      state: the state at the end of the task.
      batches: an iterable of batches (the paper uses 1000 batches of 64 with
        training augmentation).
      rng: PRNG key; folded with the batch index for the pseudo-targets.
      stats_fn: the per-batch function (default: jitted `curvature_step`; a
        pmapped version for several devices).

    Returns:
      The task's curvature statistics (same structure as `state.curvature`).
    """
    fn = stats_fn or _curvature_step_jit
    total, n = None, 0
    for i, batch in enumerate(batches):
        stats = fn(state, batch, jax.random.fold_in(rng, i))
        total = stats if total is None else _add(total, stats)
        n += 1
    if n == 0:
        raise ValueError('estimate_curvature got no batches.')
    return jax.tree.map(lambda x: x / n, total)


def end_task(
    state: TrainState, task_curvature: Optional[curv_lib.Curvature]
) -> TrainState:
    """Finishes task t: H̄ ← (t·H̄ + H_t)/(t+1), θ_t becomes the anchor, t += 1."""
    curvature = state.curvature
    if state.config.regularizer != 'none':
        if task_curvature is None:
            raise ValueError(
                'end_task needs the task curvature when the method '
                'has a regularizer.'
            )
        curvature = curv_lib.accumulate(
            state.curvature, task_curvature, state.task
        )
    return state.replace(
        curvature=curvature, centre=_copy(state.params), task=state.task + 1
    )


def predict(state: TrainState, x: jax.Array) -> jax.Array:
    """Logits of the current model (mask inactive classes before arg-max)."""
    return apply_model(state, state.params, x)
