"""Checkpoints and exact resume of the continual runner.

A run interrupted after any checkpoint, in the middle of a task or between
tasks, and started again with the same command must end with the same
results.json as a run that was never interrupted (timings aside).
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_run import cli_command, read_results, tiny_config, without_timings

from experiments import checkpointing, train


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, saves):
    """Makes the runner stop right after its `saves`-th checkpoint save;
    returns the list of global steps saved."""
    save = checkpointing.save
    calls = []

    def save_then_stop(mngr, g, **kwargs):
        save(mngr, g, **kwargs)
        calls.append(g)
        if len(calls) == saves:
            raise Interrupted(g)

    monkeypatch.setattr(checkpointing, 'save', save_then_stop)
    return calls


@pytest.mark.parametrize(
    'stop_after_saves,store_logits', [(2, False), (4, True)]
)
def test_resume_after_an_interruption_gives_the_same_results(
    tmp_path, npz_dir, monkeypatch, stop_after_saves, store_logits
):
    # Checkpoints of the tiny run (global steps): task 1 at 2 and 4, its end
    # at 6, task 2 at 8 (mid-task, buffer full), its end at 9. Stopping
    # after the 2nd save resumes task 1 at step 4; after the 4th, task 2 at
    # step 2 with the replay buffer (and, DER-style, the logits stored at
    # insertion) restored from the checkpoint.
    def config():
        return tiny_config(npz_dir, **{'replay.store_logits': store_logits})

    reference = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
    workdir = tmp_path / 'interrupted'
    calls = _interrupt_after(monkeypatch, stop_after_saves)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config(), str(workdir))
    assert not (workdir / 'results.json').exists()
    # The checkpoint was completed before the exception left the runner.
    steps = sorted(
        int(p.name)
        for p in (workdir / 'checkpoints').iterdir()
        if p.name.isdigit()
    )
    assert steps[-1] == calls[-1]
    monkeypatch.undo()

    if store_logits:
        # The checkpoint holds the buffer with the logits at insertion.
        manager = ocp.CheckpointManager((workdir / 'checkpoints').absolute())
        saved = manager.restore(
            calls[-1],
            args=ocp.args.Composite(buffer=ocp.args.StandardRestore()),
        )['buffer']
        manager.close()
        size = min(int(saved['num_seen']), 10)
        assert size == 10  # task 1's 40 images were offered to 10 slots
        logits = np.asarray(saved['logits'])[:size]
        assert logits.shape == (size, 4) and np.all(np.isfinite(logits))
        assert np.abs(logits).sum() > 0
    resumed = train.train_and_evaluate(config(), str(workdir))
    assert without_timings(resumed) == without_timings(reference)
    assert without_timings(read_results(workdir)) == without_timings(
        read_results(tmp_path / 'straight')
    )
    log = [json.loads(line) for line in (workdir / 'log.jsonl').open()]
    resumes = [e for e in log if e.get('event') == 'resumed']
    assert len(resumes) == 1
    expected = {2: (0, 4), 4: (1, 2)}[stop_after_saves]
    assert (resumes[0]['task'], resumes[0]['steps_done']) == expected

    # A finished run started again only rewrites its outputs.
    again = train.train_and_evaluate(config(), str(workdir))
    assert without_timings(again) == without_timings(reference)


def test_resume_refuses_another_configuration(tmp_path, npz_dir):
    workdir = tmp_path / 'run'
    train.train_and_evaluate(tiny_config(npz_dir), str(workdir))
    with pytest.raises(train.ConfigError, match='train.steps_per_task'):
        train.train_and_evaluate(
            tiny_config(npz_dir, **{'train.steps_per_task': 4}), str(workdir)
        )
    # A head of another width: refused before any array is read.
    with pytest.raises(train.ConfigError, match='data.num_tasks'):
        train.train_and_evaluate(
            tiny_config(npz_dir, **{'data.num_tasks': 1}), str(workdir)
        )


def test_killed_run_resumes_to_the_same_results(tmp_path, npz_dir, repo_root):
    """SIGKILL in the middle of a run, then the same command again."""
    overrides = {'train.steps_per_task': 12, 'checkpoint.every_steps': 3}
    reference = train.train_and_evaluate(
        tiny_config(npz_dir, **overrides), str(tmp_path / 'straight')
    )
    workdir = tmp_path / 'killed'
    cmd = cli_command(workdir, npz_dir, **overrides)
    proc = subprocess.Popen(
        cmd,
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Kill it once a mid-run checkpoint (global step >= 9, in task 1 of
    # 24 steps) is on disk: the kill may land anywhere after it.
    deadline = time.time() + 300
    ckpt_dir = workdir / 'checkpoints'
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(
            p.name.isdigit() and int(p.name) >= 9 for p in ckpt_dir.iterdir()
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (workdir / 'results.json').exists()

    out = subprocess.run(
        cmd, cwd=repo_root, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'resumed from' in out.stdout
    assert without_timings(read_results(workdir)) == without_timings(reference)


def test_der_pp_resumes_mid_task_to_the_same_results(
    tmp_path, npz_dir, monkeypatch
):
    """DER++: a buffer filled from the stream with logits at insertion, two
    replay draws a step and trained BatchNorm statistics (saved with the
    state) all resume exactly from a mid-task checkpoint."""

    def config():
        return tiny_config(npz_dir, method='derpp')

    reference = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
    workdir = tmp_path / 'interrupted'
    _interrupt_after(monkeypatch, 4)  # task 2, step 2
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config(), str(workdir))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(config(), str(workdir))
    assert without_timings(resumed) == without_timings(reference)
    # Control: with frozen BatchNorm statistics the losses differ, so the
    # statistics really were trained (and, above, restored).
    frozen = tiny_config(npz_dir, method='derpp')
    frozen.baselines.bn_train = False
    train.train_and_evaluate(frozen, str(tmp_path / 'frozen'))

    def losses(w):
        log = [json.loads(line) for line in (w / 'log.jsonl').open()]
        return [e['loss'] for e in log if 'loss' in e]

    assert losses(tmp_path / 'frozen') != losses(tmp_path / 'straight')


@pytest.mark.parametrize('saves', [3, 4])
def test_non_linear_penalty_with_a_lagged_product_resumes(
    tmp_path, npz_dir, monkeypatch, saves
):
    """OSLA (non-linear network: the anchor ψ0 + Δ is rebuilt from the saved
    previous model) with the penalty product every 2 steps resumes exactly
    from the checkpoint between the tasks (3rd save: no moments, no lagged
    product) and from one within task 2 (4th: both saved)."""

    def config():
        return tiny_config(
            npz_dir, method='osla', **{'curvature.penalty_every': 2}
        )

    reference = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
    workdir = tmp_path / 'interrupted'
    _interrupt_after(monkeypatch, saves)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config(), str(workdir))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(config(), str(workdir))
    assert without_timings(resumed) == without_timings(reference)


def test_a_checkpoint_holds_what_changes(tmp_path, npz_dir):
    """Between tasks a checkpoint holds the parameters, the packed curvature
    and the counters: no ψ0, no anchor, no moments, no second copy of the
    parameters. The packed factors unpack to symmetric ones, bit for bit."""
    train.train_and_evaluate(tiny_config(npz_dir), str(tmp_path / 'run'))
    mngr = checkpointing.manager(tmp_path / 'run', every_steps=0, max_to_keep=2)
    raw = mngr.restore(
        mngr.latest_step(),
        args=ocp.args.Composite(state=ocp.args.StandardRestore()),
    )['state']
    mngr.close()
    assert set(raw) == {
        'step',
        'task',
        'num_steps',
        'params',
        'class_mask',
        'penalties',
    }
    (pen,) = raw['penalties']
    assert set(pen) == {'curvature', 'num_tasks', 'last_value'}
    packed = np.asarray(pen['curvature']['head']['A'])
    assert packed.ndim == 1  # the upper triangle of (D+1, D+1)
    n = int(round((np.sqrt(8 * packed.size + 1) - 1) / 2))
    full = checkpointing._square(packed, np.zeros((n, n), packed.dtype))
    np.testing.assert_array_equal(full, full.T)
    np.testing.assert_array_equal(checkpointing._triangles(full), packed)
    # Depthwise layouts (C, K, K) pack along the last two axes.
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 4, 4)).astype(np.float32)
    m = m + np.swapaxes(m, -1, -2)
    np.testing.assert_array_equal(
        checkpointing._square(checkpointing._triangles(m), m), m
    )
