"""The run profile: phases per task, compilation booked apart."""

import time

import jax
import jax.numpy as jnp
import pytest

from experiments import profiling, reporting


def test_compilation_is_booked_apart_and_the_columns_add_up():
    # A function no other test compiles (a fresh closure: no cache hit).
    offset = time.time()

    @jax.jit
    def f(x):
        return jnp.sin(x) * 2.0 + offset

    t0 = time.perf_counter()
    with profiling.Profile() as profile:
        with profile.phase('train', 0):
            f(jnp.ones(7)).block_until_ready()  # compiles
            time.sleep(0.05)
        with profile.phase('eval', 0):
            f(jnp.ones(7)).block_until_ready()  # compiled already
            with profile.phase('checkpoint', 0):  # nested
                time.sleep(0.03)
        token = profile.begin('train', 1)
        profile.add(1, 'data', 0.02)
        time.sleep(0.04)
        profile.end(token, moved=0.02)
    total = time.perf_counter() - t0
    summary = profile.summary(total_s=total)
    setup, task1, task2 = summary['rows']
    assert setup['task'] == 'setup' and task1['task'] == 1
    assert task1['compile'] > 0  # the jit's trace, lowering and compile
    assert task1['train'] >= 0.05 and task1['eval'] < 0.03
    assert task1['checkpoint'] == pytest.approx(0.03, abs=0.02)
    assert task2['data'] == pytest.approx(0.02)
    assert task2['train'] == pytest.approx(0.02, abs=0.015)
    assert task2['compile'] == 0
    # Every second of the run is in exactly one column.
    assert summary['totals']['total'] == pytest.approx(total, rel=1e-6)
    assert summary['compilations'] >= 1
    assert any('f' in name for name in summary['compile_by_function'])
    text = profiling.table(summary)
    assert 'compile' in text and 'XLA compilations' in text
    assert reporting.profile_line(summary).startswith('time: ')
    # The listener is gone after the block: later compilations are not
    # booked.
    before = summary['totals']['compile']
    jax.jit(lambda x: x - offset)(jnp.ones(3)).block_until_ready()
    assert profile.summary()['totals']['compile'] == pytest.approx(before)


def test_checkpoint_line_names_the_sizes():
    line = reporting.checkpoint_line({250: 28_300_000, 300: 28_310_000})
    assert '2 kept' in line and '28.3 MB each' in line
    assert reporting.checkpoint_line({}) == 'checkpoints: none kept'


@pytest.mark.slow
def test_a_second_run_reads_every_program_from_the_cache(
    tmp_path, npz_dir, repo_root
):
    """The runner's persistent compilation cache: the second run of the
    same config (another process, another workdir) compiles nothing."""
    import json
    import subprocess

    from tiny_run import cli_command

    cache = tmp_path / 'xla'
    profiles = []
    for name in ('cold', 'warm'):
        cmd = cli_command(tmp_path / name, npz_dir)
        cmd.append(f'--config.compilation_cache_dir={cache}')
        out = subprocess.run(
            cmd, cwd=repo_root, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert 'time: ' in out.stdout and 'checkpoints: ' in out.stdout
        results = json.loads((tmp_path / name / 'results.json').read_text())
        profiles.append(results['profile'])
    cold, warm = profiles
    assert cold['compilations'] > 10
    assert warm['cache_hits'] == warm['compilations'] == cold['compilations']
    assert any(cache.iterdir())
