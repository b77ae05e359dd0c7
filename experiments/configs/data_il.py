r"""Data-incremental DLCFT: one head over all classes, the training set
arriving in `num_tasks` equal random chunks (seeded by config.seed); every
task is tested on the full test set (docs/method.md §1.1). No replay.

`--config=experiments/configs/data_il.py[:BENCHMARK]`, BENCHMARK one of
quick, seq_cifar10, seq_cifar100, seq_cifar100_100, seq_mit67 (recipes,
commands and times: `common.py`).
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The data-IL recipe of benchmark `arg` (None: the quick start)."""
    return common.get('data_il', arg)
