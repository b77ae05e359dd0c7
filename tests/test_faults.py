"""Faults during a run: a damaged newest checkpoint, and the same command
twice. Nothing is lost, and the results are those of an undisturbed run."""

import json

import pytest
from tiny_run import read_results, tiny_config, without_timings

from experiments import train


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
