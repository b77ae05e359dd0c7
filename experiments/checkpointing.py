"""Where a checkpoint is written and read: orbax, in WORKDIR/checkpoints.

A checkpoint of the continual runner holds what cannot be recomputed (see
`state_tree`): the trained parameters, the optimizer's moments and counters,
the penalty's curvature (its symmetric factors as upper triangles) and task
count, the replay buffer as fixed-shape arrays, and `meta`, a JSON item with
the position (task, steps done), the results so far and the config's
fingerprint. It leaves out what the run rebuilds: ψ0 and its frozen
statistics (from the backbone), the penalty's anchor θ_{t−1} (from the
previous model, `centre`), and, in a checkpoint taken between two tasks, the
optimizer's moments (the next task starts fresh ones) and `centre` (equal to
the parameters there). Every random draw of a run is a pure function of
(seed, task, step), so nothing else is needed for a resumed run to end with
the results of an uninterrupted one.

Cadence: orbax's own save-decision policy, `FixedIntervalPolicy` on the
global step (`checkpoint.every_steps`, 0 for none), plus its preemption
policy on multi-host TPU jobs; the runner forces a save at the end of every
task. Saves are asynchronous; `close` waits for the last one.

Resume order: (1) the latest checkpoint's `meta` alone is read and its
fingerprint compared with the config (a run of another configuration is
refused before any array is read); (2) state, buffer and meta are restored
into templates of the right shapes; (3) the runner continues at
(task, steps done).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from dlcft_jax import penalty, train_state
from dlcft_jax.data import ReplayBuffer
from experiments.cli import ConfigError, DiskError

# Config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = (
    'checkpoint',
    'compilation_cache_dir',
    'distributed',
    'train.log_every',
    'train.stop_after_tasks',
    'data.npz_dir',
    'data.tfds_data_dir',
    'data.mit67_dir',
    'data.cache_dir',
    'data.download',
    'backbone.checkpoint',
    'eval.batch_size',
)

# The TrainState fields every checkpoint holds.
_STATE_FIELDS = ('step', 'task', 'num_steps', 'params', 'class_mask')


def manager(
    workdir: Path,
    *,
    every_steps: int,
    max_to_keep: int,
    asynchronous: bool = True,
) -> ocp.CheckpointManager:
    """An orbax manager of WORKDIR/checkpoints that saves every `every_steps`
    global steps (0: only when forced) and on preemption."""
    policies = [checkpoint_managers.PreemptionCheckpointingPolicy()]
    if every_steps:
        policies.append(checkpoint_managers.FixedIntervalPolicy(every_steps))
    return ocp.CheckpointManager(
        (workdir / 'checkpoints').absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=asynchronous,
            save_decision_policy=checkpoint_managers.AnySavePolicy(policies),
            # Decide by the step alone, not by whether a save is running, so
            # that the saved steps do not depend on the disk's speed.
            enable_should_save_is_saving_in_progress_check=False,
        ),
    )


# ----------------------------------------------------------------------------
# Config fingerprint.


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that decide the results (flat, dotted names)."""
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f'{prefix}{key}'
            if isinstance(value, dict):
                walk(name + '.', value)
            elif not any(
                name == f or name.startswith(f + '.') for f in RESUMABLE_FIELDS
            ):
                flat[name] = value

    walk('', json.loads(config.to_json_best_effort()))
    return flat


def check_resumable(
    config: ml_collections.ConfigDict, meta: dict[str, Any], workdir: Path
) -> None:
    """Raises ConfigError if `meta` was saved by a run of another config."""
    saved = meta.get('fingerprint', {})
    now = fingerprint(config)
    diff = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k)
    )
    if diff:
        shown = ', '.join(
            f'{k} (saved {saved.get(k)!r}, now {now.get(k)!r})'
            for k in diff[:5]
        )
        raise ConfigError(
            f'{workdir} holds a checkpoint of a run with another '
            f'configuration: {shown}. Re-run with the original values to '
            'resume it, or choose a new --workdir.'
        )


# ----------------------------------------------------------------------------
# What a checkpoint holds.


class BufferSpec(NamedTuple):
    """The fixed shapes of a replay buffer in a checkpoint."""

    capacity: int
    image_shape: tuple[int, ...]
    num_classes: int
    store_logits: bool


def _is_penalty(x) -> bool:
    return isinstance(x, penalty.PenaltyState)


_COUNTERS = ('num_tasks', 'last_value', 'cached', 'count')


def _triangles(m):
    """The upper triangle (with the diagonal) of a square factor, as a flat
    array along the last axis; other arrays unchanged."""
    m = np.asarray(m)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        return m
    rows, cols = np.triu_indices(m.shape[-1])
    return m[..., rows, cols]


