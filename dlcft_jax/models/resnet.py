"""ResNets in Flax Linen (NHWC): torchvision's ImageNet layout and CIFAR's.

Two backbones of the paper (docs/method.md §2.5):

* `CifarResNet18`: the Seq-CIFAR-100 backbone. 3×3 stride-1 stem, no
  max-pool, BasicBlocks [2, 2, 2, 2], leaky ReLU (slope 0.01) by default,
  optional width multiplier for small test and CPU models.
* `ResNet` (`resnet18`, `resnet50`): torchvision's ImageNet ResNet v1.5
  (stride in the 3×3 conv of a bottleneck), 7×7 stride-2 stem and 3×3
  stride-2 max-pool; ReLU by default, leaky ReLU for the Seq-MIT-67 backbone.

Numerics follow torchvision: convolutions have no bias and symmetric zero
padding k // 2, written as explicit pairs so that the K-FAC estimator
(`dlcft_jax.curvature`) reads the padding from `module.padding`; BatchNorm
has epsilon 1e-5 and PyTorch momentum 0.1 (Flax momentum 0.9); the max-pool
pads with -inf. BatchNorm uses its running statistics unless `train=True`.
Weights live in 'params', running statistics in 'batch_stats'.

Module names mirror torchvision's state-dict keys one to one, so a converter
only renames separators:

    torchvision key                     Flax variable path
    conv1.weight                        params/conv1/kernel
    bn1.{weight,bias}                   params/bn1/{scale,bias}
    bn1.{running_mean,running_var}      batch_stats/bn1/{mean,var}
    layer1.0.conv1.weight               params/layer1_0/conv1/kernel
    layer1.0.bn2.weight                 params/layer1_0/bn2/scale
    layer2.0.downsample.0.weight        params/layer2_0/downsample_conv/kernel
    layer2.0.downsample.1.weight        params/layer2_0/downsample_bn/scale
    fc.{weight,bias}                    params/fc/{kernel,bias}

i.e. block j of stage i is 'layer{i}_{j}', holding 'conv1', 'bn1', 'conv2',
'bn2' (and 'conv3', 'bn3' in a bottleneck) plus 'downsample_conv' and
'downsample_bn' when the shortcut is a projection. Conv kernels are HWIO
(torch OIHW transposed by (2, 3, 1, 0)), the Dense kernel is (in, out)
(torch's transposed). `num_batches_tracked` has no counterpart. The CIFAR
ResNet uses the same names.

Backbone and head. `Model(num_classes=None)` is the feature extractor
g(x; ψ): `model.apply(variables, x)` returns the globally average-pooled
features of width `feature_dim(model)`, which is the `apply_fn` DLCFT
linearizes. With an int `num_classes` the model adds the Dense layer 'fc' and
returns logits; `split_head` turns such variables into backbone variables and
a head {'kernel': (D, C), 'bias': (C,)} as `dlcft_jax.TrainState` holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlcft_jax.models.efficientnet_lite import get_activation

BN_EPSILON = 1e-5
# Flax's momentum weighs the old running average: PyTorch's 0.1 is Flax 0.9.
BN_MOMENTUM = 0.9
ACTIVATIONS = ('relu', 'leaky_relu')
STAGE_WIDTHS = (64, 128, 256, 512)

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out',
# nonlinearity='relu'); matching it keeps training from scratch comparable.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation `name`, restricted to those a ResNet may use.

    Args:
        name: 'relu' or 'leaky_relu' (negative slope 0.01).

    Returns:
        The elementwise activation function.
    """
    if name not in ACTIVATIONS:
        raise ValueError(
            f'unknown activation {name!r}; expected one of {ACTIVATIONS}'
        )
    return get_activation(name)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    """Bias-free square conv with PyTorch's symmetric padding k // 2.

    Args:
        features: Output channels.
        kernel: Kernel size (square, odd).
        stride: Stride (square).
        name: Module name.

    Returns:
        The `nn.Conv` module.
    """
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        name=name,
    )


