r"""Class-incremental DLCFT: one growing head, no task id at test, replay.

Parameters (`--config=experiments/configs/class_il.py:PARAM`):

* none (the quick start): CIFAR-10 in 5 tasks of 2 classes from the subset
  committed in `experiments/data/cifar10_5x2` (300 train / 100 test images
  per class), EfficientNet-Lite0 pre-trained on ImageNet at 32 px, 100 steps
  on the first task and 50 on the others, a 200-image reservoir buffer
  replaying 16 images per step:

    python -m experiments.run --config=experiments/configs/class_il.py \
        --workdir=runs/class_il
    # any other method of experiments/methods.py, e.g. RanPAC or DER++
    python -m experiments.run --config=experiments/configs/class_il.py \
        --config.method=ranpac --workdir=runs/ranpac_class_il

  2-4 minutes each on a 2-core x86-64 CPU (the training-free ncm and
  ranpac: under a minute); the README's "Quick-start results" lists every
  method's accuracy and time (`python -m benchmarks.methods_table`).

* `seq_cifar10`: all of CIFAR-10 (tfds `cifar10`, or
  `--config.data.npz_dir=DIR` with train.npz / test.npz), same backbone,
  600 + 4 x 300 steps:

    python -m experiments.run --config=experiments/configs/class_il.py:seq_cifar10 \
        --config.data.npz_dir=DIR --workdir=runs/class_il_cifar10

  About 25 minutes on a 2-core AMD EPYC CPU without a GPU (measured
  while other jobs shared the CPU); the README's results table lists the
  accuracy of each setting.

* `seq_cifar100`: the paper's class-IL benchmark, Seq-CIFAR-100 in 10 tasks
  of 10 classes in natural order, CIFAR ResNet-18 pre-trained on ImageNet-32
  (`--config.backbone.checkpoint=backbone.npz` from `experiments.pretrain`),
  batch 128 + a 200-image buffer replaying 32, 10,000 steps per task (first
  x2). Paper: 59.98% average accuracy (docs/method.md §9.2). Run time: 110,000
  linearized ResNet-18 steps at batch 160, weeks on a 2-core CPU (about 5 s
  per step at batch 32, README "Speed"); not timed on a GPU, none was
  available to this release.

Any field can be overridden, e.g. `--config.train.steps_per_task=200`.
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Class-IL config; `arg` names the benchmark (common.BENCHMARKS)."""
    return common.get('class_il', arg)
