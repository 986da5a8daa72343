"""The warm start's WORKDIR/sft cache is reused only with the settings that made it: a rerun
with another sft/model/data setting or seed stops with one line and exit 2, where it used to
train silently from the stale warm start; RL settings may differ (a sweep shares it)."""

import json
import os

import conftest
import pytest

from fipo_jax import config as config_lib
from fipo_jax.rl import warmstart


def _rc(*overrides):
  from configs import tiny_cpu

  c = tiny_cpu.get_config("runlocal")
  for key, value in overrides:
    *sections, name = key.split(".")
    node = c
    for section in sections:
      node = node[section]
    node[name] = value
  return config_lib.validate(c)


def test_cache_key_names_what_differs(tmp_path):
  cache = tmp_path / "sft"
  cache.mkdir()
  warmstart.check_cache(str(cache), _rc())  # no key file (older cache): reused
  (cache / warmstart.CACHE_KEY_FILE).write_text(warmstart.cache_key(_rc()))
  warmstart.check_cache(str(cache), _rc())
  warmstart.check_cache(str(cache), _rc(("rl.decay_rate", 8.0)))  # RL settings: shared
  with pytest.raises(warmstart.CacheMismatch, match=r"\(sft\.lr differ\)"):
    warmstart.check_cache(str(cache), _rc(("sft.lr", 1e-2)))
  with pytest.raises(warmstart.CacheMismatch, match=r"\(seed differ\)"):
    warmstart.check_cache(str(cache), _rc(("seed", 1)))
  with pytest.raises(warmstart.CacheMismatch, match="data.max_prompt_length"):
    warmstart.check_cache(str(cache), _rc(("data.max_prompt_length", 64)))
  # A cache made by an older warm start (its key has no or another version) is not reused.
  key = json.loads(warmstart.cache_key(_rc()))
  del key["warm_start_version"]
  (cache / warmstart.CACHE_KEY_FILE).write_text(json.dumps(key))
  with pytest.raises(warmstart.CacheMismatch, match=r"\(warm_start_version differ\)"):
    warmstart.check_cache(str(cache), _rc())


@pytest.fixture
def warm(warm_server):
  """Runs forked from one process that has imported what they import (tests/warm_python.py)."""
  return warm_server.with_env(conftest.child_env())  # one device


@pytest.mark.slow
def test_rerun_with_another_warm_start_setting_exits_2(tmp_path, warm):
  # A 5-step warm start with no loss threshold: the test is about its cache, not its quality.
  cmd = ["-m", "fipo_jax.main", "--config", "configs/tiny_cpu.py:runlocal",
         "--workdir", str(tmp_path / "w"), "--config.total_steps=0", "--config.eval_every=0",
         "--config.sft.steps=5", "--config.sft.loss_threshold=0"]
  first = warm.run(*cmd, cwd=os.getcwd())
  assert first.returncode == 0, first.stderr[-3000:]
  assert (tmp_path / "w" / "sft" / warmstart.CACHE_KEY_FILE).is_file()
  # RL settings may differ: the cache (and its key file) restores.
  same = warm.run(*cmd, "--config.rl.decay_rate=8", cwd=os.getcwd())
  assert same.returncode == 0, same.stderr[-3000:]
  assert "warm start (SFT" not in same.stderr  # reused, not retrained
  again = warm.run(*cmd, "--config.sft.lr=0.01", cwd=os.getcwd())
  assert again.returncode == 2, again.stderr[-3000:]
  last = again.stderr.strip().splitlines()[-1]
  assert "holds a warm start made with other settings (sft.lr differ)" in last, last
  assert "Traceback" not in again.stderr
