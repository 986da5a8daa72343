"""TPU decode through JAX's ragged paged attention (models/tpu_paged.py): the write-first layer
step == plain attention over the slot's tokens and the new one, on CPU through
`tpu_paged.reference_attention` (pinned to JAX's own reference of the kernel in
tests/test_rpa_engine.py; jax 0.10.2's Pallas interpreters cannot run the kernel: the TPU one
lacks its reshape transform, the generic one its DMA scalars). Ragged lengths, an
empty (inactive) slot, pages out of order, partial last pages, GQA groups of 5 and 7. The
real kernel's compile is pinned by tests/test_tpu_paged_aot.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax.models import attention, tpu_paged


@pytest.mark.slow  # ~4-8 s a case on a loaded 2-core host
@pytest.mark.parametrize("group", [5, 7])
def test_write_and_attend_matches_plain(group):
  rng = np.random.default_rng(group)
  b, kh, h, page, m, num_layers, layer = 4, 1, 128, 16, 3, 2, 1
  n = kh * group
  lengths = np.asarray([0, 17, 47, 30], np.int32)  # 47: the new token ends the last page
  active = np.asarray([True, True, True, False])
  pages = b * m  # per layer
  pool = rng.normal(size=(num_layers, pages, page, 2 * kh, h)).astype(np.float32)
  table = rng.permutation(pages).reshape(b, m).astype(np.int32)  # pages out of order
  q = rng.normal(size=(b, n, h)).astype(np.float32)
  k_new, v_new = (rng.normal(size=(b, kh, h)).astype(np.float32) for _ in range(2))
  new_pool, got = tpu_paged.write_and_attend(
    jnp.asarray(pool), jnp.int32(layer), q, k_new, v_new, table, lengths, active, reference=True
  )
  new_pool = np.asarray(new_pool)
  ks, vs = (np.zeros((b, m * page, kh, h), np.float32) for _ in range(2))
  valid = np.zeros((b, m * page), bool)
  for i in range(b):
    for j in range(lengths[i]):
      ks[i, j] = pool[layer, table[i, j // page], j % page, 0::2]
      vs[i, j] = pool[layer, table[i, j // page], j % page, 1::2]
    if active[i]:
      at = (layer, table[i, lengths[i] // page], lengths[i] % page)
      np.testing.assert_array_equal(new_pool[at], tpu_paged.combine(k_new[i], v_new[i]))
      ks[i, lengths[i]], vs[i, lengths[i]] = k_new[i], v_new[i]
      valid[i, : lengths[i] + 1] = True
  changed = np.argwhere(np.any(new_pool != pool, axis=(3, 4)))
  assert len(changed) == active.sum(), changed  # one token row per active slot, nothing else
  want = attention.plain_attention(q[:, None], ks, vs, q_slot=jnp.full((b, 1), m * page),
                                   kv_valid=valid)[:, 0]  # fmt: skip
  np.testing.assert_allclose(np.asarray(got)[active], np.asarray(want)[active], rtol=2e-5,
                             atol=2e-5)  # fmt: skip
