"""`train_and_evaluate(config, workdir)`: one continual fine-tuning run.

Read it top to bottom: `train_and_evaluate` is the whole story, in ~160
lines; each phase is a function of the run's fixed pieces (`Run`), the
train state and the position (`Position`), passed explicitly.

  set-up    check the config; load the data, split it into tasks; build the
            backbone ψ0 and the train state; compile the pmapped functions.
  resume    if WORKDIR/checkpoints holds a checkpoint of this config, restore
            state, buffer and position from it.
  for each task t = 0 .. T−1:
    begin       fresh optimizer moments, an N_t-step schedule, the outputs
                the task trains (class-IL: the classes seen so far).
    steps       N_t steps on batches of the task (`input_pipeline`), replay
                rows joining from the buffer; metrics logged at log steps; a
                checkpoint at orbax's interval (`checkpointing`).
    objective   one pass over the task's examples measures J_t and its gap
                to the closed-form head optimum (`convergence`); methods
                with `closed_form_head` set the head to that optimum.
    curvature   methods with a penalty: the task's curvature (K-FAC of the
                linearized model and the exact head block) enters the
                running average, and θ_t becomes the anchor.
    buffer      the task's examples are offered to the reservoir buffer
                (at the task's end, or step by step for Mammoth's methods).
    evaluation  accuracy on the test data of every task seen so far.
    report      log, TensorBoard, one printed line (`reporting`); a
                checkpoint of the finished task.
  outputs   results.json, summary.txt and results.png in WORKDIR.

Where things live: `training_plan` (what is trained: the tasks, or their
union for joint training), `resume`, `train_task` (the steps, with stream
insertion into the buffer), `finish_task` (objective, curvature, anchor,
task-end insertion) are the phases; batches are made in
`input_pipeline.py`, a step runs in `dlcft_jax.step` (pmapped by
`dlcft_jax.parallel`), checkpoints are written in `checkpointing.py`,
results reported in `reporting.py`; each `--config.method` is a record of
`dlcft_jax.methods` (its overrides in `methods.py`), and docs/method.md
describes the mathematics.

Scale. Every step, update and evaluation is `jax.pmap`ped over the local
devices and the train state stays replicated on them between tasks; the
global batch (train.batch_size + replayed rows) is split over all devices of
all hosts. With `config.distributed.initialize` the hosts join through
`jax.distributed.initialize()` first.

Determinism and resume. Every random draw is a pure function of (seed, task,
step) (`input_pipeline`), so a checkpoint needs only the train state, the
replay buffer and the position, and a resumed run ends with the results of
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import dlcft_jax as dj
from dlcft_jax import data_terms as dterms
from dlcft_jax import parallel
from dlcft_jax.data import ReplayBuffer
from experiments import (
    backbones,
    checkpointing,
    cli,
    config_checks,
    convergence,
    datasets,
    input_pipeline,
    methods,
    profiling,
    reporting,
)
from experiments.cli import ConfigError  # noqa: F401  (re-exported)
from experiments.input_pipeline import Task

# ----------------------------------------------------------------------------
# Small pure functions the loop is made of.


class Plan(NamedTuple):
    """What is trained, in order: the tasks, or their union (joint)."""

    train_tasks: list[Task]
    steps: list[int]
    joint: bool

    def last_seen(self, t: int, num_tasks: int) -> int:
        """The last task whose classes the model has met after training
        `t` (joint training meets them all at once)."""
        return num_tasks - 1 if self.joint else t

    def global_step(self, t: int, k: int) -> int:
        return sum(self.steps[:t]) + k


def training_plan(train_cfg, method: dj.Method, tasks: list[Task]) -> Plan:
    """N_t per trained task: `steps_per_task` (× `first_task_multiplier`
    for the first); joint training: the union, for all the steps."""
    per, first = train_cfg.steps_per_task, train_cfg.first_task_multiplier
    if method.trainer == 'joint':
        union = input_pipeline.union_task(tasks)
        return Plan([union], [per * (len(tasks) - 1 + first)], True)
    steps = [per * (first if t == 0 else 1) for t in range(len(tasks))]
    return Plan(list(tasks), steps, False)


def batch_spec(
    config, data: datasets.Dataset, num_classes: int, method: dj.Method
) -> input_pipeline.BatchSpec:
    """What the run's batches depend on (`input_pipeline.BatchSpec`)."""
    rep = method.replay
    der = None
    if rep.logit_weight > 0:
        der = (rep.logit_weight, rep.second_draw_weight)
    return input_pipeline.BatchSpec(
        seed=config.seed,
        setting=config.setting,
        batch_size=config.train.batch_size,
        replay_batch=methods.replay_batch(config, method),
        replay_draws=methods.replay_draws(config, method),
        num_classes=num_classes,
        classes_per_task=input_pipeline.classes_per_task(config),
        augment=bool(config.data.augment),
        augmentation=data.augmentation,
        der=der,
        distill=dterms.needs_teacher(method.terms),
        replay_weight=rep.label_weight,
    )


