r"""Re-tunes torchvision's ResNet-18 with leaky ReLU on ImageNet.

See docs/method.md §2.5.

The Seq-MIT-67 backbone: torchvision's ImageNet ResNet-18 weights, the ReLUs
switched to leaky ReLU (slope 0.01), then trained for one epoch on ImageNet
(TFDS `imagenet2012`) at 224 px so that the weights adapt to the new
activation. Recipe of the reference `train_imagenet.py`: SGD, momentum 0.9,
coupled weight decay 1e-4, batch 256, `--epochs 1`; the learning rate 1e-3
(constant over the single epoch) is inferred from the checkpoint name
`imagenet_resnet18_lrelu_lr0.001`. Images are normalised with the ImageNet
mean/std. Augmentation: shorter side resized to 256, random 224 px crop,
horizontal flip (evaluation: resize 256, centre crop 224); torchvision's
RandomResizedCrop is replaced by this cheaper crop for a one-epoch re-tune.

  python -m experiments.pretrain \
      --config=experiments/configs/retune_imagenet_resnet18.py \
      --workdir=runs/retune_imagenet_resnet18 \
      --config.model.init_checkpoint=resnet18-f37072fd.pth \
      --config.data.tfds_data_dir=DIR

`model.init_checkpoint` is required (a torchvision `.pth` or `.safetensors`
ResNet-18, converted by `dlcft_jax.models.convert_torch.load_resnet`; its
1000-way fc is kept). `imagenet2012` must be prepared manually in
array_record format under DIR (TFDS needs the downloaded ILSVRC tars).

Cost: 5,004 steps of batch 256 at 224 px, i.e. one ImageNet epoch — a few
GPU-hours on one modern GPU, dominated by JPEG decoding on the host; it was
not run here. The paper reports neither this step nor its accuracy; the
torchvision ReLU weights score 69.76% top-1, and a re-tuned leaky-ReLU
network should land near that.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import pretrain_imagenet32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The leaky-ReLU re-tune of torchvision's ResNet-18 (docs/method.md §2.5).

    Args:
        arg: Unused; present so every pre-training config takes a parameter.

    Returns:
        The config.
    """
    if arg not in (None, ''):
        raise ValueError(f'{__name__} takes no config parameter, got {arg!r}')
    config = pretrain_imagenet32.get_config()
    config.data.name = 'imagenet2012'
    config.data.image_size = 224
    config.data.augment = 'resize_crop_flip'
    config.data.resize_size = 256
    config.data.mean = IMAGENET_MEAN
    config.data.std = IMAGENET_STD
    config.data.num_workers = 16

    config.model.architecture = 'resnet18'
    config.model.activation = 'leaky_relu'
    config.model.require_init_checkpoint = True

    config.train.batch_size = 256
    config.train.epochs = 1
    config.train.log_every = 50

    config.optim.learning_rate = 1e-3
    config.optim.schedule = 'constant'

    config.checkpoint.every_steps = 1000
    config.eval.batch_size = 256
    return config
