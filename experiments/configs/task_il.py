r"""Task-incremental DLCFT: a head per task, chosen by the task id at test.

The heads are the blocks of one wide head; a task's examples train and are
scored only on their own block, and only the shared backbone is regularized
(docs/method.md §4.1). No replay.

Parameters (`--config=experiments/configs/task_il.py:PARAM`):

* none: the quick start's CIFAR-10 5 x 2 subset and budget (about 3 minutes
  on a 2-core CPU).
* `seq_cifar10`: all of CIFAR-10 in 5 tasks of 2 classes (tfds `cifar10`, or
  `--config.data.npz_dir=DIR`), EfficientNet-Lite0 (ImageNet) at 32 px,
  600 + 4 x 300 steps:

    python -m experiments.run --config=experiments/configs/task_il.py:seq_cifar10 \
        --config.data.npz_dir=DIR --workdir=runs/task_il_cifar10

  About 25 minutes on a 2-core AMD EPYC CPU without a GPU (measured
  while other jobs shared the CPU); the README's results table lists the
  accuracy of each setting.
* `seq_cifar100`: the paper's task-IL benchmark, Seq-CIFAR-100 in 10 tasks
  grouped as in the authors' code (docs/method.md §1.2), CIFAR ResNet-18
  pre-trained on ImageNet-32 (`--config.backbone.checkpoint`), batch 128,
  50,000 steps per task (first x2). Paper: 95.79% (docs/method.md §9.2). Run
  time: a GPU job, not timed here (no GPU was available to this release;
  weeks on a 2-core CPU).
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Task-IL config; `arg` names the benchmark (common.BENCHMARKS)."""
    return common.get('task_il', arg)
