"""The run's random streams: one root key split by name (fipo_jax/seeds.py)."""

import zlib

import jax
import pytest

from fipo_jax import seeds


def _key_data(key):
  return jax.random.key_data(key).tolist()


def test_every_stream_derives_from_the_seed_by_name():
  # No historical special case: each stream is fold_in(root, crc32(name) | 2**31), then indices.
  for name in seeds.STREAMS:
    for seed, idx in [(0, ()), (5, (3,)), (7, (1000, 5))]:
      want = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) | 0x80000000)
      for i in idx:
        want = jax.random.fold_in(want, i)
      assert _key_data(seeds.rng_for(seed, name, *idx)) == _key_data(want), (name, seed, idx)
      assert seeds.seed_for(seed, name, *idx) == int(jax.random.randint(want, (), 0, 2**31 - 1))
  assert not hasattr(seeds, "HISTORICAL")


def test_streams_are_reproducible_and_distinct():
  assert seeds.seed_for(3, "eval", 5) == seeds.seed_for(3, "eval", 5)
  drawn = {(name, i): seeds.seed_for(3, name, i) for name in seeds.STREAMS for i in range(4)}
  drawn.update({(name,): seeds.seed_for(3, name) for name in seeds.STREAMS})
  assert len(set(drawn.values())) == len(drawn)  # every (stream, index) its own seed
  assert seeds.seed_for(3, "eval", 1) != seeds.seed_for(4, "eval", 1)  # the root matters
  # No stream is another at some index: the ids are above every index.
  for name in seeds.STREAMS:
    assert seeds.stream_id(name) >= 2**31
  assert _key_data(seeds.rng_for(3, "init")) != _key_data(jax.random.key(3))
  assert 0 <= seeds.seed_for(0, "init") < 2**31


def test_unknown_stream_and_out_of_range_index_are_refused():
  with pytest.raises(ValueError, match="unknown random stream 'evl'"):
    seeds.rng_for(0, "evl", 1)
  with pytest.raises(ValueError, match="outside"):
    seeds.rng_for(0, "sampling", 2**31)
  with pytest.raises(ValueError, match="outside"):
    seeds.rng_for(0, "eval", -1)
