r"""Task-incremental DLCFT: a head per task, picked by the task id at test.

The heads are blocks of one wide head; a task's examples train and are
scored on their own block only, and only the shared backbone is regularized
(docs/method.md §1.2, §4.1). No replay.
`--config=experiments/configs/task_il.py[:BENCHMARK]`, BENCHMARK one of
quick, seq_cifar10, seq_cifar100 (recipes, commands and times: `common.py`).
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The task-IL recipe of benchmark `arg` (None: the quick start)."""
    return common.get('task_il', arg)
