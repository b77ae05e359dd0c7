"""Builds a small, committed, class-balanced subset of CIFAR-10.

The full arrays (about 170 MB) live outside the repository. The subset written
here is small enough to commit, so tests and smoke runs of the class-incremental
CIFAR-10 5x2 setting work on a fresh checkout without the shared data.

For each of the 10 classes, the script draws `--train-per-class` training
images and `--test-per-class` test images uniformly at random without
replacement, using one seeded NumPy generator. Rows are written sorted by class
and then by their index in the source file, so the output depends only on the
source files and the flags.

Example (run from the repository root):

    python experiments/data/make_cifar10_subset.py \
        --train-per-class 300 --test-per-class 100 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence

import numpy as np

_NUM_CLASSES = 10
_REPO_ROOT = os.path.abspath(
    os.path.join(os.path.dirname(__file__), '..', '..')
)
# Relative to the repository root, so no machine-specific path is baked in.
_DEFAULT_SRC = os.path.join('..', 'shared', 'data', 'cifar10')
_DEFAULT_OUT = os.path.join('experiments', 'data', 'cifar10_5x2')


def _resolve(path: str) -> str:
    """Interprets a relative path against the repository root."""
    return path if os.path.isabs(path) else os.path.join(_REPO_ROOT, path)


def select_per_class(
    labels: np.ndarray, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws `per_class` indices of every class without replacement.

    Args:
      labels: Integer class labels, shape (N,), values in [0, 10).
      per_class: Number of examples to keep for each class.
      rng: Generator consumed in class order 0..9, which keeps the draw
        reproducible for a given seed.

    Returns:
      Sorted int64 index array of length `10 * per_class`.

    Raises:
      ValueError: If some class has fewer than `per_class` examples.
    """
    chosen = []
    for c in range(_NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(
                f'class {c} has only {idx.size} examples; lower '
                f'--*-per-class to at most {idx.size}.'
            )
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    # Sorting gives the "class, then source order" layout of the shared copy.
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Parses flags, writes train.npz and test.npz, prints sizes and hashes."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--src',
        default=_DEFAULT_SRC,
        help='Directory holding the full train.npz/test.npz (relative paths '
        'are taken from the repository root).',
    )
    parser.add_argument(
        '--out',
        default=_DEFAULT_OUT,
        help='Output directory (relative paths are taken from the repository '
        'root).',
    )
    parser.add_argument('--train-per-class', type=int, default=300)
    parser.add_argument('--test-per-class', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    src, out = _resolve(args.src), _resolve(args.out)
    os.makedirs(out, exist_ok=True)
    # One generator for both splits: train is drawn first, then test.
    rng = np.random.default_rng(args.seed)
    total = 0
    for split, per_class in (
        ('train', args.train_per_class),
        ('test', args.test_per_class),
    ):
        src_path = os.path.join(src, f'{split}.npz')
        if not os.path.exists(src_path):
            raise FileNotFoundError(
                f'{src_path} not found; pass --src pointing at the directory '
                'with the full CIFAR-10 train.npz/test.npz.'
            )
        with np.load(src_path) as d:
            images, labels = d['image'], d['label']
        idx = select_per_class(labels, per_class, rng)
        out_path = os.path.join(out, f'{split}.npz')
        np.savez_compressed(
            out_path, image=images[idx], label=labels[idx].astype(np.int64)
        )
        size = os.path.getsize(out_path)
        total += size
        print(
            f'{split}: {idx.size} images ({per_class}/class), {size} bytes, '
            f'sha256 {_sha256(out_path)}'
        )
    print(f'total: {total} bytes')
    return 0


if __name__ == '__main__':
    sys.exit(main())
