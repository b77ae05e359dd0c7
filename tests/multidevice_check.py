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
from small_state import second_task, small_batch, small_state

import dlcft_jax as dj
from dlcft_jax import parallel


def main() -> int:
    n = jax.device_count()
    assert n == 8, f'expected 8 fake devices, got {n}'
    batch = small_batch(16)
    state = second_task(
        small_state(b=16, num_steps=10), batch, num_steps=10, seed=2
    )

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
            jax.tree.leaves(ref_state.params),
            jax.tree.leaves(st.params),
            strict=True,
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
