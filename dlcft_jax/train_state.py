"""Training state and the per-device step, built from composable parts.

A method is a composition of four parts, each replaceable on its own:

* the **model**: the linearized backbone g_lin(x; ψ0 + Δ) (DLCFT) or the
  non-linear g(x; ψ0 + Δ), with an exact head f = W z + b;
* the **loss** of the current task's labels, `loss(logits, labels, *,
  class_mask, weights)`: the α-scaled one-hot MSE or softmax cross-entropy
  (`dlcft_jax.losses`), or a user's own; plus two optional data terms that
  the batch switches on: replayed logits (DER's ‖f − z_stored‖²) and
  distillation from the previous model (LwF);
* the **penalty** of past tasks, an optax transformation
  (`dlcft_jax.penalty.quadratic_penalty`) over a curvature kind
  (`dlcft_jax.curvature_kinds`: K-FAC, trace-restricted K-FAC, EWC, MAS);
* the **optimizer**, any optax chain; `make_optimizer` builds the paper's:
  penalty → clip → coupled L2 → Adam or SGD → per-task linear decay.

`MethodConfig` names a composition (its presets are the paper's methods),
and `create_state(..., tx=..., loss=...)` accepts a user's own optimizer and
loss instead. The state is an explicit pytree (`TrainState`).

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

import dataclasses
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
from dlcft_jax import losses
from dlcft_jax import penalty as pen_lib
from dlcft_jax.model import Model, head_apply  # noqa: F401 (re-exported)

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[..., jax.Array]

REGULARIZERS = ('kfac', 'tkfac', 'ewc', 'mas', 'none')
DISTILL = ('none', 'kl', 'mse')


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Static description of a method (hashable: it is part of the jit key).

    Attributes:
      linearized: train g_lin (DLCFT) instead of the non-linear network.
      loss: 'mse' (α-scaled one-hot) or 'ce' (softmax cross-entropy).
      alpha: the MSE label scale α.
      regularizer: the curvature kind of the penalty: 'kfac', 'tkfac'
        (trace-restricted), 'ewc' (diagonal true Fisher), 'mas' (MAS
        importance) or 'none'.
      proximal: κ of the proximal damping κ(θ − θ_{t−1}) added to the gradient
        (0 disables it; only with a regularizer).
      penalty_every: compute the penalty's curvature product every this many
        steps and reuse it in between (1: every step, exact; see
        `penalty.quadratic_penalty`).
      distill: LwF's term on the current inputs, weighted like a penalty,
        (L + t·R)/(t+1): 'kl' (KL of the previous model's softmax to the
        current one), 'mse' (½‖f − f_old‖²) or 'none'.
      distill_temperature: softmax temperature of 'kl' (1: the authors'
        code's, docs/method.md §8.5).
      distill_group_size: > 0: the 'kl' softmax is taken within consecutive
        blocks of this many outputs (task-IL heads); 0: over all active ones.
      bn_train: non-linear network only: BatchNorm uses batch statistics and
        updates its running averages in training (Mammoth's practice; the
        paper's DLCFT freezes them).
      optimizer: 'adam' or 'sgd' (heavy-ball momentum; momentum 0 is plain
        SGD).
      learning_rate: η at the start of each task.
      schedule: 'linear' (to 0 at the end of the task) or 'constant'.
      momentum: SGD momentum.
      b1, b2, eps: Adam's parameters.
      weight_decay: coupled L2 coefficient λ.
      clip_norm: global-norm clipping threshold (0 disables it).
      grad_mode: 'jvp' or 'vjp', see `linearization.tangent_apply`.
      regularize_head: include the head in the penalty (False for task-IL,
        whose per-task heads the paper leaves unregularized).
      update_untouched_outputs: also update the head outputs that no data
        term of the batch touches (other tasks' heads in task-IL, classes
        not seen yet in class-IL). False (default): their rows stay put;
        otherwise weight decay alone would move them, by up to η per step
        through Adam's normalisation (the authors' task-IL code decays only
        the current head).
    """

    linearized: bool = True
    loss: str = 'mse'
    alpha: float = losses.ALPHA
    regularizer: str = 'kfac'
    proximal: float = 1e-4
    penalty_every: int = 1
    distill: str = 'none'
    distill_temperature: float = 1.0
    distill_group_size: int = 0
    bn_train: bool = False
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
    update_untouched_outputs: bool = False

    def __post_init__(self):
        checks = [
            (
                self.loss in ('mse', 'ce'),
                f"loss must be 'mse' or 'ce', got {self.loss!r}",
            ),
            (
                self.regularizer in REGULARIZERS,
                f'regularizer must be one of {REGULARIZERS}, got '
                f'{self.regularizer!r}',
            ),
            (
                self.distill in DISTILL,
                f'distill must be one of {DISTILL}, got {self.distill!r}',
            ),
            (
                self.optimizer in ('adam', 'sgd'),
                f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}",
            ),
            (
                self.schedule in ('linear', 'constant'),
                "schedule must be 'linear' or 'constant', got "
                f'{self.schedule!r}',
            ),
            (self.learning_rate > 0, 'learning_rate must be > 0'),
            (self.penalty_every >= 1, 'penalty_every must be >= 1'),
            (
                self.weight_decay >= 0
                and self.proximal >= 0
                and self.clip_norm >= 0
                and self.momentum >= 0,
                'weight_decay, proximal, clip_norm and momentum must be >= 0',
            ),
            (
                self.distill_temperature > 0 and self.distill_group_size >= 0,
                'distill_temperature must be > 0 and distill_group_size >= 0',
            ),
            (
                self.grad_mode in ('vjp', 'jvp'),
                f"grad_mode must be 'vjp' or 'jvp', got {self.grad_mode!r}",
            ),
            (
                not (self.bn_train and self.linearized),
                'bn_train needs the non-linear network (linearized=False): '
                'the linearized model is defined at fixed BatchNorm '
                'statistics',
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f'MethodConfig: {msg}.')

    # -- presets: the paper's methods (docs/method.md §7, §8) --------------

    @classmethod
    def dlcft(cls, **overrides) -> MethodConfig:
        """Linearized + MSE + K-FAC, Adam 1e-4, L2 1e-5, clip 1, κ 1e-4."""
        return cls(**overrides)

    @classmethod
    def finetune(cls, **overrides) -> MethodConfig:
        """Plain fine-tuning: non-linear network, cross-entropy, no penalty,
        SGD momentum 0.9, lr 1e-3 (the paper's non-linear baselines)."""
        return cls._nonlinear(dict(loss='ce', regularizer='none'), overrides)

    @classmethod
    def finetune_mse(cls, **overrides) -> MethodConfig:
        """Fine-tuning of the non-linear network with the α-MSE loss."""
        return cls._nonlinear(dict(loss='mse', regularizer='none'), overrides)

    @classmethod
    def ewc(cls, **overrides) -> MethodConfig:
        """EWC (Kirkpatrick et al., 2017) as in the authors' code: diagonal
        true Fisher, (L + t·R)/(t+1), non-linear + SCE, SGD 0.9, lr 1e-3."""
        return cls._nonlinear(dict(loss='ce', regularizer='ewc'), overrides)

    @classmethod
    def mas(cls, **overrides) -> MethodConfig:
        """MAS (Aljundi et al., 2018): Ω = E|∂‖f‖²/∂θ|, same weighting and
        optimizer as EWC."""
        return cls._nonlinear(dict(loss='ce', regularizer='mas'), overrides)

    @classmethod
    def lwf(cls, **overrides) -> MethodConfig:
        """LwF (Li & Hoiem, 2016) as in the authors' code: KL to the
        previous model's softmax on the current inputs, weight t,
        (L + t·R)/(t+1); non-linear + SCE, SGD 0.9, lr 1e-3. With
        loss='mse' the term is ½‖f − f_old‖² (distill='mse')."""
        kw = dict(loss='ce', regularizer='none', distill='kl')
        if overrides.get('loss') == 'mse':
            kw['distill'] = 'mse'
        return cls._nonlinear(kw, overrides)

    @classmethod
    def osla(cls, **overrides) -> MethodConfig:
        """OSLA (Ritter et al., 2018), the K-FAC Laplace penalty of the
        non-linear network with SCE: the authors' METHOD='KFAC',
        LINEARIZED=False, LOSS_FN='SCE'; SGD 0.9, lr 1e-3."""
        return cls._nonlinear(dict(loss='ce', regularizer='kfac'), overrides)

    @classmethod
    def _nonlinear(cls, kw: dict, overrides: dict) -> MethodConfig:
        base = dict(
            linearized=False,
            optimizer='sgd',
            learning_rate=1e-3,
            proximal=1e-4 if kw.get('regularizer', 'none') != 'none' else 0.0,
        )
        base.update(kw)
        base.update(overrides)
        return cls(**base)


