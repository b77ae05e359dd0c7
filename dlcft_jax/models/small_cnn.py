"""A small convolutional backbone for tests, examples and quick CPU runs.

It has every layer kind the K-FAC estimator handles: a strided conv with
explicit asymmetric padding, BatchNorm (frozen unless `train=True`), leaky
ReLU, a depthwise conv (`nn.Conv` with feature_group_count = channels, or the
fast `DepthwiseConv2D`), a 1×1 conv with a bias, global average pooling and a
dense projection to the feature vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlcft_jax.models.depthwise import DepthwiseConv2D


class SmallConvNet(nn.Module):
    """A few-thousand-parameter feature extractor g(x) -> (B, features).

    Attributes:
      width: channels of the conv layers.
      features: size of the output feature vector.
      depthwise_impl: 'xla' (nn.Conv with groups) or 'shift' (DepthwiseConv2D).
      depthwise_bias: give the 'xla' depthwise conv a bias.
    """

    width: int = 4
    features: int = 6
    depthwise_impl: str = 'xla'
    depthwise_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(
            self.width,
            (3, 3),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            use_bias=False,
            name='conv',
        )(x)
        x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
        x = nn.leaky_relu(x, 0.01)
        if self.depthwise_impl == 'xla':
            x = nn.Conv(
                self.width,
                (3, 3),
                feature_group_count=self.width,
                padding='SAME',
                use_bias=self.depthwise_bias,
                name='dw',
            )(x)
        else:
            x = DepthwiseConv2D(
                self.width, (3, 3), (1, 1), ((1, 1), (1, 1)), name='dw'
            )(x)
        x = nn.leaky_relu(x, 0.01)
        x = nn.Conv(self.width + 2, (1, 1), name='pw')(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.features, name='fc')(x)


def init_small(rng: jax.Array, input_shape=(4, 8, 8, 3), **kwargs):
    """(apply_fn, variables) of a `SmallConvNet` with non-trivial BN stats."""
    model = SmallConvNet(**kwargs)
    k1, k2, k3 = jax.random.split(rng, 3)
    variables = model.init(k1, jnp.zeros(input_shape, jnp.float32))
    stats = variables['batch_stats']['bn']
    variables['batch_stats']['bn'] = {
        'mean': 0.1 * jax.random.normal(k2, stats['mean'].shape),
        'var': 1.0 + 0.2 * jax.random.uniform(k3, stats['var'].shape),
    }
    return model.apply, variables
