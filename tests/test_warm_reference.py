"""With the KL term and a warm start, the reference policy is the warm-started one.

`trainer.build` runs the warm start on the frozen reference after `setup.build` (which no longer
imports the warm start); here its WORKDIR/sft cache is the stored tiny_cpu warm start.
"""

import pathlib

import conftest
import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny_cpu
from fipo_jax import config as config_lib
from fipo_jax.rl import trainer

TESTDATA = pathlib.Path(__file__).parent / "testdata"


def _flat(tree, prefix=()) -> dict[str, np.ndarray]:
  if not isinstance(tree, dict):
    return {"/".join(map(str, prefix)): np.asarray(tree)}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, key)).items()}


@pytest.mark.slow  # a tiny_cpu setup (data, model, engine): ~20 s on 2 busy cores
def test_kl_reference_is_the_warm_started_policy(tmp_path):
  conftest.write_tiny_cpu_sft_cache(tmp_path)
  config = tiny_cpu.get_config()
  config.rl.use_kl_loss = True
  rc = config_lib.validate(config, num_devices=jax.device_count())
  assert rc.sft.steps > 0
  env, state = trainer.build(rc, str(tmp_path))
  ref, init = _flat(nnx.to_pure_dict(env.ref_params)), _flat(nnx.to_pure_dict(state.params))
  want = dict(np.load(TESTDATA / "tiny_cpu_sft.npz"))
  assert set(ref) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(ref[key], value, err_msg=key)
  assert any(not np.array_equal(init[k], want[k]) for k in want)  # not the initial params
