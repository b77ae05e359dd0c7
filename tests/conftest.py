"""Session-wide pytest setup for dlcft_jax.

* Enables JAX's persistent compilation cache so repeated test runs (and the
  CI) skip most XLA compilation. The directory comes from the environment
  variable ``DLCFT_JAX_TEST_CACHE`` (default ``~/.cache/dlcft_jax/xla_tests``).
  The same settings are exported as ``JAX_*`` environment variables, so test
  subprocesses (e.g. the multi-device tests) use the cache too.
* Provides the ``repo_root``, ``run_module`` and ``shared_dir`` fixtures.

XLA_FLAGS is deliberately not touched here: tests that need several host
devices set it themselves in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]

_CACHE_DIR = Path(
    os.environ.get("DLCFT_JAX_TEST_CACHE")
    or Path.home() / ".cache" / "dlcft_jax" / "xla_tests"
).expanduser()

# Cache every compiled program, however small or quick to compile: the test
# suite consists of many small jitted functions.
_JAX_CACHE_SETTINGS = {
    "jax_compilation_cache_dir": str(_CACHE_DIR),
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    # -1: no minimum entry size (and no backend override of it).
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


def _enable_jax_compilation_cache() -> None:
    try:
        _CACHE_DIR.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home etc.: run without the cache
    # Environment first, so subprocesses spawned by tests inherit it. A
    # JAX_* variable the caller already set wins, here and in subprocesses.
    settings = {}
    for name, default in _JAX_CACHE_SETTINGS.items():
        raw = os.environ.setdefault(name.upper(), str(default))
        try:
            settings[name] = type(default)(raw)
        except ValueError:
            settings[name] = default

    import jax

    for name, value in settings.items():
        if name in jax.config.values:  # option names vary across jax versions
            jax.config.update(name, value)


_enable_jax_compilation_cache()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's in-memory caches of compiled programs after each module.

    Every loaded XLA:CPU executable keeps memory mappings; the whole suite in
    one process reached the kernel's limit (vm.max_map_count, 65,530 here)
    and aborted in the middle of loading a program. Programs still come from
    the persistent compilation cache when a later module needs them again.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """Absolute path of the repository root."""
    return _REPO_ROOT


@pytest.fixture(scope="session")
def run_module(repo_root: Path):
    """``run_module('experiments.run', '--flag=x', timeout=300)``: runs
    ``python -m`` on a module in the repository root and returns the
    ``CompletedProcess``, text output captured (no check of the exit code)."""

    def run(module: str, *args: str, timeout: float = 300):
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


@pytest.fixture(scope="session")
def shared_dir(repo_root: Path) -> Path:
    """The project's ``shared/`` folder beside the repository; skips if
    absent."""
    path = repo_root.parent / "shared"
    if not path.is_dir():
        pytest.skip(
            f"shared/ folder not found at {path} (it lies beside the "
            "repository on the project's machines)"
        )
    return path


@pytest.fixture(name='npz_dir')
def fixture_npz_dir(tmp_path, repo_root):
    """A 4-class slice (20 train / 10 test images per class) of the
    committed CIFAR-10 subset, as train.npz / test.npz in a tmp folder."""
    out = tmp_path / 'data'
    out.mkdir()
    for split, n in (('train', 20), ('test', 10)):
        with np.load(
            repo_root / 'experiments' / 'data' / 'cifar10_5x2' / f'{split}.npz'
        ) as d:
            x, y = d['image'], d['label']
        keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in range(4)])
        np.savez(out / f'{split}.npz', image=x[keep], label=y[keep])
    return out


@pytest.fixture
def x64():
    """Runs the test with float64 enabled, restoring the flag afterwards."""
    import jax

    previous = jax.config.read('jax_enable_x64')
    jax.config.update('jax_enable_x64', True)
    try:
        yield
    finally:
        jax.config.update('jax_enable_x64', previous)