def curvature_kind(config: MethodConfig) -> kinds.CurvatureKind | None:
    """The `curvature_kinds` estimator of `config.regularizer` (None: none)."""
    if config.regularizer == 'none':
        return None
    return kinds.KINDS[config.regularizer](config.regularize_head)


def make_optimizer(config: MethodConfig) -> optax.GradientTransformation:
    """The paper's chain: penalty → clip → coupled L2 → Adam/SGD → −η_k.

    The penalty link is present when `config.regularizer` is not 'none';
    its curvature is filled in by `create_state`.
    """
    parts = []
    kind = curvature_kind(config)
    if kind is not None:
        parts.append(
            pen_lib.quadratic_penalty(
                kind, proximal=config.proximal, every=config.penalty_every
            )
        )
    if config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if config.optimizer == 'adam':
        parts.append(optax.scale_by_adam(config.b1, config.b2, config.eps))
    elif config.momentum > 0:
        parts.append(optax.trace(decay=config.momentum))
    parts.append(
        pen_lib.per_task_schedule(config.learning_rate, config.schedule)
    )
    return optax.chain(*parts)


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

    def update(grads, state, params=None):
        head_g = grads['head']
        touched = (
            jnp.sum(jnp.abs(head_g['kernel']), 0) + jnp.abs(head_g['bias']) > 0
        ).astype(head_g['bias'].dtype)
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

    return optax.GradientTransformation(inner.init, update)


