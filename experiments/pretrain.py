r"""Supervised pre-training of a DLCFT backbone (docs/method.md §2.5).

  python -m experiments.pretrain \
      --config=experiments/configs/pretrain_imagenet32.py --workdir=DIR

Trains a non-linear ResNet (BatchNorm in train mode, softmax cross-entropy)
on a TFDS classification dataset and exports the feature extractor for the
continual runner:

* Data: `tfds.data_source` (random access, NumPy, no TensorFlow) and a
  host-side NumPy pipeline. The epoch order is a permutation drawn from
  (seed, epoch) and augmentation draws from (seed, epoch, batch, host), so a
  resumed run sees exactly the batches an uninterrupted run would. Batches
  have static shapes (the last partial batch of an epoch is dropped) and each
  host reads only its own slice of every global batch.
* Augmentation: 'crop_flip' (the 32 px recipe: zero-pad 4, random crop,
  horizontal flip) or 'resize_crop_flip' (the 224 px re-tune: resize the
  shorter side to `data.resize_size`, random crop, flip; evaluation resizes
  and centre-crops). The torchvision recipe's RandomResizedCrop is not used:
  for one epoch of re-tuning at lr 1e-3 the cheaper crop is enough.
* Data parallelism: `jax.pmap` over all local devices (axis 'batch');
  gradients and BatchNorm running statistics are averaged with `lax.pmean`.
  Batch statistics are per device, as in PyTorch's DataParallel-free DDP.
* Optimizer: SGD with momentum and *coupled* weight decay
  (`optax.add_decayed_weights` before the momentum, as `torch.optim.SGD`
  does). By default the decay covers every parameter, BatchNorm and biases
  included, because that is what `torch.optim.SGD(model.parameters(), ...)`
  in the reference recipe does; `optim.weight_decay_mask='kernels'` restricts
  it to conv/dense kernels.
* Checkpoints: orbax {params, batch_stats, opt_state, step} in
  `workdir/checkpoints`; re-running the same command resumes.
* Export: `workdir/backbone.npz` (backbone variables without 'fc', flat keys
  such as 'params/conv1/kernel') and `workdir/backbone.json` (architecture,
  model kwargs, input size, normalisation). `load_backbone` reads both.

A configuration or data error ends the run with one `error:` line (set
DLCFT_TRACEBACK=1 to see the traceback instead).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax import lax
from PIL import Image

from dlcft_jax import data as data_lib
from dlcft_jax import parallel
from dlcft_jax.models import resnet
from experiments import (
    backbones,
    checkpointing,
    cli,
    config_checks,
    input_pipeline,
    reporting,
)
from experiments.cli import ConfigError, need

AUGMENTATIONS = ('crop_flip', 'resize_crop_flip', 'none')
SCHEDULES = ('onecycle', 'constant')
WEIGHT_DECAY_MASKS = ('all', 'kernels')
State = dict[str, Any]


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Constructor kwargs of the config's architecture (without the head)."""
    kwargs: dict[str, Any] = {'activation': config.model.activation}
    if config.model.architecture == 'cifar_resnet18':
        kwargs['width_multiplier'] = float(config.model.width_multiplier)
    return kwargs


# ----------------------------------------------------------------------------
# Configuration checks.


