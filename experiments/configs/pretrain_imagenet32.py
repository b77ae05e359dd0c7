r"""Pre-trains the Seq-CIFAR-100 backbone on ImageNet 32×32.

See docs/method.md §2.5.

CIFAR-style ResNet-18 (3×3 stem, no max-pool, width 1.0) with leaky ReLU,
trained from scratch on TFDS `imagenet_resized/32x32` (1,281,167 train /
50,000 validation images, 1000 classes) with the reference recipe: SGD,
momentum 0.9, coupled weight decay 1e-4, batch 512, 200 epochs, one-cycle
learning rate peaking at 0.2 after 10% of the steps, random crop (padding 4)
+ horizontal flip, ImageNet32 mean/std normalisation.

  python -m experiments.pretrain \
      --config=experiments/configs/pretrain_imagenet32.py \
      --workdir=runs/pretrain_imagenet32 \
      --config.data.tfds_data_dir=DIR

The dataset must already be prepared in array_record format under DIR
(`tfds build imagenet_resized/32x32 --file_format=array_record` on a machine
with TensorFlow; the pipeline itself needs no TensorFlow). Re-running the
same command resumes from the latest checkpoint in `workdir/checkpoints`.
The result is `workdir/backbone.npz` + `backbone.json`, which
`experiments.backbones.load_backbone` reads.

Cost: 2,502 steps per epoch, 500,400 steps in all, 2.6e8 images at about
0.56 GMACs forward (about 3x that with the backward pass), i.e. roughly
4e17 multiply-adds: a multi-GPU-day job, not run here. For scale, on the
2-core development CPU one step of the `:tiny` variant (width 0.125,
batch 8) takes about 0.03 s once compiled (250 images/s); the full-width
network at batch 512 is far beyond a CPU.

Expected result: the paper does not report the pre-training accuracy, and
the authors' run configuration is not recorded (that this recipe produced
their checkpoint is an inference, docs/method.md §2.5), so there is no
reference top-1 to compare against.

Config parameter `:tiny` (`--config=...pretrain_imagenet32.py:tiny`): width
0.125, batch 8, 20 steps, evaluation on 64 images — a smoke test of the
whole pipeline. Any field can be overridden, e.g. `--config.train.epochs=1`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

IMAGENET32_MEAN = (0.4811, 0.4575, 0.4079)
IMAGENET32_STD = (0.2604, 0.2532, 0.2682)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ImageNet-32 recipe (docs/method.md §2.5); `arg='tiny'`: smoke test.

    Args:
        arg: None/'' for the paper's recipe, 'tiny' for the small variant.

    Returns:
        The config.
    """
    if arg not in (None, '', 'tiny'):
        raise ValueError(f'unknown config parameter {arg!r}; try :tiny')
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = 'imagenet_resized/32x32'
    config.data.train_split = 'train'
    config.data.eval_split = 'validation'
    # The TFDS data_dir holding the prepared dataset (None: TFDS default).
    config.data.tfds_data_dir = config_dict.placeholder(str)
    config.data.num_classes = 1000
    config.data.image_size = 32
    config.data.augment = 'crop_flip'  # pad 4, random 32 px crop, flip
    config.data.crop_padding = 4
    config.data.resize_size = config_dict.placeholder(int)  # 224 px recipe
    config.data.mean = IMAGENET32_MEAN
    config.data.std = IMAGENET32_STD
    # Use only the first N training examples (None: all).
    config.data.max_train_examples = config_dict.placeholder(int)
    config.data.num_workers = 8  # host threads reading and augmenting

    config.model = ml_collections.ConfigDict()
    config.model.architecture = 'cifar_resnet18'
    config.model.width_multiplier = 1.0
    config.model.activation = 'leaky_relu'
    # A torchvision .pth/.safetensors ResNet to start from (None: scratch).
    config.model.init_checkpoint = config_dict.placeholder(str)
    config.model.require_init_checkpoint = False

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 512  # global, over all devices and hosts
    config.train.epochs = 200
    # Total steps; None derives them from epochs (the last partial batch of
    # every epoch is dropped). Sets the length of the schedule.
    config.train.num_steps = config_dict.placeholder(int)
    # Stop this invocation after this global step (None: run to the end);
    # rerunning with a larger value resumes from the checkpoint.
    config.train.max_steps = config_dict.placeholder(int)
    config.train.log_every = 100

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 0.2  # the one-cycle peak
    config.optim.schedule = 'onecycle'  # or 'constant'
    config.optim.pct_start = 0.1
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    # 'all' (torch.optim.SGD over model.parameters(), the reference) or
    # 'kernels' (conv/dense kernels only).
    config.optim.weight_decay_mask = 'all'

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 2500  # about one epoch
    config.checkpoint.max_to_keep = 2

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 1000
    config.eval.at_end = True
    # Also evaluate every N epochs (None: only at the end).
    config.eval.every_epochs = config_dict.placeholder(int)
    # Evaluate on the first N validation examples (None: all).
    config.eval.max_examples = config_dict.placeholder(int)

    if arg == 'tiny':
        config.model.width_multiplier = 0.125
        config.train.batch_size = 8
        config.train.num_steps = 20
        config.train.log_every = 5
        config.checkpoint.every_steps = 10
        config.eval.batch_size = 16
        config.eval.max_examples = 64
        config.data.num_workers = 2
    return config
