"""Checks of a continual run's configuration, before any work is done.

Each check ends the run with one `ConfigError` naming the field and what to
change (`experiments/cli.py` prints it and exits with status 2).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import jax
import ml_collections

from dlcft_jax import prototypes
from experiments import methods
from experiments.cli import ConfigError, need

_METHODS = tuple(methods.METHODS)

# The backbones, each with the total stride of its feature map: a smaller
# image leaves the last stage without a single pixel of its own.
MIN_IMAGE_SIZE = {
    'efficientnet_lite0': 32,
    'resnet18': 32,
    'resnet50': 32,
    'cifar_resnet18': 8,
    'small_cnn': 8,
}


def _did_you_mean(value, choices) -> str:
    close = difflib.get_close_matches(str(value), tuple(choices), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    """Learning rates and α positive; decay, clipping and damping not
    negative (None: the method's own value)."""
    o = config.optim
    for name in ('learning_rate', 'adam_learning_rate'):
        need(
            o[name] is None or o[name] > 0,
            f'config.optim.{name}={o[name]} must be > 0 (None: the '
            "method's default).",
        )
    need(
        o.alpha > 0,
        f'config.optim.alpha={o.alpha} must be > 0 (the label scale; the '
        'paper: 15).',
    )
    for name in ('weight_decay', 'clip_norm', 'proximal'):
        need(
            o[name] is None or o[name] >= 0,
            f'config.optim.{name}={o[name]} must be >= 0 (0: off; None: '
            "the method's default).",
        )
    need(
        o.name in (None, 'adam', 'sgd'),
        f'config.optim.name={o.name!r} is unknown; use None (the '
        "method's), 'adam' or 'sgd'.",
    )
    need(
        o.schedule in (None, 'linear', 'constant'),
        f'config.optim.schedule={o.schedule!r} is unknown; use None (the '
        "method's), 'linear' or 'constant'.",
    )


def check_workdir(workdir: str) -> None:
    """The work directory is a folder this process can write (created if
    missing)."""
    path = Path(workdir)
    need(
        not path.exists() or path.is_dir(),
        f'--workdir={workdir} is a file; give a folder (new or a run\'s).',
    )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f'--workdir={workdir} cannot be created ({e.strerror}); choose '
            'a folder you can write.'
        ) from None
    need(
        os.access(path, os.W_OK | os.X_OK),
        f'--workdir={workdir} is not writable; choose a folder you can write.',
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first field the run cannot use."""
    need(
        config.setting in methods.SETTINGS,
        f'config.setting={config.setting!r} is unknown; use one of '
        f'{methods.SETTINGS}.',
    )
    need(
        config.method in _METHODS,
        f'config.method={config.method!r} is unknown'
        + _did_you_mean(config.method, _METHODS)
        + f'; use one of {_METHODS}.',
    )
    need(
        config.data.num_tasks >= 1 and config.data.classes_per_task >= 1,
        'config.data.num_tasks and config.data.classes_per_task must be >= 1.',
    )
    need(
        config.train.batch_size >= 1 and config.train.steps_per_task >= 1,
        'config.train.batch_size and config.train.steps_per_task must be >= 1.',
    )
    need(
        config.train.trainable in (None, 'none', 'all'),
        f'config.train.trainable={config.train.trainable!r} is unknown; use '
        "None (the method's), 'none' (the head only) or 'all'.",
    )
    need(
        config.backbone.bn_reestimate >= 0,
        'config.backbone.bn_reestimate must be >= 0 (batches; 0 is off).',
    )
    need(
        0.0 <= config.data.validation < 1.0,
        f'config.data.validation={config.data.validation} must be 0 (test on '
        'the test set) or a share in (0, 1) of the training set to hold out.',
    )
    need(
        config.train.first_task_multiplier >= 1,
        'config.train.first_task_multiplier must be >= 1.',
    )
    need(
        config.train.log_every >= 1 and config.eval.batch_size >= 1,
        'config.train.log_every and config.eval.batch_size must be >= 1.',
    )
    need(
        (config.replay.buffer_size is None or config.replay.buffer_size >= 0)
        and config.replay.batch_size >= 0,
        'config.replay.buffer_size and config.replay.batch_size must be >= 0.',
    )
    need(
        config.curvature.kind in ('kfac', 'tkfac'),
        "config.curvature.kind must be 'kfac' or 'tkfac'.",
    )
    need(
        config.curvature.num_batches >= 1
        and config.curvature.batch_size >= 1
        and config.curvature.penalty_every >= 1,
        'config.curvature.num_batches, batch_size and penalty_every must be '
        '>= 1.',
    )
    name = config.backbone.name
    need(
        name in MIN_IMAGE_SIZE,
        f'config.backbone.name={name!r} is unknown'
        + _did_you_mean(name, MIN_IMAGE_SIZE)
        + f'; use one of {tuple(MIN_IMAGE_SIZE)}.',
    )
    need(
        config.backbone.image_size >= MIN_IMAGE_SIZE[name],
        f'config.backbone.image_size={config.backbone.image_size} is too '
        f'small for {name}, which downsamples by {MIN_IMAGE_SIZE[name]}; '
        f'use at least {MIN_IMAGE_SIZE[name]}.',
    )
    _check_optimizer(config)
    method = methods.resolve(config)
    need(
        config.setting != 'task_il'
        or method.replay.required
        or not config.replay.buffer_size,
        f'config.replay.buffer_size={config.replay.buffer_size} with '
        f'setting task_il and method {config.method!r}: task-IL runs replay '
        'only for er, der and derpp (the paper\'s task-IL methods run '
        'without a buffer); set config.replay.buffer_size=0 or None.',
    )
    need(
        config.train.stop_after_tasks is None
        or config.train.stop_after_tasks >= 1,
        'config.train.stop_after_tasks must be None or >= 1.',
    )
    need(
        config.checkpoint.every_steps >= 0
        and config.checkpoint.max_to_keep >= 1,
        'config.checkpoint.every_steps must be >= 0 and max_to_keep >= 1.',
    )
    need(
        not method.replay.required or methods.replay_batch(config, method) > 0,
        f'config.method={config.method!r} replays from a buffer; set '
        'config.replay.buffer_size and config.replay.batch_size > 0 (e.g. '
        '200 and 32, Mammoth\'s defaults).',
    )
    need(
        config.replay.insert in (None, 'stream', 'task_end'),
        "config.replay.insert must be None (the method's), 'stream' or "
        "'task_end'.",
    )
    need(
        config.baselines.ncm_metric in prototypes.NCM_METRICS,
        f'config.baselines.ncm_metric must be one of {prototypes.NCM_METRICS}.',
    )
    need(
        config.baselines.ranpac_dim >= 1
        and 0 < config.baselines.ranpac_holdout < 1,
        'config.baselines.ranpac_dim must be >= 1 and ranpac_holdout in '
        '(0, 1).',
    )
    groups = config.data.class_groups
    if groups is not None:
        sizes = {len(g) for g in groups}
        need(
            len(groups) == config.data.num_tasks and len(sizes) == 1,
            f'config.data.class_groups has {len(groups)} groups of sizes '
            f'{sorted(sizes)}; give config.data.num_tasks='
            f'{config.data.num_tasks} groups of equal size.',
        )
        flat = [c for g in groups for c in g]
        need(
            len(set(flat)) == len(flat),
            'config.data.class_groups repeats a class; each class may appear '
            'once.',
        )


def check_devices(config: ml_collections.ConfigDict) -> None:
    """The global batches must split evenly over all devices."""
    n = jax.device_count()
    method = methods.resolve(config)
    per_step = config.train.batch_size + methods.replay_batch(
        config, method
    ) * methods.replay_draws(config, method)
    if per_step % n:
        raise ConfigError(
            f'The global batch train.batch_size + replayed rows '
            f'(replay.batch_size, twice for derpp) = {per_step} does not '
            f'divide by the {n} devices; choose sizes whose sum is a '
            f'multiple of {n}.'
        )
    if config.curvature.batch_size % n:
        raise ConfigError(
            f'config.curvature.batch_size={config.curvature.batch_size} does '
            f'not divide by the {n} devices; use a multiple of {n}.'
        )
