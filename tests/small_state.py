"""Small training states shared by the step tests and the multi-device check.

`tests/multidevice_check.py` runs as a script in a subprocess, so these
helpers live in a plain module beside the tests rather than in conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

import dlcft_jax as dj
from dlcft_jax.models.small_cnn import init_small


def small_batch(b=8, seed=0):
    """b random 8×8×3 images with labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    return {
        'image': jnp.asarray(rng.normal(size=(b, 8, 8, 3)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 3, size=b), jnp.int32),
    }


def with_random_head(state, *, scale, num_steps, seed=1):
    """`state` with a N(0, scale²) head (a zero head would give the backbone
    zero gradients), started on a task of `num_steps` steps."""
    dim, num_classes = state.params['head']['kernel'].shape
    head = {
        'kernel': scale
        * jax.random.normal(jax.random.key(seed), (dim, num_classes)),
        'bias': jnp.zeros(num_classes),
    }
    return dj.begin_task(
        state.replace(params={**state.params, 'head': head}),
        num_steps=num_steps,
    )


def small_state(method=None, b=8, num_steps=5):
    """A small-CNN state for 3 classes with a random head, in task 0."""
    apply_fn, v = init_small(jax.random.key(0))
    state = dj.create_state(
        apply_fn,
        v,
        num_classes=3,
        example_input=small_batch(b)['image'],
        method=dj.METHODS['dlcft'] if method is None else method,
    )
    return with_random_head(state, scale=0.5, num_steps=num_steps)


def second_task(state, batch, num_steps=5, seed=0):
    """Two steps of task 0, its curvature, then one step into task 1 (so the
    penalty is active and the parameters are away from its centre)."""
    for _ in range(2):
        state, _ = dj.step(state, batch)
    curv = dj.estimate_curvature(state, [batch], jax.random.key(seed))
    state = dj.begin_task(dj.end_task(state, curv), num_steps=num_steps)
    state, _ = dj.step(state, batch)
    return state


def linear_features(params, x):
    """A fixed 'backbone' z = x W (nothing trainable): the head alone learns."""
    return x @ params['w']
