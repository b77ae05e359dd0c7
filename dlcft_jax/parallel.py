"""Data-parallel wrappers of the per-device `step` (the only parallel code).

Both wrappers run the same pure `train_state.step` with `axis_name='batch'`,
so gradients and metrics are averaged over devices with `jax.lax.pmean` and
every device ends the step with the same state.

* `pmap_step`: the classic form; the state carries a leading device axis
  (`replicate`) and each batch is reshaped to (devices, per-device, ...)
  (`shard_batch`).
* `shard_map_step`: `jax.jit` of `jax.shard_map` over a 1-D mesh; the state is
  replicated (`P()`) and the global batch is split along its first axis
  (`P('batch')`). Inputs can be ordinary arrays: `jit` places them.
  `check_vma=False` gives the step pmap's semantics: the gradient with
  respect to the replicated parameters is the device's own, and the step's
  `pmean` averages it. (With the check on, JAX would already sum the
  gradients of replicated inputs across devices, and the explicit `pmean`
  would then be wrong by a factor.)

Both donate the input state (`donate=True`, the default): the step returns
a new state and the old one's buffers are reused, so do not touch a state
after passing it in. `dlcft_jax.step` (one device) does not donate.

Multi-host runs use the same functions after `jax.distributed.initialize()`;
each host feeds its own part of the global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dlcft_jax import train_state

AXIS = 'batch'


def pmap_step(
    step_fn: Callable[..., Any] = train_state.step,
    axis_name: str = AXIS,
    donate: bool = True,
) -> Callable[..., Any]:
    """`jax.pmap` of `step_fn(state, batch, axis_name=...)` over the local
    devices."""
    return jax.pmap(
        functools.partial(step_fn, axis_name=axis_name),
        axis_name=axis_name,
        donate_argnums=(0,) if donate else (),
    )


def shard_map_step(
    mesh: Mesh,
    step_fn: Callable[..., Any] = train_state.step,
    axis_name: str = AXIS,
    donate: bool = True,
) -> Callable[..., Any]:
    """`jax.jit(jax.shard_map(step_fn))`: replicated state, batch split on
    axis 0."""
    fn = jax.shard_map(
        functools.partial(step_fn, axis_name=axis_name),
        mesh=mesh,
        in_specs=(P(), P(axis_name)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def pmap_curvature_fns(axis_name: str = AXIS) -> dict[str, Callable]:
    """`estimate_curvature` keyword arguments for a `pmap`-replicated state.

    The per-batch statistics are averaged over devices inside the pmapped
    `curvature_step` (weighted by each device's Σ weight), and the running
    sum stays on the devices, one copy of the factors at a time:

        curv = dj.estimate_curvature(state, batches, rng,
                                     **parallel.pmap_curvature_fns())
    """
    return {
        'stats_fn': jax.pmap(
            functools.partial(train_state.curvature_step, axis_name=axis_name),
            axis_name=axis_name,
            in_axes=(0, 0, None),
        ),
        'add_fn': jax.pmap(
            lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0
        ),
        'scale_fn': jax.pmap(
            lambda a, s: jax.tree.map(lambda x: x * s, a),
            in_axes=(0, None),
        ),
    }


def make_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS
) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices)."""
    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs, (axis_name,))


def replicate(tree: Any, num_devices: int | None = None) -> Any:
    """Adds a leading device axis to every leaf (for `pmap_step`)."""
    n = num_devices or jax.local_device_count()
    return jax.tree.map(
        lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree
    )


def unreplicate(tree: Any) -> Any:
    """Takes device 0's copy of a replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch: Any, num_devices: int | None = None) -> Any:
    """Reshapes a global batch (B, ...) to (devices, B / devices, ...)."""
    n = num_devices or jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f'The batch size {x.shape[0]} is not divisible by the '
                f'{n} devices; choose a multiple of {n}.'
            )
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, batch)


def host_replicate(tree: Any, num_devices: int | None = None) -> Any:
    """`num_devices` stacked copies of every leaf, as NumPy views (no copy).

    A `pmap` input: pmap places one copy on each local device itself, and its
    outputs then stay there (sharded) from step to step.
    """
    n = num_devices or jax.local_device_count()
    return jax.tree.map(
        lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree
    )


def host_unreplicate(tree: Any) -> Any:
    """Device 0's copy of a pmap-replicated pytree, as NumPy arrays.

    Reads one shard per leaf: no gather of all copies and no per-shape
    compilation (unlike `unreplicate`'s `x[0]` on a sharded array).
    """

    def first(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)[0]
        d = np.asarray(x.addressable_shards[0].data)
        return d[0] if d.ndim == x.ndim else d

    return jax.tree.map(first, tree)
