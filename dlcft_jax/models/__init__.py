"""Network definitions: EfficientNet-Lite0, fast depthwise conv, weights."""

from dlcft_jax.models.depthwise import (
    DepthwiseConv2D,
    depthwise_conv,
    depthwise_conv_xla,
    same_padding,
)
from dlcft_jax.models.efficientnet_lite import (
    FEATURE_DIM,
    EfficientNetLite0,
    MBConvBlock,
    preprocess,
    resize,
)
from dlcft_jax.models.weights import (
    convert_state_dict,
    load_efficientnet_lite0,
    read_legacy_torch_state_dict,
    read_safetensors,
)

__all__ = [
    'DepthwiseConv2D',
    'EfficientNetLite0',
    'FEATURE_DIM',
    'MBConvBlock',
    'convert_state_dict',
    'depthwise_conv',
    'depthwise_conv_xla',
    'load_efficientnet_lite0',
    'preprocess',
    'read_legacy_torch_state_dict',
    'read_safetensors',
    'resize',
    'same_padding',
]