def initial_state(
    config, data, tasks, num_classes, method: dj.Method, spec
) -> dj.TrainState:
    """The train state at ψ0 (one device), BatchNorm statistics optionally
    re-estimated on the first task's images."""
    apply_fn, variables = backbones.build_backbone(config, data.mean, data.std)
    if config.backbone.bn_reestimate:
        variables = backbones.reestimate_batch_stats(
            apply_fn.train,
            variables,
            data.x_train[tasks[0].train_idx],
            config.backbone.bn_reestimate,
            config.train.batch_size,
            datasets.test_transform,
            data.augmentation,
        )
    image = datasets.test_transform(data.augmentation, data.x_train[:1])
    example = jnp.zeros(
        (spec.rows // jax.device_count(), *image.shape[1:]), jnp.uint8
    )
    bn_train = method.network.bn_train
    return dj.create_state(
        apply_fn,
        variables,
        num_classes=num_classes,
        example_input=example,
        method=method,
        train_apply_fn=apply_fn.train if bn_train else None,
    )


def buffer_spec(
    config, method: dj.Method, data, num_classes: int
) -> checkpointing.BufferSpec | None:
    """The replay buffer of the run (None without replay)."""
    if not methods.replay_batch(config, method):
        return None
    return checkpointing.BufferSpec(
        methods.buffer_size(config, method),
        data.x_train.shape[1:],
        num_classes,
        config.replay.store_logits or method.replay.logit_weight > 0,
    )


class Compiled(NamedTuple):
    """The pmapped functions of a run (the state has a device axis)."""

    step: Callable[..., Any]
    curvature: dict[str, Callable[..., Any]]
    end_task: Callable[..., Any]
    predict: Callable[..., Any]
    features: Callable[..., Any]


def compile_functions() -> Compiled:
    return Compiled(
        step=parallel.pmap_step(donate=True),
        curvature=parallel.pmap_curvature_fns(),
        end_task=jax.pmap(dj.end_task, donate_argnums=0),
        predict=jax.pmap(dj.predict, in_axes=(0, 0)),
        features=jax.pmap(
            lambda s, x: dj.train_state.features(s, s.params, x),
            in_axes=(0, 0),
        ),
    )


@functools.cache
def _begin_task_pmap() -> Callable[..., Any]:
    return jax.pmap(
        lambda s, mask, n: dj.begin_task(s, num_steps=n, class_mask=mask),
        in_axes=(0, None, None),
        donate_argnums=0,
    )


def begin_task_fn(n: int) -> Callable[..., Any]:
    """`dj.begin_task` with N_t = n, on the replicated state (one compiled
    program for every n: N_t is an argument, not a constant)."""
    fn = _begin_task_pmap()
    return lambda state, mask: fn(state, mask, np.int32(n))


def offer_to_buffer(
    buffer: ReplayBuffer,
    images: np.ndarray,
    rows: np.ndarray,
    task_ids,
    rng: np.random.Generator,
    logits_fn,
) -> None:
    """Offers examples to the reservoir, with the model's logits on them
    when the method stores logits (`logits_fn` not None)."""
    stored = logits_fn(images) if logits_fn is not None else None
    buffer.add(images, rows, task_ids, stored, rng=rng)


def fetch_metrics(metrics, where: str) -> dict[str, float]:
    """Device 0's step metrics as floats; stops a diverged run."""
    m = {
        name: float(v)
        for name, v in jax.device_get(
            parallel.host_unreplicate(metrics)
        ).items()
    }
    cli.stop_if_not_finite(
        m, where, 'Lower config.optim.learning_rate or check the data.'
    )
    return m


def evaluate(config, tasks, last, num_classes, scores_of) -> list[float]:
    """% accuracy on the test data of tasks 0..last, arg-max within each
    task's mask; `scores_of(j)` gives the class scores of task j's test
    images."""
    _, masks = input_pipeline.class_masks(config, last, num_classes)
    if config.setting == 'data_il':
        # Every task shares the full test set and the head: one pass.
        masks = masks[:1]
    out = []
    for j, mask in enumerate(masks):
        pred = np.argmax(np.where(mask > 0, scores_of(j), -np.inf), -1)
        out.append(100.0 * float(np.mean(pred == tasks[j].test_rows)))
    if config.setting == 'data_il':
        return out * (last + 1)
    return out


def task_summary(config, t: int, task: Task, accuracy, acc, joint, **timing):
    """The per-task record of results.json."""
    data_il = config.setting == 'data_il'
    return {
        'task': t,
        'classes': None if data_il else task.classes,
        'train_examples': int(len(task.train_idx)),
        'chunk_size': int(len(task.train_idx)) if data_il else None,
        'accuracy': accuracy,
        **reporting.accuracy_summary(acc, t, joint),
        **timing,
    }


def load_data(config) -> datasets.Dataset:
    """The run's data, with the validation split held out if asked."""
    data = datasets.load(config.data)
    if config.data.validation:
        data = datasets.hold_out(
            data, config.data.validation, config.data.validation_seed
        )
    return data


def announce(config, data, tasks, num_classes: int, chief: bool) -> None:
    """The run's first printed line."""
    if chief:
        print(
            f'{config.setting} / {config.method} on {data.name}: '
            f'{len(tasks)} tasks, {num_classes} classes, backbone '
            f'{config.backbone.name} at {config.backbone.image_size} px, '
            f'{jax.device_count()} devices on {jax.process_count()} hosts',
            flush=True,
        )


def results_record(
    config,
    *,
    data_name: str,
    tasks,
    num_classes: int,
    joint: bool,
    acc,
    per_task,
    num_trained: int,
    wall_time_s: float,
    method_record: dict | None,
) -> dict[str, Any]:
    """The results.json record of a run (both runners)."""
    done = len(per_task)
    data_il = config.setting == 'data_il'
    return {
        'complete': done == num_trained,
        'tasks_done': done,
        'setting': config.setting,
        'benchmark': config.benchmark,
        'method': config.method,
        'data': data_name,
        'num_tasks': len(tasks),
        'num_classes': num_classes,
        'classes_per_task': None if data_il else len(tasks[0].classes),
        'task_classes': None if data_il else [x.classes for x in tasks],
        # Joint training: one row, the model trained on the union.
        'joint': joint,
        'accuracy_matrix': acc,
        # After the last task done (all of them unless stop_after_tasks).
        **(
            reporting.accuracy_summary(acc, done - 1, joint)
            if done
            else reporting.accuracy_summary([[]], 0, True)
        ),
        'per_task': per_task,
        'wall_time_s': wall_time_s,
        # The method's record of parts, with the config's overrides.
        'method_record': method_record,
        'config': json.loads(config.to_json_best_effort()),
        'num_devices': jax.device_count(),
        'num_processes': jax.process_count(),
        'platform': jax.devices()[0].platform,
        'device_kind': jax.devices()[0].device_kind,
        'host': socket.gethostname(),
        'jax_version': jax.__version__,
    }


def write_results(results, profile, total_s, workdir, chief) -> None:
    """Adds the run's profile and checkpoint sizes to `results`, writes the
    outputs and prints where the time and the disk went (both runners)."""
    timing = profile.summary(total_s=total_s)
    results['profile'] = timing
    ckpt_bytes = checkpointing.sizes(workdir)
    results['checkpoint_bytes'] = {str(k): v for k, v in ckpt_bytes.items()}
    if chief:
        reporting.write_outputs(results, workdir)
        print(reporting.profile_line(timing), flush=True)
        print(reporting.checkpoint_line(ckpt_bytes))


def default_cache_dir() -> str:
    """The persistent compilation cache of this user: $JAX_COMPILATION_CACHE_DIR
    if set, else $XDG_CACHE_HOME/dlcft_jax/xla (~/.cache/dlcft_jax/xla)."""
    if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        return os.environ['JAX_COMPILATION_CACHE_DIR']
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(
        os.path.expanduser('~'), '.cache'
    )
    return os.path.join(root, 'dlcft_jax', 'xla')


def setup_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
    """Turns on JAX's persistent compilation cache (`default_cache_dir()`,
    `config.compilation_cache_dir` to move it, '' to turn it off): a second
    run, or another method with the same shapes, reads its programs from
    disk instead of compiling them. Every program is cached, however quick
    to compile (a run has many small ones). Returns the folder, or None."""
    path = config.compilation_cache_dir
    if path == '':
        return None
    path = os.path.expanduser(path or default_cache_dir())
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f'The compilation cache folder {path} cannot be created '
            f'({e.strerror or e}). Pass --config.compilation_cache_dir=DIR '
            "with a writable DIR, or '' to run without the cache."
        ) from None
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    return path


