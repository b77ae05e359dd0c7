"""Every method the runner knows, as a composition of the library's parts.

`--config.method=NAME` picks one row of `METHODS`. A method is a
`dlcft_jax.MethodConfig` preset (model, loss, regularizer, optimizer) plus
what the runner adds around the step: the replay buffer and how its rows
enter the loss, joint training on the union of the tasks, or a
training-free classifier on frozen features.

Published defaults (what each preset sets; the benchmark config fixes the
batch, the replay batch, the buffer, the steps and the augmentation, the
same for every method so that comparisons are fair):

* `dlcft`: linearized backbone + α-MSE (α = 15) + K-FAC of the linearized
  model and the exact head block, Adam 1e-4, L2 1e-5, clip 1, proximal 1e-4,
  linear decay per task (Shon et al., 2022; the authors' code). Class-IL adds
  the benchmark's reservoir buffer (labels replayed in the same MSE).
* `finetune` / `finetune_mse`: the non-linear network with SCE / α-MSE, no
  penalty, SGD momentum 0.9, lr 1e-3, L2 1e-5 (the paper's non-linear
  baselines).
* `joint`: the upper bound: DLCFT's model (linearized + MSE, Adam) trained
  once on the union of all tasks for the sequence's total number of steps
  (the authors' oracle script trains the linearized MSE model jointly).
* `joint_finetune`: the non-linear bound: `finetune`'s network, loss and
  optimizer trained once on the union of all tasks for the same number of
  steps (what linearizing costs, next to `joint`).
* `ewc`: diagonal true Fisher (one label sampled per example), penalty
  ½ Σ F (θ − θ*)², objective (L + t·R)/(t+1), non-linear + SCE, SGD 0.9 /
  1e-3 (Kirkpatrick et al., 2017; the authors' `EWCRegularizer`).
* `mas`: Ω = E |∂‖f(x)‖²/∂θ|, same weighting and optimizer (Aljundi et al.,
  2018).
* `lwf`: distillation on the current inputs from the previous model, KL of
  its softmax (T = 1) over the old outputs, weight t, (L + t·R)/(t+1),
  non-linear + SCE, SGD 0.9 / 1e-3 (Li & Hoiem, 2016, as in the authors'
  code); `lwf_mse`: ½‖f − f_old‖² with the α-MSE loss.
* `osla`: the K-FAC Laplace penalty of the non-linear network with SCE and
  categorical pseudo-labels (Ritter et al., 2018; the authors' METHOD=KFAC,
  LINEARIZED=False, LOSS_FN=SCE), SGD 0.9 / 1e-3.
* The ablation grid of the paper (docs/method.md §8.7, §9.3), all with K-FAC:
  `kfac_lin_mse` (= dlcft), `kfac_lin_sce`, `kfac_nonlin_mse`,
  `kfac_nonlin_sce` (= osla). The linearized ones use DLCFT's Adam 1e-4, the
  non-linear ones SGD 0.9 / 1e-3 (the authors' pairing of optimizer and
  model).
* `er`, `der`, `derpp` with Mammoth's semantics (Buzzega et al., 2020;
  github.com/aimagelab/mammoth): reservoir buffer filled from the stream
  (every training batch is offered to it, in order), raw images stored and
  augmented on read, plain SGD (no momentum, no weight decay, no clipping),
  lr 0.03, every weight trained, BatchNorm in training mode (statistics
  updated); the replay batch is drawn independently of the current one.
  ER: CE on the current and replayed rows together. DER: CE on the current
  rows + α · mean (f − z)² on replayed rows, z the logits stored at
  insertion (α = 0.3). DER++: DER (α = 0.1) + β · CE on a second replayed
  batch (β = 0.5). Mammoth's default batch and replay batch are 32 (set by
  the benchmark here, as for every other method).
* `ncm`: the class means of frozen pre-trained features (cosine by default;
  SimpleCIL, Zhou et al., 2023); `ranpac`: a fixed random ReLU projection and
  a ridge classifier accumulated task by task in closed form, the ridge
  chosen on a 20 % held-out split of the first task (McDonnell et al.,
  2023, without its first-session adaptation). No training, no forgetting
  of the features; seconds to run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

import dlcft_jax as dj
from experiments.cli import ConfigError

SETTINGS = ('class_il', 'task_il', 'data_il')


@dataclasses.dataclass(frozen=True)
class Method:
    """What `--config.method=NAME` runs.

    Attributes:
      preset: builds the `MethodConfig` from keyword overrides.
      replay: 'labels' (replayed rows share the label loss: ER, DLCFT),
        'der' or 'derpp' (logits stored at insertion), or 'none' (the
        benchmark's buffer is not used).
      insert: when examples enter the buffer: 'task_end' (all of a task's
        training examples are offered after it) or 'stream' (every training
        batch is offered after its step, Mammoth's way).
      needs_buffer: the method is defined by its buffer (ER, DER, DER++).
      joint: train once on the union of all tasks.
      training_free: 'ncm' or 'ranpac' (no step at all), else None.
      trainable: which backbone leaves train (None: conv/dense kernels and
        biases; 'all': every weight, BatchNorm scale and bias included).
      bn_train: BatchNorm statistics updated in training (non-linear only).
      adam: the method uses DLCFT's Adam (its learning rate follows
        `config.optim.adam_learning_rate`).
    """

    preset: Callable[..., dj.MethodConfig]
    replay: str = 'labels'
    insert: str = 'task_end'
    needs_buffer: bool = False
    joint: bool = False
    training_free: str | None = None
    trainable: str | None = None
    bn_train: bool = False
    adam: bool = False


def _preset(base: Callable[..., dj.MethodConfig], **fixed):
    return lambda **kw: base(**{**fixed, **kw})


def _mammoth(**fixed):
    return _preset(
        dj.MethodConfig.finetune,
        learning_rate=0.03,
        momentum=0.0,
        weight_decay=0.0,
        clip_norm=0.0,
        schedule='constant',
        **fixed,
    )


def _buffer_method(replay: str) -> Method:
    """ER / DER / DER++: Mammoth's optimizer, stream insertion, every weight
    trained, BatchNorm statistics trained."""
    return Method(
        _mammoth(),
        replay=replay,
        insert='stream',
        needs_buffer=True,
        trainable='all',
        bn_train=True,
    )


_LIN = dict(linearized=True, optimizer='adam', learning_rate=1e-4)

METHODS: dict[str, Method] = {
    'dlcft': Method(dj.MethodConfig.dlcft, adam=True),
    'finetune': Method(dj.MethodConfig.finetune),
    'finetune_mse': Method(dj.MethodConfig.finetune_mse),
    'joint': Method(
        _preset(dj.MethodConfig.dlcft, regularizer='none', proximal=0.0),
        replay='none',
        joint=True,
        adam=True,
    ),
    'joint_finetune': Method(
        dj.MethodConfig.finetune, replay='none', joint=True
    ),
    'ewc': Method(dj.MethodConfig.ewc),
    'mas': Method(dj.MethodConfig.mas),
    'lwf': Method(dj.MethodConfig.lwf),
    'lwf_mse': Method(_preset(dj.MethodConfig.lwf, loss='mse')),
    'osla': Method(dj.MethodConfig.osla),
    'kfac_lin_mse': Method(dj.MethodConfig.dlcft, adam=True),
    'kfac_lin_sce': Method(
        _preset(dj.MethodConfig.osla, loss='ce', **_LIN), adam=True
    ),
    'kfac_nonlin_mse': Method(_preset(dj.MethodConfig.osla, loss='mse')),
    'kfac_nonlin_sce': Method(dj.MethodConfig.osla),
    'er': _buffer_method('labels'),
    'der': _buffer_method('der'),
    'derpp': _buffer_method('derpp'),
    'ncm': Method(dj.MethodConfig.finetune, replay='none', training_free='ncm'),
    'ranpac': Method(
        dj.MethodConfig.finetune, replay='none', training_free='ranpac'
    ),
}

#: DER's α of each DER method (Mammoth's best-buffer-200 defaults).
DER_ALPHA = {'der': 0.3, 'derpp': 0.1}


def get(name: str) -> Method:
    """The `Method` called `name` (KeyError if unknown)."""
    return METHODS[name]


# ----------------------------------------------------------------------------
# A config's method: its MethodConfig and its replay sizes.


def method_config(config: ml_collections.ConfigDict) -> dj.MethodConfig:
    """The `MethodConfig` of `config.method`, with the config's overrides."""
    method = get(config.method)
    o = config.optim
    overrides: dict[str, Any] = {'alpha': o.alpha}
    for key, name in (
        ('optimizer', 'name'),
        ('learning_rate', 'learning_rate'),
        ('proximal', 'proximal'),
        ('weight_decay', 'weight_decay'),
        ('clip_norm', 'clip_norm'),
        ('schedule', 'schedule'),
    ):
        if o[name] is not None:
            overrides[key] = o[name]
    if method.adam and o.learning_rate is None and o.adam_learning_rate:
        overrides['learning_rate'] = o.adam_learning_rate
    mcfg = method.preset(**overrides)
    fields: dict[str, Any] = {}
    if mcfg.regularizer in ('kfac', 'tkfac'):
        fields['regularizer'] = config.curvature.kind
    if mcfg.regularizer != 'none':
        fields['penalty_every'] = config.curvature.penalty_every
    # Task-IL heads are separate per task and not regularized
    # (docs/method.md §4.1).
    fields['regularize_head'] = config.setting != 'task_il'
    bn_train = config.baselines.bn_train
    fields['bn_train'] = method.bn_train if bn_train is None else bn_train
    if mcfg.distill != 'none':
        fields['distill_temperature'] = config.baselines.lwf_temperature
        if config.setting == 'task_il':
            fields['distill_group_size'] = (
                len(config.data.class_groups[0])
                if config.data.class_groups is not None
                else config.data.classes_per_task
            )
    try:
        return dataclasses.replace(mcfg, **fields)
    except ValueError as e:
        raise ConfigError(
            f'config.method={config.method!r}: {e} (see config.baselines.'
            'bn_train and config.optim).'
        ) from None


def buffer_size(config: ml_collections.ConfigDict) -> int:
    """The reservoir's capacity: the config's, or the setting's default
    (200 in class-IL and for the buffer methods, else 0)."""
    if config.replay.buffer_size is not None:
        return config.replay.buffer_size
    method = get(config.method)
    if method.replay == 'none':  # joint and the training-free methods too
        return 0
    return 200 if config.setting == 'class_il' or method.needs_buffer else 0


def replay_batch(config: ml_collections.ConfigDict) -> int:
    """Replayed examples per draw (0 when replay is off)."""
    if get(config.method).replay == 'none':
        return 0
    if buffer_size(config) == 0 or config.replay.batch_size == 0:
        return 0
    return config.replay.batch_size


def replay_draws(config: ml_collections.ConfigDict) -> int:
    """Replay draws per step: none, one, or two for DER++."""
    if not replay_batch(config):
        return 0
    return 2 if get(config.method).replay == 'derpp' else 1


def insert_mode(config: ml_collections.ConfigDict) -> str:
    """When examples enter the buffer: 'stream' or 'task_end'."""
    return config.replay.insert or get(config.method).insert