def _batch_norm(name: str, train: bool) -> nn.BatchNorm:
    """BatchNorm with torchvision's epsilon and momentum."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        name=name,
    )


def _shortcut(
    x: jax.Array, features: int, stride: int, train: bool
) -> jax.Array:
    """Identity, or a 1×1 conv + BN projection when the shape changes.

    Must be called inside a block's compact `__call__` so that the modules
    become that block's 'downsample_conv' and 'downsample_bn'.
    """
    if stride == 1 and x.shape[-1] == features:
        return x
    x = _conv(features, 1, stride, 'downsample_conv')(x)
    return _batch_norm('downsample_bn', train)(x)


class _ResidualBlock(nn.Module):
    """act(branch(x) + shortcut(x)); each subclass defines the branch as
    `_branch(x, act, train)` (the convs before the addition), and this
    private base is never built itself.

    Attributes:
        features: Width of the branch's convs; the output has
            `expansion` × features channels.
        stride: Stride of the branch's strided conv and of the projection
            shortcut.
        activation: 'relu' or 'leaky_relu'.
    """

    features: int
    stride: int = 1
    activation: str = 'relu'

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block.

        Args:
            x: Input (N, H, W, C_in).
            train: Use batch statistics (and update them) if True.

        Returns:
            Output (N, ceil(H / stride), ceil(W / stride),
            expansion * features).
        """
        act = _activation(self.activation)
        out = self.features * self.expansion
        residual = _shortcut(x, out, self.stride, train)
        return act(self._branch(x, act, train) + residual)


class BasicBlock(_ResidualBlock):
    """Two 3×3 convs with a residual connection (expansion 1)."""

    expansion = 1

    def _branch(self, x, act, train):
        y = _conv(self.features, 3, self.stride, 'conv1')(x)
        y = act(_batch_norm('bn1', train)(y))
        y = _conv(self.features, 3, 1, 'conv2')(y)
        return _batch_norm('bn2', train)(y)


class Bottleneck(_ResidualBlock):
    """1×1 → 3×3 (strided, ResNet v1.5) → 1×1 ×4 with a residual connection."""

    expansion = 4

    def _branch(self, x, act, train):
        y = _conv(self.features, 1, 1, 'conv1')(x)
        y = act(_batch_norm('bn1', train)(y))
        y = _conv(self.features, 3, self.stride, 'conv2')(y)
        y = act(_batch_norm('bn2', train)(y))
        y = _conv(self.features * self.expansion, 1, 1, 'conv3')(y)
        return _batch_norm('bn3', train)(y)


_BLOCKS: dict[str, type[nn.Module]] = {
    'basic': BasicBlock,
    'bottleneck': Bottleneck,
}


def _block_class(block: str) -> type[nn.Module]:
    """The block class called `block` ('basic' or 'bottleneck')."""
    try:
        return _BLOCKS[block]
    except KeyError:
        raise ValueError(
            f'unknown block {block!r}; expected one of {sorted(_BLOCKS)}'
        ) from None


