"""Training state and the per-device step, built from composable parts.

A method is a `dlcft_jax.methods.Method`: one record of parts, each
replaceable on its own:

* the **network**: the linearized backbone g_lin(x; ψ0 + Δψ) (DLCFT) or the
  non-linear g(x; ψ0 + Δψ), with an exact head f = W z + b (`Model`);
* the **data terms** the step sums (`dlcft_jax.data_terms`): the label loss
  (α-scaled one-hot MSE or cross-entropy), DER's stored logits, LwF's
  distillation, or a user's own;
* the **penalty** of past tasks, an optax transformation
  (`dlcft_jax.penalty.quadratic_penalty`) over a curvature kind
  (`dlcft_jax.curvature_kinds`: K-FAC, trace-restricted K-FAC, EWC, MAS);
* the **optimizer**, any optax chain; the record's builds the paper's:
  penalty → clip → coupled L2 → Adam or SGD → per-task linear decay.

`create_state(..., method=..., tx=..., loss=..., data_terms=...)` takes a
record and, optionally, a user's own optimizer, loss or terms in place of
its parts. The state is an explicit pytree (`TrainState`).

`step(state, batch, *, axis_name=None)` is pure and per-device. Given an
`axis_name` it averages gradients and metrics over that mapped axis
(`jax.lax.pmean`), so the same function runs under `jax.jit` on one device,
under `jax.pmap`, or inside `jax.shard_map` (see `dlcft_jax.parallel`).

One step of task t with the preset optimizer (docs/method.md §4.2, §4.4):

    L   = mean_batch ℓ(f(x; θ), y) [+ replay / distillation terms]
    g   = (∇L + t·H̄(θ − θ_{t−1}))/(t + 1) + κ(θ − θ_{t−1})    (penalty)
    g   ← clip_by_global_norm(g, c)
    g   ← g + λ θ                                            (coupled L2)
    θ   ← θ − η_k · adam(g),   η_k = η (1 − k / N_t)

The optimizer sees θ = (Δψ, W, b) for the linearized backbone (so L2 pulls
toward ψ0, as weight decay on the paper's tangent parameters does) and
θ = (ψ0 + Δψ, W, b) for the non-linear network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from dlcft_jax import curvature_kinds as kinds
from dlcft_jax import data_terms as dterms
from dlcft_jax import linearization as lin
from dlcft_jax import losses, methods, solvers
from dlcft_jax import penalty as pen_lib
from dlcft_jax.model import Model, head_apply  # noqa: F401 (re-exported)

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[..., jax.Array]


def keep_untouched_outputs(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformation:
    """`inner`, with the updates of the head outputs that the gradient does
    not reach set to zero.

    The data terms give exact zeros to the outputs they do not touch (other
    tasks' heads in task-IL, classes not seen yet in class-IL); without this
    wrapper weight decay alone would move those rows, by up to η per step
    through Adam's normalisation. An output is touched when any entry of its
    head column (kernel or bias) has a non-zero gradient. The state is
    `inner`'s own, so `penalty.find` and the task-boundary calls see it.
    """

    def update(grads, state, params=None, **extra_args):
        head_g = grads['head']
        touched = (
            jnp.sum(jnp.abs(head_g['kernel']), 0) + jnp.abs(head_g['bias']) > 0
        ).astype(head_g['bias'].dtype)
        if isinstance(inner, optax.GradientTransformationExtraArgs):
            updates, state = inner.update(grads, state, params, **extra_args)
        else:
            updates, state = inner.update(grads, state, params)
        head = updates['head']
        updates = {
            **updates,
            'head': {
                'kernel': head['kernel'] * touched,
                'bias': head['bias'] * touched,
            },
        }
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update)


class TrainState(flax.struct.PyTreeNode):
    """Everything a run carries between steps (a pytree).

    Attributes:
      step: int32, steps taken in the current task.
      task: int32, t: the number of tasks finished.
      num_steps: int32, N_t, the length of the current task's schedule.
      params: {'backbone': Δψ (trainable sub-tree of ψ0), 'head': {'kernel'
        (D, C), 'bias' (C,)}}.
      centre: θ_{t−1} (the model at the end of the previous task: LwF's
        teacher), same structure as `params`.
      opt_state: the optimizer state; holds the `penalty.PenaltyState`
        (anchor, accumulated curvature, task count) when there is a penalty.
      class_mask: (C,) float32, 1 for active outputs.
      params0: the full pre-trained backbone variables ψ0 (with
        `network.bn_train` its BatchNorm statistics are updated by training).
      apply_fn: static, the backbone `apply_fn(variables, x) -> features`.
      tx: static, the optax transformation.
      method: static, the `methods.Method` record.
      data_terms: static, the data terms the step sums (the method's, or a
        user's, see `create_state`).
      train_apply_fn: static, `(variables, x) -> (features, {'batch_stats':
        ...})` in training mode (only for `network.bn_train`).
    """

    step: jax.Array
    task: jax.Array
    num_steps: jax.Array
    params: Params
    centre: Params
    opt_state: Any
    class_mask: jax.Array
    params0: Params
    apply_fn: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    method: methods.Method = flax.struct.field(pytree_node=False)
    data_terms: tuple = flax.struct.field(pytree_node=False)
    train_apply_fn: Callable[..., Any] | None = flax.struct.field(
        pytree_node=False, default=None
    )

    @property
    def curvature(self) -> kinds.Curvature | None:
        """H̄, the accumulated curvature of the penalty (None without one)."""
        state = pen_lib.find(self.opt_state)
        return None if state is None else state.curvature

    @property
    def penalty_state(self) -> pen_lib.PenaltyState | None:
        return pen_lib.find(self.opt_state)


def _warn_unregularized(params: Params, curvature) -> None:
    """Warns about trainable leaves that a K-FAC penalty does not cover."""
    if not isinstance(curvature, kinds.KroneckerCurvature):
        return
    flat = traverse_util.flatten_dict(dict(params['backbone']))
    covered = set()
    for key in curvature.layers:
        mpath = tuple(key.split('/')) if key else ()
        for prefix in ((), ('params',)):
            covered.add(prefix + mpath + ('kernel',))
            covered.add(prefix + mpath + ('bias',))
    left = ['/'.join(k) for k in flat if k not in covered]
    if left:
        warnings.warn(
            f'{len(left)} trainable backbone leaves get no K-FAC block and so '
            f'no penalty (e.g. {", ".join(left[:3])}): K-FAC covers the '
            'kernels and biases of Dense / Conv / depthwise layers only. '
            "Use trainable=None (the default: BatchNorm frozen) or a diagonal "
            "regularizer ('ewc', 'mas') to regularize every leaf.",
            stacklevel=3,
        )


def create_state(
    apply_fn: Callable[..., jax.Array],
    params0: Params,
    *,
    num_classes: int,
    example_input: jax.Array,
    method: methods.Method = methods.METHODS['dlcft'],
    tx: optax.GradientTransformation | None = None,
    loss: LossFn | None = None,
    trainable: Any = None,
    head: Params | None = None,
    num_steps: int = 1,
    train_apply_fn: Callable[..., Any] | None = None,
    data_terms: tuple | None = None,
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
      method: the `methods.Method` record (network, data terms, penalty,
        optimizer); default DLCFT.
      tx: your own optax transformation instead of the method's
        (`method.make_optimizer()`);
        put `penalty.quadratic_penalty(kind)` first in it for a penalty of
        past tasks (its curvature is filled in here). The updates it returns
        are added to the parameters (optax's convention: include the
        learning rate and its sign).
      loss: your own `loss(logits, labels, *, class_mask, weights)` (a
        weighted mean over the batch) instead of the method's `LabelLoss`.
      trainable: which backbone leaves are trained, see `linearize.split`
        (None: the method's `network.trainable`).
      head: an initial head {'kernel': (D, C), 'bias': (C,)}; zeros if None
        (the paper's class-IL choice, which also keeps the rows of unseen
        classes at their anchor 0).
      num_steps: N_0 for the first task's schedule.
      train_apply_fn: with `network.bn_train`, the backbone in training mode,
        `(variables, x) -> (features, {'batch_stats': new statistics})`.
      data_terms: your own data terms for the step to sum instead of the
        method's (e.g. the method's plus one more: `method.terms +
        (my_term,)`).

    Returns:
      The `TrainState`.
    """
    if method.network.bn_train and train_apply_fn is None:
        raise ValueError(
            'Network.bn_train needs train_apply_fn: the backbone in '
            "training mode, e.g. lambda v, x: net.apply(v, x, train=True, "
            "mutable=['batch_stats'])."
        )
    # Own copies on the device: steps that donate the state then never
    # invalidate the caller's pre-trained variables.
    params0 = jax.tree.map(jnp.array, params0)
    if trainable is None:
        trainable = method.network.trainable
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
    tx = method.make_optimizer() if tx is None else tx
    if not method.optimizer.update_untouched_outputs:
        tx = keep_untouched_outputs(tx)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        task=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        params=params,
        # A copy, not the same buffers: a step that donates its input state
        # must not see one buffer twice.
        centre=_copy(params),
        opt_state=None,
        class_mask=jnp.ones((num_classes,), jnp.float32),
        params0=params0,
        apply_fn=apply_fn,
        tx=tx,
        method=method,
        data_terms=_terms(method, loss, data_terms),
        train_apply_fn=train_apply_fn,
    )
    opt_state = tx.init(optimizer_params(state, params))
    pen = pen_lib.find(opt_state)
    if pen is not None and pen.curvature is None:
        example = {'image': example_input}
        zero = kinds.zeros(pen.kind, model_of(state), params0, params, example)
        opt_state = pen_lib.with_curvature(opt_state, zero)
        _warn_unregularized(params, zero)
    if solvers.find(opt_state) is not None:
        example = {'image': example_input}
        opt_state = solvers.fill_factors(
            opt_state,
            lambda kind: kinds.zeros(
                kind, model_of(state), params0, params, example
            ),
        )
    opt_state = pen_lib.set_num_steps(opt_state, num_steps)
    return state.replace(opt_state=opt_state)


def _copy(tree: Params) -> Params:
    return jax.tree.map(jnp.copy, tree)


def _terms(method, loss, data_terms) -> tuple:
    """The terms the step sums: a user's, else the method's with a user's
    `loss` in place of its `LabelLoss`."""
    if data_terms is not None:
        return tuple(data_terms)
    if loss is None:
        return method.terms
    return tuple(
        dterms.labels(loss) if isinstance(t, dterms.LabelLoss) else t
        for t in method.terms
    )


def model_of(state: TrainState, *, training: bool = False) -> Model:
    """The `Model` of the state's method (`training`: with the
    BatchNorm-training backbone when `network.bn_train`)."""
    net = state.method.network
    train_fn = state.train_apply_fn if training and net.bn_train else None
    return Model(
        state.apply_fn,
        net.linearized,
        state.method.loss,
        net.grad_mode,
        train_fn,
    )


def features(state: TrainState, params: Params, x: jax.Array) -> jax.Array:
    """z = g_lin(x; ψ0 + Δψ) (DLCFT) or g(x; ψ0 + Δψ) (non-linear)."""
    return model_of(state).features(state.params0, params, x)


def apply_model(state: TrainState, params: Params, x: jax.Array) -> jax.Array:
    """f = W̄ᵀ[z; 1], the head kept exact on top of the (linearized) backbone."""
    return model_of(state).logits(state.params0, params, x)


def optimizer_params(state: TrainState, params: Params) -> Params:
    """What the optimizer (penalty, coupled L2) sees: Δψ (linearized, so L2
    pulls toward ψ0) or ψ0 + Δψ (non-linear), and the head."""
    if state.method.network.linearized:
        return params
    train0 = lin.select(state.params0, params['backbone'])
    return {
        'backbone': jax.tree.map(jnp.add, params['backbone'], train0),
        'head': params['head'],
    }


def learning_rate(state: TrainState) -> jax.Array:
    """η of the next step; with `solvers.kfac_solver`, the step size α it
    solved for at the last step (NaN for a user optimizer with neither)."""
    lr = pen_lib.learning_rate(state.opt_state)
    solver = solvers.find(state.opt_state)
    if lr is None and solver is not None:
        lr = solver.rate
    return jnp.asarray(jnp.nan if lr is None else lr, jnp.float32)


def _check_batch(batch: Batch, num_classes: int) -> None:
    """Shape and dtype checks of a step's batch, at trace time (free at run
    time): a wrong batch fails here with the offending key's shapes instead
    of deep inside the loss."""
    labels = batch['label']
    chex.assert_rank(labels, 1, custom_message="batch['label']")
    chex.assert_type(labels, int, custom_message="batch['label']")
    chex.assert_equal_shape_prefix(
        [batch['image'], labels], 1, custom_message="batch['image'], ['label']"
    )
    for key in ('weight', 'label_scale', 'logit_scale'):
        if key in batch:
            chex.assert_shape(
                batch[key], labels.shape, custom_message=f'batch[{key!r}]'
            )
    for key in ('class_mask', 'logit_target', 'distill_mask'):
        if key in batch:
            chex.assert_shape(
                batch[key],
                (labels.shape[0], num_classes),
                custom_message=f'batch[{key!r}]',
            )


def step(
    state: TrainState, batch: Batch, *, axis_name: str | None = None
) -> tuple[TrainState, Metrics]:
    """One optimization step of the current task (pure, per device).

    Args:
      state: the `TrainState`.
      batch: {'image': inputs for `apply_fn`, 'label': (B,) int32} and
        optionally:
        'class_mask' (B, C): per-example active outputs (task-IL heads);
        'weight' (B,): example weights (the means below become weighted);
        'label_scale' (B,): s_n, the label loss becomes mean_n s_n ℓ_n (DER
          and DER++ weigh current and replayed rows with it);
        'logit_target' (B, C) and 'logit_scale' (B,): adds mean_n u_n ·
          mean_c (f_nc − z_nc)² (DER's term on logits stored at insertion);
        'distill_mask' (B, C): the old outputs of LwF's `Distillation`
          (default: the active outputs).
      axis_name: the mapped axis to average gradients and metrics over, when
        the step runs under `pmap` or `shard_map`; None on one device.

    Returns:
      (new_state, metrics): metrics is a flat dict of scalars: 'loss' (the
      objective J_t), 'data_loss' (L_t), 'penalty' (R: the quadratic penalty
      or LwF's distillation term), 'accuracy', 'grad_norm' (of the gradient
      given to the optimizer), 'learning_rate'.
    """
    _check_batch(batch, state.class_mask.shape[0])
    x, labels = batch['image'], batch['label']
    class_mask = batch.get('class_mask', state.class_mask)
    weights = batch.get('weight')
    t = state.task.astype(jnp.float32)
    n = labels.shape[0]
    terms = state.data_terms
    model = model_of(state, training=True)

    teacher = None
    if dterms.needs_teacher(terms):
        # The previous model's outputs; skipped at t = 0 (weight t = 0).
        num_out = state.class_mask.shape[0]
        teacher = jax.lax.cond(
            state.task > 0,
            lambda: apply_model(state, state.centre, x),
            lambda: jnp.zeros((n, num_out), jnp.float32),
        )
    ctx = dterms.Context(class_mask, weights, teacher)

    # Per-step randomness (stochastic depth, the solver's pseudo-targets):
    # a pure function of (task, step).
    rng = jax.random.fold_in(jax.random.key(state.task), state.step)

    def objective(params):
        logits, stats = model.train_logits(
            state.params0, params, x, jax.random.fold_in(rng, 1)
        )
        data = dterms.current(terms, logits, batch, ctx)
        reg = jnp.zeros((), jnp.float32)
        total = data
        if dterms.any_past(terms):
            reg = dterms.past(terms, logits, batch, ctx)
            total = (data + t * reg) / (t + 1.0)
        return total, (logits, data, reg, stats)

    (total, (logits, data, reg, stats)), grads = jax.value_and_grad(
        objective, has_aux=True
    )(state.params)
    acc = losses.accuracy(
        logits, labels, class_mask=class_mask, weights=weights
    )
    if axis_name is not None:
        grads, total, data, reg, acc = jax.lax.pmean(
            (grads, total, data, reg, acc), axis_name
        )
        if stats is not None:
            stats = jax.lax.pmean(stats, axis_name)

    lr = learning_rate(state)
    opt_params = optimizer_params(state, state.params)
    extra = {}
    if solvers.find(state.opt_state) is not None:
        # A curvature-aware solver in the chain: what it may ask of the batch.
        pen = pen_lib.find(state.opt_state)
        extra['solver_context'] = solvers.solver_context(
            model_of(state),
            state.params0,
            state.params,
            batch,
            class_mask=class_mask,
            weights=weights,
            rng=rng,
            past_curvature=None if pen is None else pen.curvature,
            num_tasks=t,
            axis_name=axis_name,
        )
    updates, opt_state = state.tx.update(
        grads, state.opt_state, opt_params, **extra
    )
    params = optax.apply_updates(state.params, updates)
    pen = pen_lib.find(opt_state)
    if pen is not None:
        reg = pen.last_value
        total = (data + t * reg) / (t + 1.0)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state
    )
    if stats is not None:
        new_state = new_state.replace(
            params0={**state.params0, 'batch_stats': stats}
        )
    metrics = {
        'loss': total,
        'data_loss': data,
        'penalty': reg,
        'accuracy': acc,
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': lr,
    }
    return new_state, metrics


