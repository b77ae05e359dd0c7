"""Backbones (EfficientNet-Lite0, ResNets), fast depthwise conv, weights."""

from dlcft_jax.models.convert_torch import (
    convert_resnet_state_dict,
    load_resnet,
    read_torch_state_dict,
)
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
from dlcft_jax.models.resnet import (
    CifarResNet18,
    ResNet,
    cifar_resnet18,
    feature_dim,
    resnet18,
    resnet50,
    split_head,
)
from dlcft_jax.models.weights import (
    convert_state_dict,
    load_efficientnet_lite0,
    read_legacy_torch_state_dict,
    read_safetensors,
)

__all__ = [
    'CifarResNet18',
    'ResNet',
    'cifar_resnet18',
    'convert_resnet_state_dict',
    'feature_dim',
    'load_resnet',
    'read_torch_state_dict',
    'resnet18',
    'resnet50',
    'split_head',
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
