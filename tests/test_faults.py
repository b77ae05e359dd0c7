"""Faults during a run: a damaged newest checkpoint, and the same command
twice. Nothing is lost, and the results are those of an undisturbed run."""

import errno
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny_run import read_results, tiny_config, without_timings

from experiments import cli, train


def _damage(folder):
    """Truncates every file of a checkpoint item (a crash or a full disk)."""
    files = [p for p in folder.rglob('*') if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])


@pytest.mark.parametrize('item', ['state', 'meta'])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    item, npz_dir, tmp_path, capsys
):
    workdir = tmp_path / 'run'
    reference = train.train_and_evaluate(tiny_config(npz_dir), workdir)
    ckpts = workdir / 'checkpoints'
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [8, 9]  # task 2 at step 2 and its end (max_to_keep 2)
    _damage(ckpts / '9' / item)
    (workdir / 'results.json').unlink()
    capsys.readouterr()
    again = train.train_and_evaluate(tiny_config(npz_dir), workdir)
    out = capsys.readouterr().out
    assert 'warning: checkpoint' in out and f'{ckpts / "9"}' in out
    assert 'resumed from' in out and 'at task 2 step 2' in out
    # Task 2 went on from its step 2 again: the same results.
    assert without_timings(again) == without_timings(reference)
    # The damaged checkpoint was set aside, not deleted.
    assert (workdir / 'checkpoints_unreadable' / '9' / item).is_dir()


def test_the_same_command_twice_gives_bit_identical_results(npz_dir, tmp_path):
    runs = []
    for name in ('a', 'b'):
        train.train_and_evaluate(tiny_config(npz_dir), tmp_path / name)
        runs.append(read_results(tmp_path / name))
    a, b = (json.dumps(r['accuracy_matrix']) for r in runs)
    assert a == b
    assert without_timings(runs[0]) == without_timings(runs[1])


def _finite_checkpoints(workdir):
    """Every kept checkpoint's parameters are finite."""
    manager = ocp.CheckpointManager((workdir / 'checkpoints').absolute())
    steps = manager.all_steps()
    for step in steps:
        saved = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )['state']
        leaves = jax.tree.leaves(saved['params'])
        assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    manager.close()
    return steps


def test_a_run_that_diverges_stops_at_once_and_saves_no_bad_state(
    npz_dir, tmp_path
):
    workdir = tmp_path / 'run'
    bad = tiny_config(npz_dir, **{'optim.learning_rate': 1e30})
    with pytest.raises(FloatingPointError, match=r'task 1 step \d+'):
        train.train_and_evaluate(bad, workdir)
    partial = read_results(workdir)
    assert partial['complete'] is False and partial['tasks_done'] == 0
    assert 'Non-finite' in partial['stopped']
    _finite_checkpoints(workdir)


def test_divergence_in_task_2_keeps_task_1_results_and_checkpoints(
    npz_dir, tmp_path, monkeypatch
):
    fetch = train.fetch_metrics

    def nan_in_task_2(metrics, where):
        m = fetch(metrics, where)
        if where.startswith('task 2 step 2'):
            m['loss'] = float('nan')
            cli.stop_if_not_finite(m, where, 'Lower the learning rate.')
        return m

    monkeypatch.setattr(train, 'fetch_metrics', nan_in_task_2)
    workdir = tmp_path / 'run'
    with pytest.raises(FloatingPointError, match='task 2 step 2'):
        train.train_and_evaluate(tiny_config(npz_dir), workdir)
    partial = read_results(workdir)
    assert partial['tasks_done'] == 1 and partial['complete'] is False
    assert partial['accuracy_matrix'][0][0] is not None
    # Task 2's step-2 state was not saved: the newest checkpoint is task 1's.
    assert max(_finite_checkpoints(workdir)) == 6


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    npz_dir, tmp_path, monkeypatch
):
    reference = train.train_and_evaluate(
        tiny_config(npz_dir), tmp_path / 'straight'
    )
    save = ocp.CheckpointManager.save

    def disk_full_at_8(self, step, *args, **kwargs):
        if step == 8:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full_at_8)
    workdir = tmp_path / 'run'
    with pytest.raises(cli.DiskError) as info:
        train.train_and_evaluate(tiny_config(npz_dir), workdir)
    message = str(info.value)
    assert 'checkpoint 8' in message and 'No space left on device' in message
    assert 'checkpoint 6 is intact' in message
    monkeypatch.undo()
    # Space freed: the same command resumes from checkpoint 6.
    again = train.train_and_evaluate(tiny_config(npz_dir), workdir)
    assert without_timings(again) == without_timings(reference)


def test_a_save_cut_short_by_sigkill_is_ignored_on_resume(npz_dir, tmp_path):
    """A process killed in the middle of a save leaves orbax's temporary
    folder (`STEP.orbax-checkpoint-tmp-TIME`, renamed only once complete):
    the next run resumes from the last complete checkpoint, saves that step
    again, and ends with the results of an undisturbed run."""
    reference = train.train_and_evaluate(
        tiny_config(npz_dir), tmp_path / 'straight'
    )
    workdir = tmp_path / 'run'
    train.train_and_evaluate(
        tiny_config(npz_dir, **{'train.stop_after_tasks': 1}), workdir
    )
    ckpts = workdir / 'checkpoints'
    # What a kill during the save of step 8 leaves: a half-written copy.
    partial = ckpts / '8.orbax-checkpoint-tmp-1700000000000'
    shutil.copytree(ckpts / '6', partial)
    _damage(partial / 'state')
    again = train.train_and_evaluate(tiny_config(npz_dir), workdir)
    assert without_timings(again) == without_timings(reference)
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [8, 9]
