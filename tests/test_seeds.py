"""The run's random streams: one root key split by name (fipo_jax/seeds.py)."""

import jax
import pytest

from fipo_jax import seeds


def _key_data(key):
  return jax.random.key_data(key).tolist()


def test_sampling_keeps_the_trainers_original_derivation():
  # The stored one-step trainer golden was sampled with these seeds: they must not move.
  for seed, step, rnd in [(0, 0, 0), (42, 3, 1), (7, 1000, 5)]:
    old = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), rnd)
    assert seeds.seed_for(seed, "sampling", step, rnd) == int(
      jax.random.randint(old, (), 0, 2**31 - 1)
    )


def test_historical_streams_keep_their_derivation():
  # tiny_cpu's warm start learns from these (fipo_jax/seeds.py docstring): they must not move.
  assert _key_data(seeds.rng_for(5, "init")) == _key_data(jax.random.key(5))
  assert seeds.seed_for(5, "sft_batches") == 5 and seeds.seed_for(5, "sft_rows") == 22
  for name in ("init", "sft_rows"):
    with pytest.raises(ValueError, match="no indices"):
      seeds.seed_for(5, name, 1)


def test_streams_are_reproducible_and_distinct():
  assert seeds.seed_for(3, "eval", 5) == seeds.seed_for(3, "eval", 5)
  indexed = [n for n in seeds.STREAMS if n == "sampling" or n not in seeds.HISTORICAL]
  drawn = {(name, i): seeds.seed_for(3, name, i) for name in indexed for i in range(4)}
  assert len(set(drawn.values())) == len(drawn)  # every (stream, index) its own seed
  assert seeds.seed_for(3, "eval", 1) != seeds.seed_for(4, "eval", 1)  # the root matters
  # A named stream is not the unnamed one at some index: its id is above every index.
  for name in seeds.STREAMS:
    if name not in seeds.HISTORICAL:
      assert seeds.stream_id(name) >= 2**31
      assert _key_data(seeds.rng_for(3, name)) != _key_data(seeds.rng_for(3, "sampling"))
  assert 0 <= seeds.seed_for(0, "init") < 2**31


def test_unknown_stream_and_out_of_range_index_are_refused():
  with pytest.raises(ValueError, match="unknown random stream 'evl'"):
    seeds.rng_for(0, "evl", 1)
  with pytest.raises(ValueError, match="outside"):
    seeds.rng_for(0, "sampling", 2**31)
  with pytest.raises(ValueError, match="outside"):
    seeds.rng_for(0, "eval", -1)
