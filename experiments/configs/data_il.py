r"""Data-incremental DLCFT: one head over all classes, data arrive in chunks.

`seq_cifar10` (the default and only parameter in this release): the CIFAR-10
training set split into 5 equal random chunks (seeded by config.seed), one
10-way head, evaluation on the full test set after every task,
EfficientNet-Lite0 pre-trained on ImageNet at 32 px, the quick start's
budget (100 steps on the first task, 50 on the others), no replay.

  python -m experiments.run \
      --config=experiments/configs/data_il.py:seq_cifar10 \
      --config.data.npz_dir=DIR --workdir=runs/data_il

DIR holds train.npz / test.npz (keys image, label); without it the
committed 5x2 subset is used. Expected time on a 2-core CPU: about 3 minutes
on the subset. Every column of a row of the accuracy matrix is the same full
test set, so the average accuracy is the test accuracy after the last task,
the paper's data-IL metric (DLCFT: 82.70% on Seq-CIFAR-100 in 10 tasks with
a CIFAR ResNet-18; not comparable with this CPU-sized run).
"""

import ml_collections

from experiments.configs import class_il

PARAMETERS = ('seq_cifar10',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Data-IL config; `arg` names the benchmark (see PARAMETERS)."""
    if arg not in (None, '') + PARAMETERS:
        raise ValueError(
            f'Unknown data_il parameter {arg!r}; use one of {PARAMETERS}.'
        )
    config = class_il.get_config()
    config.setting = 'data_il'
    config.replay.buffer_size = 0
    return config
