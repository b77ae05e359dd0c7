r"""Task-incremental DLCFT: a head per task, chosen by the task id at test.

`seq_cifar10` (the default and only parameter in this release): CIFAR-10 in
5 tasks of 2 classes, EfficientNet-Lite0 pre-trained on ImageNet at 32 px,
the quick start's budget (100 steps on the first task, 50 on the others),
no replay. The heads are the blocks of one wide head; a task's examples train
and are scored only on their own block, and only the shared backbone is
regularized (spec §3.3).

  python -m experiments.run \
      --config=experiments/configs/task_il.py:seq_cifar10 \
      --config.data.npz_dir=DIR --workdir=runs/task_il

DIR holds train.npz / test.npz (keys image, label); without it the
committed 5x2 subset is used. Expected time on a 2-core CPU: about 3 minutes
on the subset. The paper's task-IL result is 95.79% (Seq-CIFAR-100, 10
tasks, CIFAR ResNet-18, 50,000 steps per task), not comparable with this
CPU-sized run.
"""

import ml_collections

from experiments.configs import class_il

PARAMETERS = ('seq_cifar10',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Task-IL config; `arg` names the benchmark (see PARAMETERS)."""
    if arg not in (None, '') + PARAMETERS:
        raise ValueError(
            f'Unknown task_il parameter {arg!r}; use one of {PARAMETERS}.'
        )
    config = class_il.get_config()
    config.setting = 'task_il'
    config.replay.buffer_size = 0  # no replay in the paper's task-IL runs
    return config