def _check_config(
    config: ml_collections.ConfigDict, num_devices: int, num_hosts: int
) -> None:
    """Raises ConfigError for settings that cannot run."""

    need(
        config.model.architecture in backbones.MODEL_BUILDERS,
        f'model.architecture={config.model.architecture!r}; expected one '
        f'of {sorted(backbones.MODEL_BUILDERS)}',
    )
    need(
        config.model.activation in resnet.ACTIVATIONS,
        f'model.activation={config.model.activation!r}; expected one of '
        f'{resnet.ACTIVATIONS}',
    )
    need(
        config.data.augment in AUGMENTATIONS,
        f'data.augment={config.data.augment!r}; expected one of '
        f'{AUGMENTATIONS}',
    )
    need(
        config.optim.schedule in SCHEDULES,
        f'optim.schedule={config.optim.schedule!r}; expected one of '
        f'{SCHEDULES}',
    )
    need(
        config.optim.weight_decay_mask in WEIGHT_DECAY_MASKS,
        f'optim.weight_decay_mask={config.optim.weight_decay_mask!r}; '
        f'expected one of {WEIGHT_DECAY_MASKS}',
    )
    if config.data.augment == 'resize_crop_flip':
        need(
            config.data.resize_size is not None
            and config.data.resize_size >= config.data.image_size,
            'data.augment=resize_crop_flip needs data.resize_size >= '
            f'data.image_size (got {config.data.resize_size})',
        )
    need(
        len(config.data.mean) == 3 and len(config.data.std) == 3,
        'data.mean and data.std need 3 values (RGB)',
    )
    devices = num_devices * num_hosts
    for key, size in (
        ('train.batch_size', config.train.batch_size),
        ('eval.batch_size', config.eval.batch_size),
    ):
        need(
            size > 0 and size % devices == 0,
            f'{key}={size} must be a positive multiple of the number of '
            f'devices ({num_devices} per host x {num_hosts} hosts = '
            f'{devices})',
        )
    init = config.model.init_checkpoint
    if config.model.require_init_checkpoint and not init:
        raise ConfigError(
            'model.init_checkpoint is required by this config: pass '
            '--config.model.init_checkpoint=PATH (a torchvision ResNet .pth '
            'or .safetensors file)'
        )
    if init and not Path(init).is_file():
        raise FileNotFoundError(f'model.init_checkpoint={init!r}: no such file')


# ----------------------------------------------------------------------------
# Data.


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch).

    Args:
        seed: The run's seed.
        epoch: Epoch index from 0.
        size: Number of training examples.

    Returns:
        A permutation of range(size) (cached for the current epoch, so
        treat it as read-only).
    """
    return np.random.default_rng([seed, epoch]).permutation(size)


def _resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes (bilinear, PIL) so that the shorter side equals `size`."""
    h, w = image.shape[:2]
    if min(h, w) == size:
        return image
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(pil)


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with 3 channels (grey images are repeated)."""
    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def preprocess(
    image: np.ndarray,
    config: ml_collections.ConfigDict,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Augments (rng given) or prepares for evaluation (rng None).

    Args:
        image: HWC uint8 image as stored.
        config: The pre-training config (data.augment, image_size,
            resize_size).
        rng: Generator for the random crop and flip; None for evaluation.

    Returns:
        (image_size, image_size, 3) uint8.
    """
    size = config.data.image_size
    image = _as_rgb(image)
    mode = config.data.augment
    if mode == 'resize_crop_flip':
        image = _resize_shorter(image, config.data.resize_size)
        if rng is None:
            return _center_crop(image, size)
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        image = image[top : top + size, left : left + size]
    else:
        if image.shape[:2] != (size, size):
            # Stored images of another size (not the 32 px recipe's case):
            # bring them to `size` the way evaluation does.
            image = _center_crop(_resize_shorter(image, size), size)
        if rng is None or mode == 'none':
            return image
        pad = config.data.crop_padding
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        top = int(rng.integers(0, 2 * pad + 1))
        left = int(rng.integers(0, 2 * pad + 1))
        image = padded[top : top + size, left : left + size]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


