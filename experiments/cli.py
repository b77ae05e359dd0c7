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


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says what to change."""


class DiskError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the
    message names the checkpoint that is intact."""


# The errors a user can cause or fix: a ConfigError (a ValueError), a
# missing file, a run that diverged, a full disk. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, DiskError)


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


def fail(message: str) -> None:
    """Ends the process with `error: message` on stderr and exit status 2."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _misspelled_field(e: LookupError, argv: list[str]) -> str:
    """One line for ml_collections' error on a config field that does not
    exist, naming the flag and the closest valid field."""
    key = str(_root_cause(e)).strip('\'"')
    text = str(e).replace('\\n', '\n')
    hint = ''
    if 'Did you mean' in text:
        hint = ' ' + text[text.index('Did you mean') :].split('\n')[0]
        hint = hint.replace(' instead of "' + key + '"', '').rstrip("'")
    flag = next(
        (
            a.split('=')[0]
            for a in argv
            if a.startswith('--config.')
            and key in a.split('=')[0].split('.')[1:]
        ),
        f'--config....{key}',
    )
    return (
        f'{flag}: the config has no field {key!r}.{hint} '
        '(experiments/configs/common.py lists every field.)'
    )


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake in a flag or in the config
    file's parameter turned into one line."""
    try:
        return flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        root = _root_cause(e)
        if isinstance(root, ValueError) and 'config file' not in str(root):
            # The config file's own check, e.g. an unknown benchmark.
            flag = str(e).split(': Error whilst parsing')[0]
            fail(f'{flag.removeprefix("flag ")}: {root}')
        fail(str(e).split('\n')[0])
    except flags.Error as e:
        fail(str(e).split('\n')[0])
    except (KeyError, AttributeError) as e:
        fail(_misspelled_field(e, argv))
    return []  # not reached


def _load(config: Any, path: str | None) -> Any:
    """The parsed config, or one line if its file could not be loaded."""
    try:
        config.keys()
    except OSError:
        fail(
            f'{path}: no such config file; use '
            'experiments/configs/class_il.py, task_il.py or data_il.py '
            '(optionally with :BENCHMARK).'
        )
    return config


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
        config = _load(config_flag.value, flags.FLAGS['config'].serialize())
        try:
            out = run(config, workdir_flag.value)
        except USER_ERRORS as e:
            if os.environ.get('DLCFT_TRACEBACK'):
                raise
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)
        if on_success is not None:
            on_success(out)

    app.run(_main, flags_parser=_parse_flags)
