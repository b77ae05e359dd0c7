r"""Can kfac-jax minimise DLCFT's per-task objective here? A check.

Issue 21 asked to evaluate kfac-jax (google-deepmind/kfac-jax), whose
optimizer picks its learning rate and momentum from the same quadratic model
as `dlcft_jax.solvers.kfac_solver`, as the engine before writing our own.
This script runs its optimizer on the linearized small CNN of the tests with
the α-MSE loss registered (`register_squared_error_loss`), 20 full-batch
steps, and prints the losses or the error:

  pip install --target=.kfacenv --no-deps kfac-jax distrax dm-tree \
      immutabledict tensorflow-probability
  PYTHONPATH=.kfacenv python -m benchmarks.peers.kfac_jax_check \
      [--stub_distrax]

Measured on 2026-12-04 with kfac-jax 0.0.8 (the newest on PyPI) and
jax 0.10.2:

* the import fails inside distrax → tensorflow-probability's JAX backend
  (`jax.interpreters.xla.pytype_aval_mappings` no longer exists);
* with `--stub_distrax` (a stand-in module with the distribution classes
  kfac-jax names; it uses them only to sample the losses' targets), the
  first step fails in kfac-jax's graph tracer, which unpacks
  `eqn.primitive.get_bind_params` into two values where this jax returns
  three.

Beyond the version mismatch, kfac-jax's curvature covers the registered
losses only: the penalty t·H̄ of past tasks would be missing from its
preconditioner and from its quadratic model unless recast as a registered
loss. `kfac_solver` reuses the penalty's own K-FAC factors for both, so we
wrote our own (about 250 lines) rather than pin an old jax.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from absl import app, flags

_STUB = flags.DEFINE_bool(
    'stub_distrax', False, 'Replace distrax by a stand-in module first.'
)

_STUB_SOURCE = '''
class Distribution: pass
class MultivariateNormalDiag(Distribution):
    def __init__(self, loc, scale_diag):
        self.loc, self.scale_diag = loc, scale_diag
class Bernoulli(Distribution): pass
class Categorical(Distribution): pass
class OneHotCategorical(Distribution): pass
'''


def main(argv):
    del argv
    if _STUB.value:
        root = Path(tempfile.mkdtemp())
        (root / 'distrax').mkdir()
        (root / 'distrax' / '__init__.py').write_text(_STUB_SOURCE)
        sys.path.insert(0, str(root))
    try:
        import kfac_jax  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 (the finding is the exception)
        print(f'import kfac_jax failed: {type(e).__name__}: {e}')
        return 1
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dlcft_jax import linearization as lin  # noqa: PLC0415
    from dlcft_jax.models.small_cnn import init_small  # noqa: PLC0415

    apply_fn, v = init_small(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 64))
    dim = apply_fn(v, x[:2]).shape[-1]
    params = {
        'backbone': lin.zeros_like_trainable(v, None),
        'head': {'kernel': jnp.zeros((dim, 3)), 'bias': jnp.zeros(3)},
    }

    def loss_fn(params, batch):
        xb, yb = batch
        z = lin.tangent_apply(apply_fn, v, params['backbone'], xb)
        f = z @ params['head']['kernel'] + params['head']['bias']
        target = 15.0 * jax.nn.one_hot(yb, 3)
        kfac_jax.register_squared_error_loss(f, target)
        return 0.5 * jnp.mean(jnp.sum((f - target) ** 2, -1))

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        multi_device=False,
        num_burnin_steps=0,
    )
    key = jax.random.key(1)
    try:
        state = opt.init(params, key, (x, y))
        for i in range(20):
            key, k = jax.random.split(key)
            params, state, stats = opt.step(
                params, state, k, batch=(x, y), global_step_int=i
            )
            print(f'step {i + 1}: loss {float(stats["loss"]):.4f}')
    except Exception as e:  # noqa: BLE001
        print(f'kfac_jax.Optimizer failed: {type(e).__name__}: {e}')
        return 1
    return 0


if __name__ == '__main__':
    app.run(main)