def init_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` with the config's (optional) fields."""
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {
        k: d[k]
        for k in ('coordinator_address', 'num_processes', 'process_id')
        if d[k] is not None
    }
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if 'already' not in str(e).lower():  # initialized by the caller
            raise


# ----------------------------------------------------------------------------
# The run: its fixed pieces, its position, and the phases of a task.


class Run(NamedTuple):
    """The fixed pieces of one run; the train state, the buffer and the
    position are passed apart, explicitly."""

    config: ml_collections.ConfigDict
    method: dj.Method
    plan: Plan
    data: datasets.Dataset
    tasks: list[Task]
    num_classes: int
    spec: input_pipeline.BatchSpec
    fns: Compiled
    buffer_spec: checkpointing.BufferSpec | None
    ckpt: Any
    log: reporting.RunLog
    profile: profiling.Profile
    chief: bool
    t_start: float


@dataclasses.dataclass
class Position:
    """Where a run is and what it has measured (a checkpoint's meta).

    Attributes:
      acc: the accuracy matrix so far.
      per_task: the per-task records so far.
      task, step: the next step to take.
      elapsed_s: wall seconds of the invocations before this one.
      train_s: training seconds of `task` before a resume.
    """

    acc: list[list[float | None]]
    per_task: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    task: int = 0
    step: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0

    def meta(self, run: Run, fingerprint, t, k, train_s=None) -> dict:
        return {
            'task': t,
            'steps_done': k,
            'accuracy_matrix': self.acc,
            'per_task': self.per_task,
            'elapsed_s': self.elapsed_s + time.time() - run.t_start,
            'task_timing': {} if train_s is None else {'train_s': train_s},
            'fingerprint': fingerprint,
        }


def outputs(run: Run, fn, state, images) -> np.ndarray:
    """`fn(state, x)` of `images` (test transform), in eval batches."""
    return input_pipeline.apply_batched(
        fn, state, images, run.config.eval.batch_size, run.data.augmentation
    )


def logits_fn(run: Run, state):
    """The logits to store with offered examples (None: not stored)."""
    if run.buffer_spec is None or not run.buffer_spec.store_logits:
        return None
    return functools.partial(outputs, run, run.fns.predict, state)


def save(run: Run, state, buffer, pos: Position, t, k, train_s=None):
    """A checkpoint at task t, step k (k = 0: task t − 1 finished)."""
    with run.profile.phase('checkpoint', t if k else t - 1):
        checkpointing.save(
            run.ckpt,
            run.plan.global_step(t, k),
            state=parallel.host_unreplicate(state),
            buffer=buffer,
            buffer_spec=run.buffer_spec,
            meta=pos.meta(
                run, checkpointing.fingerprint(run.config), t, k, train_s
            ),
            force=True,
        )


def resume(run: Run, workdir: Path, state, buffer):
    """(state, buffer, position) from the latest checkpoint of this config
    in `workdir`, or the fresh ones."""
    pos = Position([[None] * len(run.tasks) for _ in run.plan.train_tasks])
    found = checkpointing.restore_latest(
        run.ckpt,
        run.config,
        workdir,
        state=parallel.host_unreplicate(state),
        buffer_spec=run.buffer_spec,
    )
    if found is None:
        return state, buffer, pos
    _, host_state, buffer, saved = found
    pos = Position(
        acc=saved['accuracy_matrix'],
        per_task=saved['per_task'],
        task=saved['task'],
        step=saved['steps_done'],
        elapsed_s=saved['elapsed_s'],
        train_s=saved['task_timing'].get('train_s', 0.0),
    )
    print(
        f'resumed from {workdir / "checkpoints"} at task {pos.task + 1} '
        f'step {pos.step}',
        flush=True,
    )
    run.log.record(
        {'event': 'resumed', 'task': pos.task, 'steps_done': pos.step}
    )
    return parallel.host_replicate(host_state), buffer, pos


def train_task(run: Run, state, buffer, pos: Position, t: int):
    """Task t's steps (from `pos.step` after a resume): (state, training
    seconds, seconds spent waiting for input)."""
    task, n = run.plan.train_tasks[t], run.plan.steps[t]
    k0 = pos.step if pos.task == t else 0
    before = pos.train_s if k0 else 0.0  # seconds before a resume
    clock, input_wait = time.time(), 0.0
    phase = run.profile.begin('train', t)
    if k0 == 0:
        last = run.plan.last_seen(t, len(run.tasks))
        mask, _ = input_pipeline.class_masks(run.config, last, run.num_classes)
        state = begin_task_fn(n)(state, mask)
    spec, data = run.spec, run.data
    stream = buffer is not None and run.method.replay.insert == 'stream'
    batches = (
        input_pipeline.to_devices(
            input_pipeline.train_batch(spec, data, task, t, k, buffer)
        )
        for k in range(k0, n)
    )
    # With stream insertion a batch's replay rows depend on the step
    # before it: no read-ahead.
    if not stream:
        batches = input_pipeline.prefetch(batches)
    every = run.config.train.log_every
    progress = None
    if run.chief:
        progress = reporting.Progress(n, t, len(run.plan.steps), every=every)
    meter = reporting.Throughput()
    for k in range(k0, n):
        wait = time.time()
        batch = next(batches)
        wait = time.time() - wait
        input_wait += wait
        if stream:  # Mammoth's order: step k's rows offered after the draw
            pos_k = input_pipeline.step_positions(spec, task, t, k)
            offer_to_buffer(
                buffer,
                data.x_train[task.train_idx[pos_k]],
                task.train_rows[pos_k],
                t if task.train_task is None else task.train_task[pos_k],
                input_pipeline.rng(spec.seed, input_pipeline.RESERVOIR, t, k),
                logits_fn(run, state),
            )
        state, m = run.fns.step(state, batch)
        meter.add(spec.rows, wait)
        done, g = k + 1, run.plan.global_step(t, k + 1)
        logging = done % every == 0 or done == n
        saving = done < n and run.ckpt.should_save(g)
        if logging or saving:
            # Metrics reach the host only at log and save steps, and a
            # diverged state is never saved.
            m = fetch_metrics(m, f'task {t + 1} step {done}')
        if logging:
            m.update(meter.read())
            if progress is not None:
                progress.update(done, m)
            run.log.record({'task': t, 'step': done, 'global_step': g, **m})
            run.log.scalars({f'train/{key}': v for key, v in m.items()}, g)
        if saving:
            train_s = before + time.time() - clock
            save(run, state, buffer, pos, t, done, train_s)
    if progress is not None:
        progress.close()
    jax.block_until_ready(state)
    run.profile.add(t, 'data', input_wait)
    run.profile.end(phase, moved=input_wait)
    return state, before + time.time() - clock, input_wait


def measure_task(run: Run, state, buffer, t: int):
    """`convergence.measure` of task t's objective (and the closed-form
    head): (state, record, exact head factor or None)."""
    task = run.plan.train_tasks[t]
    last = run.plan.last_seen(t, len(run.tasks))
    mask, _ = input_pipeline.class_masks(run.config, last, run.num_classes)
    rep = run.method.replay
    replayed, shares = None, (run.spec.batch_size, 0)
    # Label-replayed rows share the label loss (DER's rows enter through
    # the stored-logit term instead, which is not measured here).
    if buffer is not None and len(buffer) and rep.logit_weight == 0:
        contents = buffer.contents()
        replayed = (contents['image'], contents['label'])
        shares = (run.spec.batch_size, run.spec.replay_batch)
    return convergence.measure(
        functools.partial(outputs, run, run.fns.features, state),
        state,
        run.data.x_train[task.train_idx],
        task.train_rows,
        replayed,
        class_mask=mask,
        batch_shares=shares,
        replay_weight=rep.label_weight,
        solve=run.method.closed_form_head,
    )


def finish_task(run: Run, state, buffer, t: int):
    """Task t's objective measured (the head solved in closed form if the
    method says so), its curvature enters the penalty, θ_t becomes the
    anchor, and (task-end insertion) its examples are offered to the
    buffer: (state, convergence record)."""
    task = run.plan.train_tasks[t]
    record, exact_a = {}, None
    if run.config.solver.measure or run.method.closed_form_head:
        state, record, exact_a = measure_task(run, state, buffer, t)
    curvature = None
    if state.penalty_state is not None:
        cfg = run.config
        curvature = dj.estimate_curvature(
            state,
            input_pipeline.curvature_batches(
                run.spec,
                run.data,
                task,
                t,
                num_batches=cfg.curvature.num_batches,
                batch_size=cfg.curvature.batch_size,
            ),
            jax.random.fold_in(jax.random.key(cfg.seed), t),
            **run.fns.curvature,
        )
        curvature = convergence.with_exact_head(curvature, exact_a)
    state = run.fns.end_task(state, curvature)
    if buffer is not None and run.method.replay.insert == 'task_end':
        offer_to_buffer(
            buffer,
            run.data.x_train[task.train_idx],
            task.train_rows,
            t,
            input_pipeline.rng(run.config.seed, input_pipeline.RESERVOIR, t),
            logits_fn(run, state),
        )
    return jax.block_until_ready(state), record


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
    """Runs (or resumes) the continual fine-tuning job of `config`.

    Args:
      config: see `experiments/configs/common.py`.
      workdir: output folder (created if missing); a checkpoint there is
        resumed.

    Returns:
      The results dict that was written to `workdir/results.json`.
    """
    # -- set-up ---------------------------------------------------------------
    config_checks.check_config(config)
    config_checks.check_workdir(workdir)
    init_distributed(config)
    config_checks.check_devices(config)
    setup_compilation_cache(config)
    method = methods.resolve(config)
    if not method.trains:  # NCM, RanPAC: their own small runner
        # Imported here: it builds on this module's functions.
        from experiments import training_free

        return training_free.run(config, workdir)
    t_start = time.time()
    profile = profiling.Profile().__enter__()
    workdir = Path(workdir)
    chief = jax.process_index() == 0
    data = load_data(config)
    tasks, num_classes = input_pipeline.make_tasks(config, data)
    plan = training_plan(config.train, method, tasks)
    spec = batch_spec(config, data, num_classes, method)
    state = initial_state(config, data, tasks, num_classes, method, spec)
    # The state stays replicated on the local devices from here on.
    state = parallel.host_replicate(jax.device_get(state))
    run = Run(
        config=config,
        method=method,
        plan=plan,
        data=data,
        tasks=tasks,
        num_classes=num_classes,
        spec=spec,
        fns=compile_functions(),
        buffer_spec=buffer_spec(config, method, data, num_classes),
        ckpt=checkpointing.manager(
            workdir,
            every_steps=config.checkpoint.every_steps,
            max_to_keep=config.checkpoint.max_to_keep,
        ),
        log=reporting.RunLog(workdir, chief=chief),
        profile=profile,
        chief=chief,
        t_start=t_start,
    )
    buffer = ReplayBuffer(run.buffer_spec.capacity) if run.buffer_spec else None
    announce(config, data, tasks, num_classes, chief)
    stop, diverged = config.train.stop_after_tasks, None
    pos = Position([[None] * len(tasks) for _ in plan.train_tasks])
    try:
        # -- resume -----------------------------------------------------------
        state, buffer, pos = resume(run, workdir, state, buffer)

        # -- for each task ----------------------------------------------------
        for t in range(pos.task, len(plan.train_tasks)):
            if stop is not None and t >= stop:
                break
            task, n = plan.train_tasks[t], plan.steps[t]
            resumed = pos.task == t and pos.step > 0
            state, train_s, input_wait = train_task(run, state, buffer, pos, t)

            # curvature, anchor, buffer
            clock = time.time()
            phase = profile.begin('curvature', t)
            state, objective = finish_task(run, state, buffer, t)
            profile.end(phase)
            curvature_s = time.time() - clock

            # evaluation
            clock = time.time()
            with profile.phase('eval', t):
                accuracy = evaluate(
                    config,
                    tasks,
                    plan.last_seen(t, len(tasks)),
                    num_classes,
                    lambda j, s=state: outputs(
                        run, run.fns.predict, s, data.x_test[tasks[j].test_idx]
                    ),
                )
            pos.acc[t][: len(accuracy)] = accuracy

            # report
            before = pos.train_s if resumed else 0.0
            summary = task_summary(
                config,
                t,
                task,
                accuracy,
                pos.acc,
                plan.joint,
                steps=n,
                train_s=train_s,
                # Share of this invocation's training time spent waiting for
                # input batches (the host pipeline starving the device).
                input_wait_frac=input_wait / max(train_s - before, 1e-9),
                curvature_s=curvature_s,
                eval_s=time.time() - clock,
                **objective,
            )
            pos.per_task.append(summary)
            reporting.report_task(
                run.log,
                summary,
                pos.acc,
                plan.global_step(t + 1, 0),
                chief=chief,
                joint=plan.joint,
            )
            pos.task, pos.step = t + 1, 0
            save(run, state, buffer, pos, t + 1, 0)
    except FloatingPointError as e:
        # A diverged run: partial results, the last good checkpoint kept.
        diverged = str(e)
    finally:
        # Async saves complete before the process ends, error or not.
        with profile.phase('checkpoint', max(len(pos.per_task) - 1, 0)):
            checkpointing.close(run.ckpt)
        run.log.close()
        profile.__exit__(None, None, None)

    # -- outputs --------------------------------------------------------------
    results = results_record(
        config,
        data_name=data.name,
        tasks=tasks,
        num_classes=num_classes,
        joint=plan.joint,
        acc=pos.acc,
        per_task=pos.per_task,
        num_trained=len(plan.train_tasks),
        wall_time_s=pos.elapsed_s + time.time() - t_start,
        method_record=method.as_dict(),
    )
    if diverged:
        results['stopped'] = diverged
    write_results(results, profile, time.time() - t_start, workdir, chief)
    if diverged:
        raise FloatingPointError(
            f'{diverged} The run stopped: results.json in {workdir} holds '
            'the tasks finished before it, and checkpoints/ keeps the last '
            'good state. Lower config.optim.learning_rate and start again '
            'in a new --workdir (a resumed run keeps its config).'
        )
    if chief and not results['complete']:
        print(
            f'stopped after task {len(pos.per_task)} of {len(tasks)} '
            f'(config.train.stop_after_tasks={stop}); run the same '
            'command with a larger value, or without it, to continue.'
        )
    return results