class _ResNetBase(nn.Module):
    """Stem 'conv1' + 'bn1' (+ max-pool), residual stages 'layer1'..,
    global average pool and, with an int `num_classes`, the Dense layer 'fc'.

    Subclasses have the fields `activation` and `num_classes`, set `stem`
    to (kernel, stride, max-pool) and define `_stages()`, returning (block
    class, blocks per stage, stage widths); this private base is never built
    itself. The first block of
    every stage but the first has stride 2.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Computes features or logits.

        Args:
            x: Normalised float images (N, H, W, 3).
            train: Use batch statistics (and update 'batch_stats') if True;
                otherwise inference mode with running averages.

        Returns:
            (N, feature_dim(self)) features if `num_classes` is None, else
            (N, num_classes) logits.
        """
        act = _activation(self.activation)
        block_cls, stage_sizes, widths = self._stages()
        kernel, stride, max_pool = self.stem
        x = _conv(widths[0], kernel, stride, 'conv1')(x)
        x = act(_batch_norm('bn1', train)(x))
        if max_pool:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = enumerate(zip(stage_sizes, widths, strict=True))
        for i, (size, width) in stages:
            for j in range(size):
                x = block_cls(
                    features=width,
                    stride=2 if i > 0 and j == 0 else 1,
                    activation=self.activation,
                    name=f'layer{i + 1}_{j}',
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        if self.num_classes is not None:
            x = nn.Dense(self.num_classes, name='fc')(x)
        return x


class ResNet(_ResNetBase):
    """torchvision's ImageNet ResNet (v1.5) with an optional classifier.

    7×7 stride-2 stem and 3×3 stride-2 max-pool.

    Attributes:
        stage_sizes: Blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        block: 'basic' or 'bottleneck'.
        activation: 'relu' (torchvision) or 'leaky_relu' (slope 0.01).
        num_classes: None to return the pooled features g(x); an int to add
            the Dense layer 'fc' and return logits.
    """

    stage_sizes: Sequence[int]
    block: str = 'basic'
    activation: str = 'relu'
    num_classes: int | None = None

    stem = (7, 2, True)

    def _stages(self):
        return _block_class(self.block), self.stage_sizes, STAGE_WIDTHS


def _scaled(width: int, multiplier: float) -> int:
    """round(width · multiplier), at least 1."""
    return max(1, int(round(width * multiplier)))


class CifarResNet18(_ResNetBase):
    """CIFAR-style ResNet-18: 3×3 stride-1 stem, no max-pool.

    See docs/method.md §2.5. Inputs are e.g. 32×32.

    Attributes:
        width_multiplier: Scales the stem and stage widths (64, 128, 256,
            512); the paper uses 1.
        activation: 'leaky_relu' (slope 0.01, the paper's) or 'relu'.
        num_classes: None to return the pooled features g(x); an int to add
            the Dense layer 'fc' and return logits.
    """

    width_multiplier: float = 1.0
    activation: str = 'leaky_relu'
    num_classes: int | None = None

    stem = (3, 1, False)

    def _stages(self):
        widths = [_scaled(w, self.width_multiplier) for w in STAGE_WIDTHS]
        return BasicBlock, (2, 2, 2, 2), widths


def resnet18(**kwargs: Any) -> ResNet:
    """torchvision ResNet-18: BasicBlocks [2, 2, 2, 2], 512-d features.

    Args:
        **kwargs: Further `ResNet` fields (activation, num_classes).

    Returns:
        The `ResNet` module.
    """
    return ResNet(stage_sizes=(2, 2, 2, 2), block='basic', **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """torchvision ResNet-50 (v1.5): Bottlenecks [3, 4, 6, 3], 2048-d.

    Args:
        **kwargs: Further `ResNet` fields (activation, num_classes).

    Returns:
        The `ResNet` module.
    """
    return ResNet(stage_sizes=(3, 4, 6, 3), block='bottleneck', **kwargs)


def cifar_resnet18(**kwargs: Any) -> CifarResNet18:
    """The Seq-CIFAR-100 ResNet-18 (leaky ReLU by default).

    Args:
        **kwargs: `CifarResNet18` fields (width_multiplier, activation,
            num_classes).

    Returns:
        The `CifarResNet18` module.
    """
    return CifarResNet18(**kwargs)


def feature_dim(model: ResNet | CifarResNet18) -> int:
    """Width D of the pooled features g(x) (the input of 'fc').

    Args:
        model: A `ResNet` or `CifarResNet18`.

    Returns:
        512 · width_multiplier (rounded) for the CIFAR ResNet-18, 512 for
        basic-block ResNets, 2048 for bottleneck ResNets.
    """
    if isinstance(model, CifarResNet18):
        return _scaled(STAGE_WIDTHS[-1], model.width_multiplier)
    if isinstance(model, ResNet):
        return STAGE_WIDTHS[-1] * _block_class(model.block).expansion
    raise TypeError(f'not a ResNet: {type(model).__name__}')


def split_head(
    variables: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Separates the classifier 'fc' from a ResNet's variables.

    Args:
        variables: Variables of a model built with an int `num_classes`
            ({'params': {..., 'fc': {'kernel', 'bias'}}, 'batch_stats': ...}).

    Returns:
        (backbone_variables, head): the same variables without params['fc'],
        which the model with `num_classes=None` applies to give g(x), and
        {'kernel': (D, C), 'bias': (C,)}.
    """
    params = dict(variables['params'])
    if 'fc' not in params:
        raise ValueError(
            "split_head: variables have no params['fc']; build the model "
            'with num_classes to get a classifier.'
        )
    fc = params.pop('fc')
    backbone = {**variables, 'params': params}
    head = {'kernel': fc['kernel'], 'bias': fc['bias']}
    return backbone, head
