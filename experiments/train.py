"""`train_and_evaluate(config, workdir)`: one continual fine-tuning run.

Order of a run (each task t = 0 .. T−1):
  1. `begin_task`: fresh optimizer moments, N_t-step linear schedule, and the
     setting's class mask (`class_masks`): class-IL, the classes seen so far
     (the head "grows"); task-IL, the task's own head; data-IL, all classes.
  2. N_t steps on the task's data, each batch augmented on the host and
     joined by a replay batch drawn from the buffer when replay is on (while
     the buffer is empty, by more examples of the task, so shapes stay
     static).
  3. DLCFT: curvature of the task (K-FAC of the linearized backbone and the
     exact head factor) from augmented batches of the task, then `end_task`
     folds it into the running average and moves the anchor to θ_t.
  4. The task's training examples enter the reservoir buffer (if any).
  5. Evaluation on the test data of every task seen so far; the accuracy
     matrix, average accuracy, forgetting and backward transfer are printed.
At the end `results.json` is written to the work directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import dlcft_jax as dj
from dlcft_jax import data as data_lib
from dlcft_jax import losses
from dlcft_jax import metrics as metrics_lib

DEFAULT_NPZ_DIR = Path(__file__).resolve().parent / 'data' / 'cifar10_5x2'
SETTINGS = ('class_il', 'task_il', 'data_il')
RESNETS = ('cifar_resnet18', 'resnet18', 'resnet50')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ('dlcft', 'finetune')


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says what to change."""


def _check_config(config: ml_collections.ConfigDict) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(
        config.setting in SETTINGS,
        f'config.setting={config.setting!r} is not available in this release; '
        f'use one of {SETTINGS}.',
    )
    need(
        config.method in METHODS,
        f'config.method={config.method!r} is unknown; use one of {METHODS}.',
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
        config.train.first_task_multiplier >= 1,
        'config.train.first_task_multiplier must be >= 1.',
    )
    need(
        config.train.log_every >= 1 and config.eval.batch_size >= 1,
        'config.train.log_every and config.eval.batch_size must be >= 1.',
    )
    need(
        config.replay.buffer_size >= 0 and config.replay.batch_size >= 0,
        'config.replay.buffer_size and config.replay.batch_size must be >= 0.',
    )
    need(
        config.curvature.kind in ('kfac', 'tkfac'),
        "config.curvature.kind must be 'kfac' or 'tkfac'.",
    )
    need(
        config.curvature.num_batches >= 1 and config.curvature.batch_size >= 1,
        'config.curvature.num_batches and batch_size must be >= 1.',
    )
    need(
        config.backbone.image_size >= 8,
        'config.backbone.image_size must be at least 8 pixels.',
    )


def method_config(config: ml_collections.ConfigDict) -> dj.MethodConfig:
    """The `MethodConfig` of `config.method`, with the config's overrides."""
    o = config.optim
    overrides: dict[str, Any] = dict(
        weight_decay=o.weight_decay,
        clip_norm=o.clip_norm,
        schedule=o.schedule,
        alpha=o.alpha,
    )
    for key, name in (
        ('optimizer', 'name'),
        ('learning_rate', 'learning_rate'),
        ('proximal', 'proximal'),
    ):
        if o[name] is not None:
            overrides[key] = o[name]
    if config.method == 'dlcft':
        overrides['regularizer'] = config.curvature.kind
        # Task-IL heads are separate per task and not regularized (spec §3.3).
        overrides['regularize_head'] = config.setting != 'task_il'
        return dj.MethodConfig.dlcft(**overrides)
    return dj.MethodConfig.finetune(**overrides)