def default_loss(config: MethodConfig) -> LossFn:
    """`loss(logits, labels, *, class_mask, weights)` of `config.loss`."""
    fn = losses.loss_fn(config.loss)

    def loss(logits, labels, *, class_mask=None, weights=None):
        return fn(
            logits,
            labels,
            alpha=config.alpha,
            class_mask=class_mask,
            weights=weights,
        )

    return loss


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
      params0: the full pre-trained backbone variables ψ0 (with `bn_train`
        its BatchNorm statistics are updated by training).
      apply_fn: static, the backbone `apply_fn(variables, x) -> features`.
      tx: static, the optax transformation.
      config: static `MethodConfig`.
      loss_fn: static, `loss(logits, labels, *, class_mask, weights)`.
      train_apply_fn: static, `(variables, x) -> (features, {'batch_stats':
        ...})` in training mode (only for `config.bn_train`).
      data_terms: static, the `data_terms.DataTerm`s the step sums (None:
        those of `config`, see `data_terms_of`).
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
    config: MethodConfig = flax.struct.field(pytree_node=False)
    loss_fn: LossFn = flax.struct.field(pytree_node=False, default=None)
    train_apply_fn: Callable[..., Any] | None = flax.struct.field(
        pytree_node=False, default=None
    )
    data_terms: tuple | None = flax.struct.field(
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
    config: MethodConfig = MethodConfig(),
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
      config: the method (model, loss, regularizer, optimizer settings).
      tx: your own optax transformation instead of `make_optimizer(config)`;
        put `penalty.quadratic_penalty(kind)` first in it for a penalty of
        past tasks (its curvature is filled in here). The updates it returns
        are added to the parameters (optax's convention: include the
        learning rate and its sign).
      loss: your own `loss(logits, labels, *, class_mask, weights)` (a
        weighted mean over the batch) instead of `config.loss`.
      trainable: which backbone leaves are trained, see `linearize.split`.
      head: an initial head {'kernel': (D, C), 'bias': (C,)}; zeros if None
        (the paper's class-IL choice, which also keeps the rows of unseen
        classes at their anchor 0).
      num_steps: N_0 for the first task's schedule.
      train_apply_fn: with `config.bn_train`, the backbone in training mode,
        `(variables, x) -> (features, {'batch_stats': new statistics})`.
      data_terms: your own `data_terms.DataTerm`s for the step to sum
        instead of those of `config` (e.g. the config's plus one more:
        `data_terms_of(state) + (my_term,)`).

    Returns:
      The `TrainState`.
    """
    if config.bn_train and train_apply_fn is None:
        raise ValueError(
            'MethodConfig.bn_train needs train_apply_fn: the backbone in '
            "training mode, e.g. lambda v, x: net.apply(v, x, train=True, "
            "mutable=['batch_stats'])."
        )
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
    tx = make_optimizer(config) if tx is None else tx
    if not config.update_untouched_outputs:
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
        config=config,
        loss_fn=default_loss(config) if loss is None else loss,
        train_apply_fn=train_apply_fn,
        data_terms=None if data_terms is None else tuple(data_terms),
    )
    opt_state = tx.init(optimizer_params(state, params))
    pen = pen_lib.find(opt_state)
    if pen is not None and pen.curvature is None:
        example = {'image': example_input}
        zero = kinds.zeros(pen.kind, model_of(state), params0, params, example)
        opt_state = pen_lib.with_curvature(opt_state, zero)
        _warn_unregularized(params, zero)
    opt_state = pen_lib.set_num_steps(opt_state, num_steps)
    return state.replace(opt_state=opt_state)


def _copy(tree: Params) -> Params:
    return jax.tree.map(jnp.copy, tree)


def data_terms_of(state: TrainState) -> tuple[dterms.DataTerm, ...]:
    """The data terms of the state's method: the label loss (`loss_fn`),
    DER's logit term (on when the batch has 'logit_target') and, with
    `config.distill`, LwF's distillation weighted as a past term."""
    if state.data_terms is not None:
        return state.data_terms
    cfg = state.config
    terms = [dterms.labels(state.loss_fn), dterms.der_logits()]
    if cfg.distill != 'none':
        terms.append(
            dterms.distillation(
                cfg.distill, cfg.distill_temperature, cfg.distill_group_size
            )
        )
    return tuple(terms)


def model_of(state: TrainState, *, training: bool = False) -> Model:
    """The `Model` part of the state's method (`training`: with the
    BatchNorm-training backbone when `config.bn_train`)."""
    cfg = state.config
    train_fn = state.train_apply_fn if training and cfg.bn_train else None
    return Model(
        state.apply_fn, cfg.linearized, cfg.loss, cfg.grad_mode, train_fn
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
    if state.config.linearized:
        return params
    train0 = lin.select(state.params0, params['backbone'])
    return {
        'backbone': jax.tree.map(jnp.add, params['backbone'], train0),
        'head': params['head'],
    }


def learning_rate(state: TrainState) -> jax.Array:
    """η of the next step (NaN for a user optimizer without a schedule part)."""
    lr = pen_lib.learning_rate(state.opt_state)
    return jnp.asarray(jnp.nan if lr is None else lr, jnp.float32)


#: LwF's term (moved to `data_terms`; kept here for existing callers).
distill_loss = dterms.distill_loss


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
        'distill_mask' (B, C): the old outputs for `config.distill` (LwF;
          default: the active outputs).
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
    terms = data_terms_of(state)
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

    def objective(params):
        logits, stats = model.train_logits(state.params0, params, x)
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
    updates, opt_state = state.tx.update(grads, state.opt_state, opt_params)
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
    opt_state = pen_lib.carry_over(fresh, state.opt_state)
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