class Loader:
    """Reads, augments and batches examples of a `tfds.data_source`.

    Attributes:
        source: The random-access data source.
        num_examples: len(source), or the config's cap on it.
    """

    def __init__(
        self,
        source: Sequence[dict[str, Any]],
        config: ml_collections.ConfigDict,
        num_examples: int | None = None,
    ):
        self.source = source
        self.config = config
        self.num_examples = len(source)
        if num_examples is not None:
            self.num_examples = min(self.num_examples, num_examples)
        # Threads, not processes: decoding (PIL/NumPy) releases the GIL and
        # the source need not be picklable.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, config.data.num_workers)
        )

    def _example(
        self, index: int, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, int]:
        example = self.source[int(index)]
        return (
            preprocess(example['image'], self.config, rng),
            int(example['label']),
        )

    def batch(
        self, indices: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Loads the examples `indices` as uint8 images and int32 labels.

        Args:
            indices: Example indices.
            rng: Augmentation generator (one child per example, so the
                result does not depend on thread scheduling); None for
                evaluation.

        Returns:
            (images (N, S, S, 3) uint8, labels (N,) int32).
        """
        rngs = [None] * len(indices) if rng is None else rng.spawn(len(indices))
        pairs = list(self._pool.map(self._example, indices, rngs))
        images = np.stack([p[0] for p in pairs])
        labels = np.asarray([p[1] for p in pairs], np.int32)
        return images, labels

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _train_batch_indices(
    seed: int, step: int, steps_per_epoch: int, batch: int, size: int
) -> tuple[int, np.ndarray, np.random.Generator]:
    """This host's example indices and augmentation rng of global `step`."""
    epoch, b = divmod(step, steps_per_epoch)
    perm = epoch_permutation(seed, epoch, size)
    global_idx = perm[b * batch : (b + 1) * batch]
    rng = np.random.default_rng([seed, epoch, b, jax.process_index()])
    return epoch, global_idx[input_pipeline.host_rows(batch)], rng


# ----------------------------------------------------------------------------
# Model, optimizer and steps.


def _schedule(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
    lr = config.optim.learning_rate
    if config.optim.schedule == 'onecycle':
        return optax.cosine_onecycle_schedule(
            total_steps, lr, pct_start=config.optim.pct_start
        )
    return optax.constant_schedule(lr)


def _decay_mask(config: ml_collections.ConfigDict) -> Any:
    if config.optim.weight_decay_mask == 'all':
        return None

    def mask(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict(
            {k: k[-1] == 'kernel' for k in flat}
        )

    return mask


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """SGD + momentum with coupled weight decay, as `torch.optim.SGD`.

    Args:
        config: The pre-training config (optim.*).
        total_steps: Length of the schedule.

    Returns:
        The optax transformation.
    """
    return optax.chain(
        optax.add_decayed_weights(
            config.optim.weight_decay, mask=_decay_mask(config)
        ),
        optax.sgd(
            _schedule(config, total_steps), momentum=config.optim.momentum
        ),
    )


def _init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
) -> State:
    size = config.data.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    params = variables['params']
    return {
        'params': params,
        'batch_stats': variables['batch_stats'],
        'opt_state': tx.init(params),
        'step': jnp.zeros((), jnp.int32),
    }


def _load_init_checkpoint(
    state: State,
    path: str,
    tx: optax.GradientTransformation,
) -> State:
    """Replaces the initial weights by a converted torchvision checkpoint."""
    from dlcft_jax.models import convert_torch  # only this config needs it

    variables, head = convert_torch.load_resnet(path)
    params = dict(variables['params'])
    own_fc = state['params'].get('fc')
    if head is not None and own_fc is not None:
        if head['kernel'].shape == own_fc['kernel'].shape:
            params['fc'] = head
        else:
            logging.info(
                'init_checkpoint head %s does not match %s classes: the '
                'head stays freshly initialised',
                head['kernel'].shape,
                own_fc['kernel'].shape[-1],
            )
    if own_fc is not None and 'fc' not in params:
        params['fc'] = own_fc
    new = {'params': params, 'batch_stats': variables['batch_stats']}
    want = {'params': state['params'], 'batch_stats': state['batch_stats']}
    want_shapes = jax.tree.map(np.shape, want)
    got_shapes = jax.tree.map(np.shape, new)
    if want_shapes != got_shapes:
        want_flat = traverse_util.flatten_dict(want_shapes, sep='/')
        got_flat = traverse_util.flatten_dict(got_shapes, sep='/')
        diff = sorted(
            k
            for k in set(want_flat) | set(got_flat)
            if want_flat.get(k) != got_flat.get(k)
        )
        raise ConfigError(
            f'model.init_checkpoint={path!r} does not fit '
            f'model.architecture: {len(diff)} variables differ in name or '
            f'shape (first: {diff[:5]})'
        )
    new = jax.tree.map(jnp.asarray, new)
    return {
        'params': new['params'],
        'batch_stats': new['batch_stats'],
        'opt_state': tx.init(new['params']),
        'step': state['step'],
    }


def _normalise(
    images: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
    mean = jnp.asarray(config.data.mean, jnp.float32) * 255.0
    std = jnp.asarray(config.data.std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def _make_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The pmapped train and eval steps (axis 'batch')."""

    def train_step(state, images, labels):
        x = _normalise(images, config)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {'params': params, 'batch_stats': state['batch_stats']},
                x,
                train=True,
                mutable=['batch_stats'],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits, labels
            ).mean()
            return loss, (logits, new_vars['batch_stats'])

        (loss, (logits, stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state['params'])
        grads = lax.pmean(grads, 'batch')
        stats = lax.pmean(stats, 'batch')
        updates, opt_state = tx.update(
            grads, state['opt_state'], state['params']
        )
        params = optax.apply_updates(state['params'], updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        metrics = lax.pmean(
            {'loss': loss, 'accuracy': accuracy.astype(jnp.float32)}, 'batch'
        )
        new_state = {
            'params': params,
            'batch_stats': stats,
            'opt_state': opt_state,
            'step': state['step'] + 1,
        }
        return new_state, metrics

    def eval_step(state, images, labels, weights):
        logits = model.apply(
            {'params': state['params'], 'batch_stats': state['batch_stats']},
            _normalise(images, config),
            train=False,
        )
        correct = (jnp.argmax(logits, -1) == labels) * weights
        return lax.psum(
            {'correct': correct.sum(), 'count': weights.sum()}, 'batch'
        )

    return (
        jax.pmap(train_step, axis_name='batch', donate_argnums=(0,)),
        jax.pmap(eval_step, axis_name='batch'),
    )


def _evaluate(
    eval_step: Callable[..., Any],
    state: State,
    loader: Loader,
    config: ml_collections.ConfigDict,
    num_devices: int,
) -> float:
    """Top-1 accuracy over the whole (or capped) evaluation split.

    The last batch is padded with weight-0 rows so shapes stay static.
    """
    batch = config.eval.batch_size
    n = loader.num_examples
    correct = count = 0.0
    rows = input_pipeline.host_rows(batch)
    # Padded index batches: static shapes, padding rows of weight 0.
    for b in data_lib.eval_batches(np.arange(n), np.zeros(n, np.int32), batch):
        idx, weights = b['image'][rows], b['mask'][rows]
        images, labels = loader.batch(idx, None)
        out = eval_step(
            state,
            *parallel.shard_batch((images, labels, weights), num_devices),
        )
        out = jax.device_get(out)
        correct += float(out['correct'][0])
        count += float(out['count'][0])
    return correct / max(count, 1.0)


# ----------------------------------------------------------------------------
# The run.


def _data_source(config: ml_collections.ConfigDict, split: str) -> Any:
    import tensorflow_datasets as tfds  # slow import; keep the CLI snappy

    try:
        # download=False: preparing ImageNet is a separate, deliberate job,
        # never a side effect of starting a training run.
        return tfds.data_source(
            config.data.name,
            split=split,
            data_dir=config.data.tfds_data_dir,
            download=False,
        )
    except Exception as e:  # tfds raises many types for a missing dataset
        raise FileNotFoundError(
            f'cannot open tfds dataset {config.data.name!r} split {split!r} '
            f'in data.tfds_data_dir={config.data.tfds_data_dir!r} (prepare '
            'it first, e.g. with `tfds build`, in array_record format): '
            f'{type(e).__name__}: {str(e).strip().splitlines()[0]}'
        ) from e


def pretrain(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Trains (or resumes), evaluates and exports the backbone.

    Args:
        config: See experiments/configs/pretrain_imagenet32.py.
        workdir: Folder for checkpoints/, log.jsonl, backbone.npz/.json.

    Returns:
        A summary: step, total_steps, complete, eval_accuracy (None when
        evaluation is switched off), backbone (the .npz path).
    """
    workdir = Path(workdir)
    num_devices = jax.local_device_count()
    _check_config(config, num_devices, jax.process_count())
    config_checks.check_workdir(workdir)

    train_source = _data_source(config, config.data.train_split)
    train_loader = Loader(train_source, config, config.data.max_train_examples)
    batch = config.train.batch_size
    steps_per_epoch = train_loader.num_examples // batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f'train.batch_size={batch} exceeds the {train_loader.num_examples}'
            ' training examples'
        )
    total_steps = config.train.num_steps or config.train.epochs * (
        steps_per_epoch
    )
    stop_step = min(total_steps, config.train.max_steps or total_steps)

    model = backbones.build_model(
        config.model.architecture,
        num_classes=config.data.num_classes,
        **model_kwargs(config),
    )
    tx = make_optimizer(config, total_steps)

    def init_fn(rng: jax.Array) -> State:
        return _init_state(model, tx, config, rng)

    rng = jax.random.PRNGKey(config.seed)

    manager = checkpointing.manager(
        workdir,
        every_steps=config.checkpoint.every_steps,
        max_to_keep=config.checkpoint.max_to_keep,
    )
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(init_fn, rng)
        state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        logging.info('resumed from checkpoint at step %d', latest)
    else:
        state = jax.jit(init_fn)(rng)
        if config.model.init_checkpoint:
            state = _load_init_checkpoint(
                state, config.model.init_checkpoint, tx
            )
    step = int(state['step'])

    train_step, eval_step = _make_steps(model, tx, config)
    schedule = _schedule(config, total_steps)
    replicated = parallel.replicate(state, num_devices)
    del state

    def load(s: int) -> tuple[int, Any, Any]:
        """Epoch and this host's batch of global step s, on the devices."""
        epoch, idx, brng = _train_batch_indices(
            config.seed, s, steps_per_epoch, batch, train_loader.num_examples
        )
        images, labels = train_loader.batch(idx, brng)
        return (epoch, *parallel.shard_batch((images, labels), num_devices))

    logging.info(
        'training steps %d..%d of %d (%d per epoch, batch %d on %d devices)',
        step,
        stop_step,
        total_steps,
        steps_per_epoch,
        batch,
        num_devices,
    )
    eval_accuracy = None
    with reporting.RunLog(workdir, chief=jax.process_index() == 0) as log:
        pending_metrics = []
        t0, n0 = time.perf_counter(), step
        # One batch is read ahead in a thread while the device computes.
        batches = input_pipeline.prefetch(
            (load(s) for s in range(step, stop_step)), size=1
        )
        for epoch, images, labels in batches:
            replicated, metrics = train_step(replicated, images, labels)
            pending_metrics.append(metrics)
            step += 1
            last = step == stop_step
            if step % config.train.log_every == 0 or last:
                fetched = jax.device_get(pending_metrics)
                pending_metrics = []
                losses = np.asarray([m['loss'][0] for m in fetched])
                cli.stop_if_not_finite(
                    dict(enumerate(losses.tolist())),
                    f'step {step} (epoch {epoch}), training losses',
                    'Lower optim.learning_rate or resume from an earlier '
                    'checkpoint.',
                )
                elapsed = time.perf_counter() - t0
                record = {
                    'step': step,
                    'epoch': epoch,
                    'loss': float(losses.mean()),
                    'accuracy': float(
                        np.mean([m['accuracy'][0] for m in fetched])
                    ),
                    'lr': float(schedule(step - 1)),
                    'images_per_s': (step - n0) * batch / max(elapsed, 1e-9),
                }
                logging.info(
                    'step %d/%d epoch %d loss %.4f acc %.4f lr %.4g %.1f img/s',
                    step,
                    total_steps,
                    epoch,
                    record['loss'],
                    record['accuracy'],
                    record['lr'],
                    record['images_per_s'],
                )
                log.record(record)
                log.scalars(
                    {f'train/{k}': v for k, v in record.items() if k != 'step'},
                    step,
                )
                t0, n0 = time.perf_counter(), step
            if manager.should_save(step) or last:
                host_state = parallel.unreplicate(replicated)
                manager.save(
                    step, args=ocp.args.StandardSave(host_state), force=last
                )
            every = config.eval.every_epochs
            if (
                every
                and step % steps_per_epoch == 0
                and (step // steps_per_epoch) % every == 0
                and not last
            ):
                acc = _run_eval(eval_step, replicated, config, num_devices)
                log.record({'step': step, 'epoch': epoch, 'eval_accuracy': acc})
                log.scalars({'eval/accuracy': acc}, step)
        manager.wait_until_finished()
        train_loader.close()

        complete = step == total_steps
        if config.eval.at_end:
            eval_accuracy = _run_eval(
                eval_step, replicated, config, num_devices
            )
            logging.info('eval accuracy at step %d: %.4f', step, eval_accuracy)
            log.record({'step': step, 'eval_accuracy': eval_accuracy})
            log.scalars({'eval/accuracy': eval_accuracy}, step)

    final = jax.device_get(parallel.unreplicate(replicated))
    backbone, _ = resnet.split_head(
        {'params': final['params'], 'batch_stats': final['batch_stats']}
    )
    info = {
        'format_version': backbones.BACKBONE_FORMAT_VERSION,
        'architecture': config.model.architecture,
        'model_kwargs': model_kwargs(config),
        'feature_dim': resnet.feature_dim(
            backbones.build_model(
                config.model.architecture, **model_kwargs(config)
            )
        ),
        'image_size': config.data.image_size,
        'mean': list(config.data.mean),
        'std': list(config.data.std),
        'dataset': config.data.name,
        'num_pretrain_classes': config.data.num_classes,
        'step': step,
        'total_steps': total_steps,
        'complete': complete,
        'eval_accuracy': eval_accuracy,
    }
    backbone_path = workdir / 'backbone.npz'
    if jax.process_index() == 0:
        backbones.save_backbone(backbone_path, backbone, info)
    manager.close()
    return {
        'step': step,
        'total_steps': total_steps,
        'complete': complete,
        'eval_accuracy': eval_accuracy,
        'backbone': str(backbone_path),
    }


def _run_eval(
    eval_step: Callable[..., Any],
    replicated: State,
    config: ml_collections.ConfigDict,
    num_devices: int,
) -> float:
    loader = Loader(
        _data_source(config, config.data.eval_split),
        config,
        config.eval.max_examples,
    )
    try:
        return _evaluate(eval_step, replicated, loader, config, num_devices)
    finally:
        loader.close()


# ----------------------------------------------------------------------------
# Command line.


def _main() -> None:
    cli.main(
        pretrain,
        config_help='A config file under experiments/configs/ (pretrain_*.py '
        'or retune_*.py).',
        workdir_help='Folder for checkpoints, log.jsonl and backbone.npz.',
        verbosity=logging.INFO,
        on_success=lambda summary: print(json.dumps(summary)),
    )


if __name__ == '__main__':
    _main()