def build_backbone(
    config: ml_collections.ConfigDict,
) -> tuple[Callable[..., jax.Array], Any]:
    """(apply_fn on uint8 images, pre-trained variables) of the backbone."""
    from dlcft_jax import models  # pylint: disable=g-import-not-at-top

    b = config.backbone
    if b.name == 'efficientnet_lite0':
        variables, _ = models.load_efficientnet_lite0(b.checkpoint)
        net = models.EfficientNetLite0(activation=b.activation)
        preprocess = models.preprocess
    elif b.name == 'small_cnn':  # a tiny random network for tests
        from dlcft_jax.models import small_cnn  # pylint: disable=g-import-not-at-top

        net = small_cnn.SmallConvNet(
            width=8, features=16, depthwise_impl='shift'
        )
        variables = net.init(
            jax.random.key(config.seed),
            jnp.zeros((1, b.image_size, b.image_size, 3)),
        )
        preprocess = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1.0
    elif b.name in RESNETS:
        net, variables = _load_resnet(b)
        # The paper normalises CIFAR inputs with ImageNet's statistics for
        # the continual runs, whatever the pre-training used (spec §2.2).
        mean = jnp.asarray(IMAGENET_MEAN) * 255.0
        std = jnp.asarray(IMAGENET_STD) * 255.0
        preprocess = lambda x: (x - mean) / std
    else:
        raise ConfigError(
            f'config.backbone.name={b.name!r} is unknown; use one of '
            f"{('efficientnet_lite0', 'small_cnn') + RESNETS}."
        )
    size = b.image_size

    def apply_fn(variables, images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(
                x, (x.shape[0], size, size, x.shape[3]), method='bilinear'
            )
        return net.apply(variables, preprocess(x))

    return apply_fn, variables


def _load_resnet(b: ml_collections.ConfigDict):
    """(network, variables) of a ResNet backbone from `b.checkpoint`."""
    from dlcft_jax import models  # pylint: disable=g-import-not-at-top

    if not b.checkpoint:
        raise ConfigError(
            f'config.backbone.name={b.name!r} needs config.backbone.checkpoint:'
            ' a backbone.npz written by `python -m experiments.pretrain`, or '
            'a torchvision / timm ResNet .pth or .safetensors file.'
        )
    builder = {
        'cifar_resnet18': models.cifar_resnet18,
        'resnet18': models.resnet18,
        'resnet50': models.resnet50,
    }[b.name]
    path = Path(b.checkpoint)
    if path.suffix == '.npz':
        from experiments import pretrain  # pylint: disable=g-import-not-at-top

        info = pretrain.backbone_info(path)
        if info['architecture'] != b.name:
            raise ConfigError(
                f'{path} holds a {info["architecture"]}, but '
                f'config.backbone.name={b.name!r}; set it to '
                f'{info["architecture"]!r}.'
            )
        kwargs, variables = pretrain.load_backbone(path)
    else:
        variables, _ = models.load_resnet(path)
        kwargs = {'activation': b.activation}
        if b.name == 'cifar_resnet18':
            kwargs['width_multiplier'] = b.width_multiplier
    return builder(**kwargs), variables


def _setup_compilation_cache(config: ml_collections.ConfigDict) -> None:
    path = config.compilation_cache_dir
    if path == '':
        return
    if path is None:
        path = os.path.join(
            os.path.expanduser('~'), '.cache', 'dlcft_jax', 'xla'
        )
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _check_task_size(config, n_train: int, n_test: int, what: str) -> None:
    for name, size in (
        ('train.batch_size', config.train.batch_size),
        ('replay.batch_size', config.replay.batch_size),
        ('curvature.batch_size', config.curvature.batch_size),
    ):
        if n_train < size:
            raise ConfigError(
                f'{what} has {n_train} training images, fewer than '
                f'config.{name}={size}; lower config.{name}.'
            )
    if n_test == 0:
        raise ConfigError(f'{what} has no test images in the data.')


def _load_data(config):
    """The tasks of the run and the width of the head.

    class_il / task_il: tasks are groups of `classes_per_task` classes, whose
    labels become head rows 0..C−1 in task order. data_il: the training set
    is split into `num_tasks` equal random chunks (seeded), every task keeps
    all classes and is tested on the full test set.
    """
    npz_dir = config.data.npz_dir or str(DEFAULT_NPZ_DIR)
    x_train, y_train = data_lib.load_npz(npz_dir, 'train')
    x_test, y_test = data_lib.load_npz(npz_dir, 'test')
    if config.setting == 'data_il':
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        order = np.random.default_rng(config.seed).permutation(len(y_train))
        size = len(order) // config.data.num_tasks
        out = []
        for t in range(config.data.num_tasks):
            idx = np.sort(order[t * size : (t + 1) * size])
            _check_task_size(config, len(idx), len(y_test), f'Task {t + 1}')
            out.append(
                {
                    'classes': list(range(num_classes)),
                    'x_train': x_train[idx],
                    'y_train': y_train[idx].astype(np.int32),
                    'x_test': x_test,
                    'y_test': y_test.astype(np.int32),
                }
            )
        return out, num_classes
    num_classes = config.data.num_tasks * config.data.classes_per_task
    order = None
    if config.data.class_order_seed is not None:
        order = (
            np.random.default_rng(config.data.class_order_seed)
            .permutation(int(max(y_train.max(), y_test.max())) + 1)[
                :num_classes
            ]
            .tolist()
        )
    tasks = data_lib.class_incremental_split(
        y_train, config.data.classes_per_task, config.data.num_tasks, order
    )
    # Map the run's classes to head rows 0..C−1 in task order.
    row = {int(c): i for i, c in enumerate(np.concatenate(tasks))}
    remap = np.vectorize(row.__getitem__, otypes=[np.int32])
    out = []
    for classes in tasks:
        tr = data_lib.task_indices(y_train, classes)
        te = data_lib.task_indices(y_test, classes)
        _check_task_size(
            config,
            len(tr),
            len(te),
            f'Task with classes {list(map(int, classes))}',
        )
        out.append(
            {
                'classes': [int(c) for c in classes],
                'x_train': x_train[tr],
                'y_train': remap(y_train[tr]),
                'x_test': x_test[te],
                'y_test': remap(y_test[te]),
            }
        )
    return out, num_classes


def _task_rows(config, t: int, num_classes: int) -> np.ndarray:
    mask = np.zeros((num_classes,), np.float32)
    cpt = config.data.classes_per_task
    mask[t * cpt : (t + 1) * cpt] = 1.0
    return mask


def class_masks(config, t: int, num_classes: int):
    """(training mask of task t, test masks of tasks 0..t) for the setting.

    class_il: the classes seen so far, for training and for every test (no
    task id at test). task_il: the rows of the task's own head, for training
    and for that task's test (the task id picks the head). data_il: all.
    """
    if config.setting == 'data_il':
        ones = np.ones((num_classes,), np.float32)
        return ones, [ones] * (t + 1)
    if config.setting == 'task_il':
        return _task_rows(config, t, num_classes), [
            _task_rows(config, j, num_classes) for j in range(t + 1)
        ]
    seen = np.zeros((num_classes,), np.float32)
    seen[: (t + 1) * config.data.classes_per_task] = 1.0
    return seen, [seen] * (t + 1)


def _augment(images, rng, enabled):
    return data_lib.augment_crop_flip(images, rng) if enabled else images


def _evaluate(predict_fn, state, x, y, batch_size, class_mask):
    correct, total = 0.0, 0.0
    for b in data_lib.eval_batches(x, y, batch_size):
        logits = predict_fn(state, jnp.asarray(b['image']))
        pred = np.asarray(
            jnp.argmax(losses.masked_logits(logits, class_mask), -1)
        )
        correct += float(np.sum((pred == b['label']) * b['mask']))
        total += float(np.sum(b['mask']))
    return 100.0 * correct / total


class _Run:
    """The jitted functions and host-side state shared by the task loop."""

    def __init__(self, config, tasks, num_classes, state, log_file):
        self.config = config
        self.tasks = tasks
        self.num_classes = num_classes
        self.state = state
        self.log_file = log_file
        self.rng = np.random.default_rng(config.seed)
        self.key = jax.random.key(config.seed)
        use_replay = (
            config.replay.buffer_size > 0 and config.replay.batch_size > 0
        )
        self.replay_bs = config.replay.batch_size if use_replay else 0
        self.buffer = (
            data_lib.ReplayBuffer(config.replay.buffer_size)
            if use_replay
            else None
        )
        # The loop never reuses an old state: let XLA update it in place.
        self.step_fn = jax.jit(dj.train_state.step, donate_argnums=0)
        self.predict_fn = jax.jit(dj.predict)
        self.curv_fn = jax.jit(dj.train_state.curvature_step)

    def log(self, record: dict[str, Any]) -> None:
        self.log_file.write(json.dumps(record) + '\n')
        self.log_file.flush()

    def train_task(self, t: int, n_steps: int) -> None:
        """N_t steps on task t, each batch joined by a replay batch."""
        cfg, task = self.config, self.tasks[t]
        it = data_lib.batches(
            task['x_train'], task['y_train'], cfg.train.batch_size, self.rng
        )
        # While the buffer is empty, more current-task examples take the
        # replay rows, so the step sees one batch shape (one compilation).
        extra = data_lib.batches(
            task['x_train'], task['y_train'], max(self.replay_bs, 1), self.rng
        )
        window_start, window_images = time.time(), 0
        for k in range(n_steps):
            b = next(it)
            images, labels = b['image'], b['label']
            if self.replay_bs:
                r = (
                    self.buffer.sample(self.replay_bs, self.rng)
                    if len(self.buffer)
                    else next(extra)
                )
                images = np.concatenate([images, r['image']])
                labels = np.concatenate([labels, r['label'].astype(np.int32)])
            images = _augment(images, self.rng, cfg.data.augment)
            self.state, m = self.step_fn(
                self.state,
                {'image': jnp.asarray(images), 'label': jnp.asarray(labels)},
            )
            window_images += len(labels)
            if (k + 1) % cfg.train.log_every and k + 1 != n_steps:
                continue
            # Metrics reach the host only at log steps.
            m = {name: float(v) for name, v in jax.device_get(m).items()}
            if not all(math.isfinite(v) for v in m.values()):
                raise FloatingPointError(
                    f'Non-finite metrics at task {t + 1} step {k + 1}: {m}. '
                    'Lower config.optim.learning_rate or check the data.'
                )
            rate = window_images / max(time.time() - window_start, 1e-9)
            window_start, window_images = time.time(), 0
            print(
                f'task {t + 1}/{len(self.tasks)} step {k + 1:4d}/{n_steps} '
                f"loss {m['loss']:9.4f} data {m['data_loss']:9.4f} "
                f"penalty {m['penalty']:9.4f} "
                f"acc {100 * m['accuracy']:5.1f}% {rate:7.1f} img/s",
                flush=True,
            )
            self.log({'task': t, 'step': k + 1, **m, 'images_per_s': rate})

    def end_task(self, t: int) -> None:
        """Curvature of task t (DLCFT), anchor update, buffer update."""
        cfg, task = self.config, self.tasks[t]
        if self.state.config.regularizer == 'none':
            self.state = dj.end_task(self.state, None)
        else:
            self.key, sub = jax.random.split(self.key)
            it = data_lib.batches(
                task['x_train'],
                task['y_train'],
                cfg.curvature.batch_size,
                self.rng,
            )

            def batches():  # augmented, as in the paper
                for _ in range(cfg.curvature.num_batches):
                    b = next(it)
                    images = _augment(b['image'], self.rng, cfg.data.augment)
                    yield {
                        'image': jnp.asarray(images),
                        'label': jnp.asarray(b['label']),
                    }

            # A running sum on the device: one copy of the factors at a time.
            curvature = dj.estimate_curvature(
                self.state, batches(), sub, stats_fn=self.curv_fn
            )
            self.state = dj.end_task(self.state, curvature)
        if self.buffer is not None:
            self.buffer.add(task['x_train'], task['y_train'], t, rng=self.rng)

    def evaluate(self, masks: list[np.ndarray]) -> list[float]:
        """% accuracy on the test data of tasks 0..t, arg-max within masks."""
        return [
            _evaluate(
                self.predict_fn,
                self.state,
                self.tasks[j]['x_test'],
                self.tasks[j]['y_test'],
                self.config.eval.batch_size,
                jnp.asarray(mask),
            )
            for j, mask in enumerate(masks)
        ]


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
    """Runs the continual fine-tuning job of `config`; writes results.json.

    Args:
      config: see `experiments/configs/class_il.py`.
      workdir: output folder (created if missing).

    Returns:
      The results dict that was written to `workdir/results.json`.
    """
    _check_config(config)
    t_start = time.time()
    _setup_compilation_cache(config)
    workdir_path = Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)

    tasks, num_classes = _load_data(config)
    apply_fn, variables = build_backbone(config)
    mcfg = method_config(config)
    replay_bs = config.replay.batch_size if config.replay.buffer_size else 0
    example = jnp.zeros(
        (config.train.batch_size + replay_bs,) + tasks[0]['x_train'].shape[1:],
        jnp.uint8,
    )
    state = dj.create_state(
        apply_fn,
        variables,
        num_classes=num_classes,
        example_input=example,
        config=mcfg,
    )
    num_tasks = len(tasks)
    acc = [[None] * num_tasks for _ in range(num_tasks)]
    task_log = []
    logging.info(
        '%s / %s: %d tasks, %d classes, backbone %s at %d px',
        config.setting,
        config.method,
        num_tasks,
        num_classes,
        config.backbone.name,
        config.backbone.image_size,
    )
    with open(workdir_path / 'log.jsonl', 'w', encoding='utf-8') as log_file:
        run = _Run(config, tasks, num_classes, state, log_file)
        for t, task in enumerate(tasks):
            n_steps = config.train.steps_per_task * (
                config.train.first_task_multiplier if t == 0 else 1
            )
            train_mask, test_masks = class_masks(config, t, num_classes)
            run.state = dj.begin_task(
                run.state, num_steps=n_steps, class_mask=train_mask
            )
            t0 = time.time()
            run.train_task(t, n_steps)
            t1 = time.time()
            run.end_task(t)
            t2 = time.time()
            acc[t][: t + 1] = run.evaluate(test_masks)
            seen_rows = [row[: t + 1] for row in acc[: t + 1]]
            summary = {
                'task': t,
                'classes': task['classes'],
                'accuracy': acc[t][: t + 1],
                'average_accuracy': metrics_lib.average_accuracy(seen_rows),
                'forgetting': metrics_lib.forgetting(seen_rows),
                'backward_transfer': metrics_lib.backward_transfer(seen_rows),
                'train_s': t1 - t0,
                'curvature_s': t2 - t1,
            }
            task_log.append(summary)
            run.log({'event': 'task_end', **summary})
            print(
                f'after task {t + 1}: '
                + ' '.join(f'T{j + 1} {acc[t][j]:5.1f}%' for j in range(t + 1))
                + f" | average {summary['average_accuracy']:5.2f}%"
                + f" | forgetting {summary['forgetting']:5.2f}"
                + f' | train {t1 - t0:.0f}s curvature {t2 - t1:.0f}s',
                flush=True,
            )

    results = {
        'setting': config.setting,
        'method': config.method,
        'num_tasks': num_tasks,
        'classes_per_task': config.data.classes_per_task,
        'task_classes': [task['classes'] for task in tasks],
        'accuracy_matrix': acc,
        'average_accuracy': metrics_lib.average_accuracy(acc),
        'forgetting': metrics_lib.forgetting(acc),
        'backward_transfer': metrics_lib.backward_transfer(acc),
        'per_task': task_log,
        'wall_time_s': time.time() - t_start,
        'method_config': dataclasses.asdict(mcfg),
        'config': json.loads(config.to_json_best_effort()),
        'devices': [str(d) for d in jax.devices()],
        'jax_version': jax.__version__,
    }
    with open(workdir_path / 'results.json', 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=2)
    print('\naccuracy matrix (row: after task i, column: test data of task j)')
    print(metrics_lib.format_accuracy_matrix(acc))
    print(
        f"average accuracy {results['average_accuracy']:.2f}% | forgetting "
        f"{results['forgetting']:.2f} | backward transfer "
        f"{results['backward_transfer']:.2f} | wall time "
        f"{results['wall_time_s']:.0f} s -> {workdir_path / 'results.json'}"
    )
    return results
