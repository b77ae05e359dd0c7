"""Run by tests/test_step.py in a subprocess with 8 fake CPU devices.

N devices must equal 1 device on the full batch: the pmapped step and the
jit(shard_map) step are compared with the single-device jitted step, in the
middle of a second task (so the K-FAC and head penalties are active).
"""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import dlcft_jax as dj
from dlcft_jax import parallel
from dlcft_jax.models.small_cnn import init_small


def main() -> int:
    n = jax.device_count()
    assert n == 8, f'expected 8 fake devices, got {n}'
    apply_fn, v = init_small(jax.random.key(0), input_shape=(16, 8, 8, 3))
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.normal(size=(16, 8, 8, 3)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 3, size=16), jnp.int32),
    }
    state = dj.create_state(
        apply_fn, v, num_classes=3, example_input=batch['image']
    )
    head = {
        'kernel': 0.5 * jax.random.normal(jax.random.key(1), (6, 3)),
        'bias': jnp.zeros(3),
    }
    state = dj.begin_task(
        state.replace(params={**state.params, 'head': head}), num_steps=10
    )
    for _ in range(2):
        state, _ = dj.step(state, batch)
    curv = dj.estimate_curvature(state, [batch], jax.random.key(2))
    state = dj.begin_task(dj.end_task(state, curv), num_steps=10)
    state, _ = dj.step(state, batch)  # move away from the centre

    ref_state, ref_metrics = dj.step(state, batch)

    pstep = parallel.pmap_step()
    p_state, p_metrics = pstep(
        parallel.replicate(state), parallel.shard_batch(batch)
    )
    p_state, p_metrics = parallel.unreplicate((p_state, p_metrics))

    mesh = parallel.make_mesh()
    s_state, s_metrics = parallel.shard_map_step(mesh)(state, batch)

    worst = 0.0
    for name, (st, met) in {
        'pmap': (p_state, p_metrics),
        'shard_map': (s_state, s_metrics),
    }.items():
        for a, b in zip(
            jax.tree.leaves(ref_state.params), jax.tree.leaves(st.params)
        ):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7, err_msg=name)
            worst = max(worst, float(jnp.max(jnp.abs(a - b))))
        for k in ref_metrics:
            np.testing.assert_allclose(
                ref_metrics[k],
                met[k],
                rtol=2e-5,
                atol=1e-6,
                err_msg=f'{name} {k}',
            )
        assert float(met['penalty']) > 0, 'the penalty should be active'
    print(f'OK max |Δparams| = {worst:.3g}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
