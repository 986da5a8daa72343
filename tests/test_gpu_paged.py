"""GPU decode through JAX's Pallas paged attention (models/gpu_paged.py) in the Pallas
interpreter on CPU: the write-first layer step == plain attention over the slot's tokens and the
new one. Ragged lengths, an empty (inactive) slot, pages out of order, partial last pages, GQA
groups of 5 and 7, the layer folded into the page ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.models import attention, gpu_paged


@pytest.mark.parametrize("group", [5, pytest.param(7, marks=pytest.mark.slow)])
def test_write_and_attend_matches_plain(group):
  rng = np.random.default_rng(group)
  b, kh, h, page, m, num_layers, layer = 4, 2, 16, 4, 4, 2, 1
  n = kh * group
  lengths = np.asarray([0, 5, 15, 9], np.int32)  # 15: the new token ends the last page
  active = np.asarray([True, True, True, False])
  per_layer = b * m
  pools = [rng.normal(size=(kh, num_layers * per_layer, page, h)).astype(np.float32)
           for _ in range(2)]  # fmt: skip
  table = rng.permutation(per_layer).reshape(b, m).astype(np.int32)  # pages out of order
  q = rng.normal(size=(b, n, h)).astype(np.float32)
  k_new, v_new = (rng.normal(size=(b, kh, h)).astype(np.float32) for _ in range(2))
  step = jax.jit(gpu_paged.write_and_attend, static_argnames=("interpret",))
  unfold = lambda x: x.reshape(kh, num_layers, per_layer, page, h)  # [K, L, Pg, page, H]
  new_k, new_v, got = step(*map(unfold, pools), jnp.int32(layer), q, k_new, v_new, table,
                           lengths, active, interpret=True)  # fmt: skip
  new_k, new_v = (np.asarray(x).reshape(pools[0].shape) for x in (new_k, new_v))
  ks, vs = (np.zeros((b, m * page, kh, h), np.float32) for _ in range(2))
  valid = np.zeros((b, m * page), bool)
  for i in range(b):
    for j in range(lengths[i]):
      pid = layer * per_layer + table[i, j // page]
      ks[i, j], vs[i, j] = pools[0][:, pid, j % page], pools[1][:, pid, j % page]
    if active[i]:
      pid = layer * per_layer + table[i, lengths[i] // page]
      np.testing.assert_array_equal(np.asarray(new_k)[:, pid, lengths[i] % page], k_new[i])
      ks[i, lengths[i]], vs[i, lengths[i]] = k_new[i], v_new[i]
      valid[i, : lengths[i] + 1] = True
  changed = np.argwhere(np.any(np.asarray(new_v) != pools[1], axis=(0, 3)))
  assert len(changed) == active.sum(), changed  # one token per active slot, nothing else
  want = attention.plain_attention(q[:, None], ks, vs, q_slot=jnp.full((b, 1), m * page),
                                   kv_valid=valid)[:, 0]  # fmt: skip
  np.testing.assert_allclose(np.asarray(got)[active], np.asarray(want)[active], rtol=1e-5,
                             atol=1e-5)  # fmt: skip
