"""What the two command-line runners share: the user-error type, the check
helper, and the `main` that turns a user's mistake into one message.

`experiments.run` (continual fine-tuning) and `experiments.pretrain`
(backbone pre-training) both end a run that cannot go on with one line,
`error: ...`, saying what to change, and exit status 2; nothing of a
checkpoint is lost, since the error is raised before any save or after the
last one completed. Set DLCFT_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

# The errors a user can cause: a ConfigError (a ValueError), a missing file
# and a run that diverged. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says what to change."""


def need(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def stop_if_not_finite(
    values: Mapping[str, float], where: str, advice: str
) -> None:
    """Raises FloatingPointError naming `where` if a value is NaN or ±Inf.

    The runners call it on the metrics they fetch at log steps, so a
    diverged run stops there, after its last good checkpoint.
    """
    if not all(math.isfinite(float(v)) for v in values.values()):
        raise FloatingPointError(
            f'Non-finite metrics at {where}: {dict(values)}. {advice}'
        )


def main(
    run: Callable[[Any, str], Any],
    *,
    config_help: str,
    workdir_help: str,
    verbosity: int = logging.WARNING,
    on_success: Callable[[Any], None] | None = None,
) -> None:
    """Defines --config and --workdir, then runs `run(config, workdir)`.

    The flags are defined here, when a runner starts, not at import time, so
    that any module can import the runners' functions.

    Args:
      run: The runner, e.g. `train.train_and_evaluate`.
      config_help: Help text of --config.
      workdir_help: Help text of --workdir.
      verbosity: absl logging level (WARNING: orbax logs every save at INFO).
      on_success: Called with the runner's return value.
    """
    config_flag = config_flags.DEFINE_config_file(
        'config', None, config_help, lock_config=True
    )
    workdir_flag = flags.DEFINE_string('workdir', None, workdir_help)
    flags.mark_flags_as_required(['config', 'workdir'])

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
        logging.set_verbosity(verbosity)
        try:
            out = run(config_flag.value, workdir_flag.value)
        except USER_ERRORS as e:
            if os.environ.get('DLCFT_TRACEBACK'):
                raise
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        if on_success is not None:
            on_success(out)

    app.run(_main)