def _square(packed, like):
    """Inverse of `_triangles`, `like` giving the full shape and dtype."""
    if np.ndim(like) < 2 or like.shape[-1] != like.shape[-2]:
        return np.asarray(packed)
    n = like.shape[-1]
    rows, cols = np.triu_indices(n)
    m = np.zeros(like.shape, like.dtype)
    m[..., rows, cols] = packed
    m[..., cols, rows] = packed
    return m


def state_tree(state, *, between_tasks: bool) -> dict[str, Any]:
    """The parts of a (host) TrainState that a checkpoint holds.

    Always: position, parameters, class mask, the penalty's curvature
    (packed) and counters (and, within a task, the lagged product of
    `penalty_every` > 1). Within a task also `centre` (θ_{t−1}, the anchor)
    and the optimizer's moments; between two tasks (`between_tasks`, saved
    after `end_task`) neither: `centre` equals the parameters, and
    `begin_task` makes fresh moments.
    """
    tree = {name: getattr(state, name) for name in _STATE_FIELDS}
    if state.method.network.bn_train:  # its BatchNorm statistics were trained
        tree['params0'] = state.params0
    leaves = jax.tree.leaves(state.opt_state, is_leaf=_is_penalty)
    tree['penalties'] = [
        {
            'curvature': jax.tree.map(_triangles, p.curvature),
            **{
                k: getattr(p, k)
                for k in _COUNTERS
                if getattr(p, k) is not None
                # The first step of a task recomputes a lagged product.
                and not (between_tasks and k == 'cached')
            },
        }
        for p in leaves
        if _is_penalty(p)
    ]
    if not between_tasks:
        tree['centre'] = state.centre
        tree['moments'] = [x for x in leaves if not _is_penalty(x)]
    return tree


def state_from_tree(tree: dict[str, Any], template, *, between_tasks: bool):
    """The TrainState of a restored `state_tree`; `template` (the run's
    initial host state) gives ψ0, the structure and what was left out."""
    state = template.replace(**{k: tree[k] for k in _STATE_FIELDS})
    if 'params0' in tree:
        state = state.replace(params0=tree['params0'])
    centre = state.params if between_tasks else tree['centre']
    # Copies: a step that donates its input must not see one buffer twice.
    state = state.replace(centre=jax.tree.map(np.array, centre))
    # The anchor θ_{t−1} is the previous model, as the optimizer sees it.
    anchor = jax.tree.map(np.array, train_state.optimizer_params(state, centre))
    leaves, treedef = jax.tree.flatten(template.opt_state, is_leaf=_is_penalty)
    saved_penalties = iter(tree['penalties'])
    moments = iter(tree.get('moments', []))
    out = []
    for like in leaves:
        if _is_penalty(like):
            saved = next(saved_penalties)
            out.append(
                like.replace(
                    anchor=anchor,
                    curvature=jax.tree.map(
                        _square, saved['curvature'], like.curvature
                    ),
                    **{k: saved[k] for k in _COUNTERS if k in saved},
                )
            )
        else:  # between tasks: replaced by begin_task's fresh moments
            out.append(like if between_tasks else next(moments))
    return state.replace(opt_state=jax.tree.unflatten(treedef, out))


def buffer_tree(buffer: ReplayBuffer | None, spec: BufferSpec) -> dict:
    """The buffer as `spec.capacity` rows of fixed-shape arrays."""
    cap = spec.capacity
    tree = {
        'num_seen': np.asarray(
            0 if buffer is None else buffer.num_seen, np.int64
        ),
        'images': np.zeros((cap, *spec.image_shape), np.uint8),
        'labels': np.zeros((cap,), np.int32),
        'task_ids': np.zeros((cap,), np.int32),
        'logits': np.zeros((cap, spec.num_classes), np.float32),
    }
    if buffer is not None:
        sd, size = buffer.state_dict(), len(buffer)
        for key in ('images', 'labels', 'task_ids', 'logits'):
            if key in sd:
                tree[key][:size] = sd[key]
    return tree


def buffer_from_tree(tree: dict, spec: BufferSpec) -> ReplayBuffer:
    num_seen = int(tree['num_seen'])
    size = min(spec.capacity, num_seen)
    sd = {'capacity': spec.capacity, 'num_seen': num_seen}
    if size:
        for key in ('images', 'labels', 'task_ids'):
            sd[key] = np.asarray(tree[key])[:size]
        if spec.store_logits:
            sd['logits'] = np.asarray(tree['logits'])[:size]
    return ReplayBuffer.from_state_dict(sd)


# ----------------------------------------------------------------------------
# Save and restore.


