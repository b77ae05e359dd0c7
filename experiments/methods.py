"""The runner's view of the methods: `--config.method=NAME` picks one
record of `dlcft_jax.methods.METHODS`, and `resolve(config)` applies the
config's overrides to its parts.

The records (network, data terms, penalty, optimizer, replay policy,
trainer) and their published defaults are in `dlcft_jax/methods.py`; the
docs' methods table is rendered from them (`dlcft_jax.methods.table()`).
The benchmark config fixes the batch, the replay batch, the buffer, the
steps and the augmentation, the same for every method, so that comparisons
are fair. What a config may change, part by part:

* optimizer: `config.optim.{name, learning_rate, weight_decay, clip_norm,
  schedule}`; `adam_learning_rate` is the learning rate of the records
  whose optimizer is Adam when `learning_rate` is not set;
* label loss: `config.optim.alpha` (α of the MSE);
* penalty: `config.optim.proximal`, `config.curvature.kind` (K-FAC or
  trace-restricted K-FAC for the K-FAC records), `.penalty_every`; task-IL
  leaves the head out of the penalty (docs/method.md §4.1);
* network: `config.train.trainable`, `config.baselines.bn_train`;
* distillation: `config.baselines.lwf_temperature`; task-IL takes its
  softmax within each task's head;
* replay: `config.replay.insert`, `config.baselines.der_alpha` /
  `der_beta` (DER's α, DER++'s β); the buffer's size and replay batch are
  the benchmark's (`buffer_size`, `replay_batch`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

import dlcft_jax as dj
from dlcft_jax import data_terms as dterms
from experiments.cli import ConfigError

SETTINGS = ('class_il', 'task_il', 'data_il')

METHODS = dj.METHODS


def get(name: str) -> dj.Method:
    """The record called `name` (KeyError if unknown)."""
    return METHODS[name]


def _optimizer_changes(record: dj.Method, o) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in (
        'name',
        'learning_rate',
        'weight_decay',
        'clip_norm',
        'schedule',
    ):
        if o[key] is not None:
            changes[key] = o[key]
    adam = record.optimizer.name == 'adam'
    if adam and o.learning_rate is None and o.adam_learning_rate:
        changes['learning_rate'] = o.adam_learning_rate
    return changes


def _penalty_changes(record: dj.Method, config) -> dict[str, Any] | None:
    if record.penalty is None:
        return None
    changes: dict[str, Any] = {
        'every': config.curvature.penalty_every,
        # Task-IL heads are separate per task and not regularized
        # (docs/method.md §4.1).
        'head': config.setting != 'task_il',
    }
    if record.penalty.kind in ('kfac', 'tkfac'):
        changes['kind'] = config.curvature.kind
    if config.optim.proximal is not None:
        changes['proximal'] = config.optim.proximal
    return changes


def _replay_changes(record: dj.Method, config) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if config.replay.insert is not None:
        changes['insert'] = config.replay.insert
    if config.replay.weight is not None:
        changes['label_weight'] = config.replay.weight
    b = config.baselines
    if record.replay.logit_weight > 0 and b.der_alpha is not None:
        changes['logit_weight'] = b.der_alpha
    if record.replay.second_draw_weight > 0:
        changes['second_draw_weight'] = b.der_beta
    return changes


def resolve(config: ml_collections.ConfigDict) -> dj.Method:
    """The record of `config.method` with the config's overrides."""
    record = get(config.method)
    network: dict[str, Any] = {}
    if config.train.trainable is not None:
        network['trainable'] = config.train.trainable
    if config.baselines.bn_train is not None:
        network['bn_train'] = config.baselines.bn_train
    group = 0
    if config.setting == 'task_il':
        group = (
            len(config.data.class_groups[0])
            if config.data.class_groups is not None
            else config.data.classes_per_task
        )
    try:
        method = record.replace(
            network=network,
            penalty=_penalty_changes(record, config),
            optimizer=_optimizer_changes(record, config.optim),
            replay=_replay_changes(record, config),
        )
        if config.solver.closed_form_head is not None:
            method = method.replace(
                closed_form_head=config.solver.closed_form_head
            )
        method = method.replace_terms(
            dterms.LabelLoss, alpha=config.optim.alpha
        )
        if config.baselines.all_outputs is not None:
            method = method.replace_terms(
                dterms.LabelLoss, all_outputs=config.baselines.all_outputs
            )
        return method.replace_terms(
            dterms.Distillation,
            temperature=config.baselines.lwf_temperature,
            group_size=group,
        )
    except ValueError as e:
        raise ConfigError(
            f'config.method={config.method!r}: {e} (see config.baselines, '
            'config.train and config.optim).'
        ) from None


def buffer_size(config: ml_collections.ConfigDict, method: dj.Method) -> int:
    """The reservoir's capacity: the config's, or the setting's default
    (200 in class-IL and for the methods defined by a buffer, else 0)."""
    if not method.replay.enabled:  # joint and the training-free methods
        return 0
    if config.replay.buffer_size is not None:
        return config.replay.buffer_size
    needed = config.setting == 'class_il' or method.replay.required
    return 200 if needed else 0


def replay_batch(config: ml_collections.ConfigDict, method: dj.Method) -> int:
    """Replayed examples per draw (0 when replay is off)."""
    if buffer_size(config, method) == 0:
        return 0
    return config.replay.batch_size


def replay_draws(config: ml_collections.ConfigDict, method: dj.Method) -> int:
    """Replay draws per step: none, one, or two for DER++."""
    return method.replay.draws if replay_batch(config, method) else 0