def begin_task(
    state: TrainState, *, num_steps: int, class_mask: jax.Array | None = None
) -> TrainState:
    """Starts a task: fresh optimizer moments, schedule of N_t steps.

    The penalty's state (anchor θ_{t−1}, curvature, task count) is carried
    over into the fresh optimizer state. `class_mask` activates the outputs
    of the classes seen so far (class-IL) and keeps the shape of the head
    fixed, so no step is recompiled when classes arrive; the rows of new
    classes are still at their anchor 0 and share the head curvature
    (docs/method.md §5.7).

    Args:
      state: the state after the previous task.
      num_steps: N_t (an int, or an int32 array: a traced N_t lets one
        compiled `begin_task` serve tasks of every length).
      class_mask: (C,) active outputs, or None to keep the current mask.

    Returns:
      The state ready for `step`.
    """
    if isinstance(num_steps, int) and num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
    mask = (
        state.class_mask
        if class_mask is None
        else jnp.asarray(class_mask, jnp.float32).reshape(
            state.class_mask.shape
        )
    )
    fresh = state.tx.init(optimizer_params(state, state.params))
    opt_state = solvers.carry_over(fresh, state.opt_state)
    opt_state = pen_lib.carry_over(opt_state, state.opt_state)
    opt_state = pen_lib.set_num_steps(opt_state, num_steps)
    return state.replace(
        step=jnp.zeros((), jnp.int32),
        num_steps=jnp.asarray(num_steps, jnp.int32),
        opt_state=opt_state,
        class_mask=mask,
    )