def save(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    state,
    buffer: ReplayBuffer | None,
    buffer_spec: BufferSpec | None,
    meta: dict[str, Any],
    force: bool = False,
) -> bool:
    """Saves (state, buffer, meta) at global `step` if the policy says so
    (always with `force`). `state` is a host TrainState. Returns whether a
    save started."""
    between = meta['steps_done'] == 0
    items = {
        'state': ocp.args.StandardSave(
            state_tree(state, between_tasks=between)
        ),
        'meta': ocp.args.JsonSave(meta),
    }
    if buffer_spec is not None:
        items['buffer'] = ocp.args.StandardSave(
            buffer_tree(buffer, buffer_spec)
        )
    try:
        return mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except OSError as e:
        raise _disk_error(mngr, step, e) from None


def _disk_error(mngr: ocp.CheckpointManager, step: int, e: OSError):
    kept = [s for s in mngr.all_steps() if s != step]
    intact = (
        f'checkpoint {max(kept)} is intact' if kept else 'no checkpoint is lost'
    )
    return DiskError(
        f'Saving checkpoint {step} in {mngr.directory} failed '
        f'({e.strerror or e}); {intact}. Free space (or fix the folder) and '
        'run the same command to resume from it.'
    )


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The position and fingerprint of checkpoint `step` (cheap)."""
    return mngr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )['meta']


def restore(
    mngr: ocp.CheckpointManager,
    step: int,
    *,
    state,
    buffer_spec: BufferSpec | None,
    between_tasks: bool,
) -> tuple[Any, ReplayBuffer | None, dict[str, Any]]:
    """(state, buffer, meta) of checkpoint `step`; `state` is a host
    TrainState of the run, used as the template (values restore as NumPy);
    `between_tasks`: the checkpoint was taken between two tasks (its meta's
    `steps_done` is 0), see `state_tree`."""
    template = jax.device_get(state_tree(state, between_tasks=between_tasks))
    items = {
        'state': ocp.args.StandardRestore(template),
        'meta': ocp.args.JsonRestore(),
    }
    if buffer_spec is not None:
        items['buffer'] = ocp.args.StandardRestore(
            buffer_tree(None, buffer_spec)
        )
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    buffer = None
    if buffer_spec is not None:
        buffer = buffer_from_tree(out['buffer'], buffer_spec)
    restored = state_from_tree(out['state'], state, between_tasks=between_tasks)
    return restored, buffer, out['meta']


def restore_latest(
    mngr: ocp.CheckpointManager,
    config: ml_collections.ConfigDict,
    workdir: Path,
    *,
    state,
    buffer_spec: BufferSpec | None,
) -> tuple[int, Any, ReplayBuffer | None, dict[str, Any]] | None:
    """(step, state, buffer, meta) of the newest readable checkpoint, or
    None when there is none.

    A checkpoint that cannot be read (cut short by a crash or a full disk,
    or damaged) is moved to WORKDIR/checkpoints_unreadable/ with a warning
    naming it, and the one before it is tried: nothing is deleted, and the
    run goes on from the last good state. A checkpoint of another
    configuration is refused (ConfigError) before any array is read.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = read_meta(mngr, step)
        except Exception as e:  # noqa: BLE001 - any damage: try the previous
            _set_aside(mngr, step, workdir, e)
            continue
        check_resumable(config, meta, workdir)
        try:
            host_state, buffer, meta = restore(
                mngr,
                step,
                state=state,
                buffer_spec=buffer_spec,
                between_tasks=meta['steps_done'] == 0,
            )
        except Exception as e:  # noqa: BLE001 - any damage: try the previous
            _set_aside(mngr, step, workdir, e)
            continue
        return step, host_state, buffer, meta
    return None


def _set_aside(
    mngr: ocp.CheckpointManager, step: int, workdir: Path, error: Exception
) -> None:
    src = Path(mngr.directory) / str(step)
    dest = workdir / 'checkpoints_unreadable' / str(step)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest = dest.with_name(f'{step}.{len(list(dest.parent.iterdir()))}')
    src.rename(dest)
    mngr.reload()
    reason = str(error).strip().splitlines()[0] if str(error) else ''
    print(
        f'warning: checkpoint {src} cannot be read ({type(error).__name__}: '
        f'{reason[:200]}); moved to {dest}, trying the one before it.',
        flush=True,
    )


def sizes(workdir: Path) -> dict[int, int]:
    """Bytes on disk of each checkpoint in WORKDIR/checkpoints, by step."""
    root = Path(workdir) / 'checkpoints'
    if not root.is_dir():
        return {}
    return {
        int(d.name): sum(f.stat().st_size for f in d.rglob('*') if f.is_file())
        for d in root.iterdir()
        if d.name.isdigit()
    }


def close(mngr: ocp.CheckpointManager) -> None:
    """Waits for the last asynchronous save, then closes the manager."""
    try:
        mngr.wait_until_finished()
    except OSError as e:  # an asynchronous write that failed
        raise _disk_error(mngr, mngr.latest_step() or 0, e) from None
    finally:
        mngr.close()
