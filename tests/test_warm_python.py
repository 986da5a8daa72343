"""tests/warm_python.py runs a script or module as a fresh `python` would: argv, cwd, __main__,
stdout and stderr, exit codes, signals, tracebacks, atexit handlers, fresh random seeds, and its
own environment (jax's JAX_* settings and XLA_FLAGS included)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import warm_python

SCRIPT = """
import atexit, os, random, sys
atexit.register(lambda: print("atexit ran"))
print("argv", sys.argv[1:], "name", __name__, "cwd", os.getcwd(), "rand", random.random())
print("to stderr", file=sys.stderr)
if sys.argv[1:2] == ["raise"]:
  raise ValueError("boom")
if sys.argv[1:2] == ["message"]:
  sys.exit("a message")
if sys.argv[1:2] == ["sleep"]:
  import time; time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)
"""


@pytest.fixture(scope="module")
def warm():
  server = warm_python.WarmPython(dict(os.environ), preload=("jax",))  # jax: as the CLIs' server
  yield server
  server.close()


@pytest.fixture
def script(tmp_path):
  (tmp_path / "mod.py").write_text(SCRIPT)
  return tmp_path / "mod.py"


def test_a_script_and_a_module_run_as_main_with_their_argv_and_cwd(warm, script, tmp_path):
  res = warm.run(script, "3", cwd="/")
  assert res.returncode == 3, res.stderr
  assert res.stdout.startswith("argv ['3'] name __main__ cwd / rand ")
  assert res.stdout.endswith("atexit ran\n") and res.stderr == "to stderr\n"
  res = warm.run("-m", "mod", "0", "x", cwd=tmp_path)  # found on the cwd, as `python -m` does
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith(f"argv ['0', 'x'] name __main__ cwd {tmp_path} ")
  assert res.args == [sys.executable, "-m", "mod", "0", "x"]


def test_errors_and_exit_messages_as_the_interpreter_reports_them(warm, script):
  res = warm.run(script, "raise", cwd="/")
  assert res.returncode == 1
  assert "Traceback (most recent call last)" in res.stderr
  assert res.stderr.strip().endswith("ValueError: boom")
  res = warm.run(script, "message", cwd="/")
  assert res.returncode == 1 and res.stderr == "to stderr\na message\n"


def test_merged_output_signals_timeouts_and_fresh_random_seeds(warm, script):
  run = warm.start(script, "sleep", cwd="/", merge_stderr=True)
  deadline = time.time() + 60
  while "to stderr" not in run.out.read_text() and time.time() < deadline:
    time.sleep(0.01)
  assert run.poll() is None
  with pytest.raises(subprocess.TimeoutExpired):
    run.wait(timeout=0.01)
  run.kill()
  assert run.wait() == -signal.SIGKILL
  assert "to stderr" in run.out.read_text() and run.err == run.out
  draws = {warm.run(script, cwd="/").stdout.split("rand ")[1].split()[0] for _ in range(2)}
  assert len(draws) == 2


JIT = """
import os, jax, jax.numpy as jnp
print(jax.jit(lambda x: x + 1)(jnp.ones(2)).tolist(), jax.device_count(), os.environ.get("MINE"))
"""


def test_a_runs_environment_reaches_jax_and_xla(warm, tmp_path):
  (tmp_path / "jit.py").write_text(JIT)
  cache = tmp_path / "cache"  # the persistent compilation cache, off (multi-process runs) and on
  caching = {"JAX_COMPILATION_CACHE_DIR": str(cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env = {**warm.env, **caching, "JAX_LOG_COMPILES": "1", "MINE": "x",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=3",
         "JAX_ENABLE_COMPILATION_CACHE": "false"}
  env.pop("PYTHONHASHSEED", None)
  res = warm.run(tmp_path / "jit.py", cwd=tmp_path, env=env)
  assert res.returncode == 0, res.stderr
  assert res.stdout == "[2.0, 2.0] 3 x\n" and "Compiling" in res.stderr
  assert not cache.exists() or not any(cache.iterdir())
  plain = {**warm.env, **caching, "JAX_LOG_COMPILES": "0", "XLA_FLAGS": "",
           "JAX_ENABLE_COMPILATION_CACHE": "true"}
  res = warm.with_env(plain).run(tmp_path / "jit.py", cwd=tmp_path)
  assert res.stdout == "[2.0, 2.0] 1 None\n" and "Compiling" not in res.stderr, res.stderr
  assert any(cache.iterdir())  # the same program, cached: the switch kept it out before


def test_a_run_left_behind_is_killed_before_the_next(warm, script):
  left = warm.start(script, "sleep", cwd="/")  # its test failed before waiting, say
  res = warm.run(script, "4", cwd="/")
  assert res.returncode == 4 and left.returncode == -signal.SIGKILL