def curvature_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    axis_name: str | None = None,
) -> kinds.Curvature:
    """The penalty's curvature of one batch at the current parameters.

    `batch` may carry 'weight' (B,) (0 for padding rows: they do not enter
    the statistics) and 'class_mask'.
    """
    pen = pen_lib.find(state.opt_state)
    if pen is None:
        raise ValueError(
            'This state has no penalty (regularizer none, or a user tx without '
            'penalty.quadratic_penalty): there is no curvature to estimate.'
        )
    return pen.kind.batch(
        model_of(state),
        state.params0,
        state.params,
        batch,
        rng,
        class_mask=batch.get('class_mask', state.class_mask),
        axis_name=axis_name,
    )


_curvature_step_jit = jax.jit(curvature_step)
_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
_scale = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a))


def estimate_curvature(
    state: TrainState,
    batches: Iterable[Batch],
    rng: jax.Array,
    stats_fn: Callable[..., Any] | None = None,
    *,
    add_fn: Callable[[Any, Any], Any] | None = None,
    scale_fn: Callable[[Any, float], Any] | None = None,
) -> kinds.Curvature:
    """Averages `curvature_step` over batches of the task just trained.

    Args:
      state: the state at the end of the task.
      batches: an iterable of batches (the paper uses 1000 batches of 64 with
        training augmentation); a 'weight' of 0 marks padding rows.
      rng: PRNG key; folded with the batch index for the pseudo-targets.
      stats_fn: the per-batch function (default: jitted `curvature_step`;
        `parallel.pmap_curvature_fns` gives the pmapped set).
      add_fn, scale_fn: how two statistics are added and one is scaled
        (default: jitted tree maps; pmapped ones for replicated states).

    Returns:
      The task's curvature (the kind's value type).
    """
    fn = stats_fn or _curvature_step_jit
    add, scale = add_fn or _add, scale_fn or _scale
    total, n = None, 0
    for i, batch in enumerate(batches):
        stats = fn(state, batch, jax.random.fold_in(rng, i))
        total = stats if total is None else add(total, stats)
        n += 1
    if n == 0:
        raise ValueError('estimate_curvature got no batches.')
    return scale(total, 1.0 / n)


def end_task(
    state: TrainState, task_curvature: kinds.Curvature | None
) -> TrainState:
    """Finishes task t: H̄ ← (t·H̄ + H_t)/(t+1), θ_t becomes the anchor and
    LwF's teacher, t += 1."""
    opt_state = state.opt_state
    if pen_lib.find(opt_state) is not None:
        opt_state = pen_lib.end_task(
            opt_state, optimizer_params(state, state.params), task_curvature
        )
    return state.replace(
        opt_state=opt_state, centre=_copy(state.params), task=state.task + 1
    )


def predict(state: TrainState, x: jax.Array) -> jax.Array:
    """Logits of the current model (mask inactive classes before arg-max)."""
    return apply_model(state, state.params, x)
