r"""Runs a continual fine-tuning experiment.

  python -m experiments.run --config=experiments/configs/class_il.py \
      --workdir=runs/class_il [--config.method=finetune ...]

Everything reusable lives in `dlcft_jax`; `experiments.train` holds the task
loop. A configuration or data error ends the run with one message saying what to
change (set DLCFT_TRACEBACK=1 to see the traceback instead).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import train

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'A config file under experiments/configs/.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for results.json and logs.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    # WARNING: orbax reports every save at INFO; the runner prints its own.
    logging.set_verbosity(logging.WARNING)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Configuration and data errors (train.ConfigError is a ValueError)
        # end with one message that says what to change.
        if os.environ.get('DLCFT_TRACEBACK'):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main)
