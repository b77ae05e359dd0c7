r"""Data-incremental DLCFT: one head over all classes, data arrive in chunks.

The training set is split into `num_tasks` equal random chunks (seeded by
config.seed); every task is tested on the full test set, so the average
accuracy is the test accuracy after the last task (the paper's metric). No
replay.

Parameters (`--config=experiments/configs/data_il.py:PARAM`):

* none: the quick start's CIFAR-10 subset in 5 chunks (about 3 minutes on a
  2-core CPU).
* `seq_cifar10`: all of CIFAR-10 in 5 chunks (tfds `cifar10`, or
  `--config.data.npz_dir=DIR`), EfficientNet-Lite0 (ImageNet) at 32 px,
  600 + 4 x 300 steps:

    python -m experiments.run --config=experiments/configs/data_il.py:seq_cifar10 \
        --config.data.npz_dir=DIR --workdir=runs/data_il_cifar10

  About 25 minutes on a 2-core AMD EPYC CPU without a GPU (measured
  while other jobs shared the CPU); the README's results table lists the
  accuracy of each setting.
* `seq_cifar100`: Seq-CIFAR-100 in 10 chunks of 5,000 images, CIFAR ResNet-18
  pre-trained on ImageNet-32 (`--config.backbone.checkpoint`), batch 128,
  10,000 steps per task. Paper: 82.70% (docs/method.md §9.1). Run time: a
  GPU job, not timed here (no GPU was available to this release; weeks on a
  2-core CPU).
* `seq_cifar100_100`: the same in 100 chunks of 500 images. Paper: 80.07%.
* `seq_mit67`: MIT Indoor-67 (`--config.data.mit67_dir=DIR` with Images/,
  TrainImages.txt, TestImages.txt) in 4 chunks, ResNet-18 with torchvision
  ImageNet weights (`--config.backbone.checkpoint=resnet18.pth`) at 224 px,
  resize 256 + random crop 224. Paper: 70.52% (docs/method.md §9.1). Run
  time: a GPU job, not timed here (no GPU was available to this release;
  weeks on a 2-core CPU).
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Data-IL config; `arg` names the benchmark (common.BENCHMARKS)."""
    return common.get('data_il', arg)
