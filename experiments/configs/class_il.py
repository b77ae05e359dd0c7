r"""Class-incremental DLCFT: one head that grows with the classes seen, no
task id at test, a small replay buffer (docs/method.md §1.3).

`--config=experiments/configs/class_il.py[:BENCHMARK]`, BENCHMARK one of
quick (the default), seq_cifar10, seq_cifar100. Each benchmark is one recipe
function in `common.py` whose docstring gives its command and measured time:

  python -m experiments.run --config=experiments/configs/class_il.py \
      --workdir=runs/class_il [--config.method=ranpac]

Any field can be overridden, e.g. `--config.train.steps_per_task=200`.
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The class-IL recipe of benchmark `arg` (None: the quick start)."""
    return common.get('class_il', arg)
