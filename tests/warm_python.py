"""`python -m MODULE ARGS` / `python SCRIPT ARGS` / `python -c CODE` for tests, each run in a
child forked from one server process that has already imported what the CLIs import (jax, flax,
orbax, transformers, matplotlib, fipo_jax's trainer, eval, generate and export).

A fresh interpreter spends about 10 CPU-s importing those before a CLI reads its first flag, and
the suite starts over a hundred of them. Forked from the server, a run skips that and is otherwise
the CLI as a user runs it: the module runs as `__main__` (runpy, as `python -m` does) with its own
argv, cwd, stdin (/dev/null), stdout and stderr, exit code (or the signal that killed it), fresh
random seeds, its own environment, and jax's backends, XLA_FLAGS and compilation cache set up in
the run itself (the server imports jax but never starts a backend). jax read its JAX_* settings
when the server imported it: a run's JAX_* values that differ from the server's are set through
jax.config instead. What runs of one server share: its string hash seed (a fresh interpreter
draws its own), so a test that compares runs bit for bit keeps one of them a fresh interpreter.
README commands run verbatim stay real subprocesses.

Protocol (one JSON line each way): {"argv", "cwd", "out", "err", "env": what differs from the
server's} -> {"pid"}, then {"rc"} when the run ends. One run at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

# What the CLIs import (never a module that defines absl flags at import: main, eval.__main__,
# aot; the run defines them when it runs as __main__).
PRELOAD = (
  "jax",
  "flax.nnx",
  "optax",
  "orbax.checkpoint",
  "transformers",
  "pyarrow.parquet",
  "fipo_jax.rl.trainer",
  "fipo_jax.rl.evaluation",
  "fipo_jax.eval.cli",
  "fipo_jax.export",
  "fipo_jax.generate",
  "fipo_jax.policy",
  "fipo_jax.checkpoints",
)


def _preload() -> None:
  import importlib  # noqa: PLC0415
  import logging  # noqa: PLC0415

  # A module that logs at import (orbax) gives the root logger a stderr handler (basicConfig) when
  # it has none; in a CLI run absl's handler is there by then. Kept, every line would print twice.
  root, handlers = logging.getLogger(), list(logging.getLogger().handlers)
  for name in PRELOAD:
    importlib.import_module(name)
  import transformers  # noqa: PLC0415

  _ = transformers.Qwen2Tokenizer, transformers.PreTrainedTokenizerFast  # lazy submodules
  from fipo_jax import plots  # noqa: PLC0415

  plots.pyplot()  # matplotlib on Agg, as the end-of-run plots import it
  root.handlers = handlers


def _exit_code(e: SystemExit) -> int:
  if e.code is None or isinstance(e.code, int):
    return e.code or 0
  print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter prints it
  return 1


def _apply_env(env: dict) -> None:
  """The run's environment where it differs from the server's (None: unset). XLA_FLAGS and most
  variables are read after this; jax's own settings (JAX_*) were read when the server imported
  jax, so those are set through jax.config, as jax would have read them."""
  import jax  # noqa: PLC0415

  for key, value in env.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
    name = key.lower()
    if key.startswith("JAX_") and value is not None and hasattr(jax.config, name):
      current = getattr(jax.config, name)
      if isinstance(current, bool):
        jax.config.update(name, value.lower() in ("1", "true", "yes", "on"))
      elif isinstance(current, (int, float)):
        jax.config.update(name, type(current)(value))
      else:
        jax.config.update(name, value)


def _child(req: dict) -> None:
  """Runs the request as `python ARGV` would, in this forked process; never returns."""
  import random  # noqa: PLC0415
  import traceback  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415

  code = 1
  try:
    os.chdir(req["cwd"])
    fd_in = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd_in, 0)
    for fd, path in ((1, req["out"]), (2, req["err"])):
      if fd == 2 and path == req["out"]:  # stderr=subprocess.STDOUT
        os.dup2(1, 2)
      else:
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (block-buffered, as to a file)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    _apply_env(req.get("env") or {})
    random.seed()
    np.random.seed()
    argv = req["argv"]
    import runpy  # noqa: PLC0415

    if argv[0] == "-m":
      # As in a fresh interpreter the module runs as __main__ only (the server's import of it,
      # if any, would make runpy warn that it is already imported).
      sys.modules.pop(argv[1], None)
      sys.argv = [argv[1], *argv[2:]]
      sys.path[0] = os.getcwd()
      runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":  # as `python -c CODE ARGS`: argv[0] "-c", the cwd first on the path
      sys.argv = ["-c", *argv[2:]]
      sys.path[0] = ""
      exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
    else:
      sys.argv = list(argv)
      sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
      runpy.run_path(argv[0], run_name="__main__")
    code = 0
  except SystemExit as e:
    code = _exit_code(e)
  except BaseException:  # noqa: BLE001 - reported as the interpreter reports it
    traceback.print_exc()
    code = 1
  try:  # the interpreter's own shutdown: join threads, then atexit (orbax, absl)
    threading._shutdown()  # noqa: SLF001
    import atexit  # noqa: PLC0415

    atexit._run_exitfuncs()  # noqa: SLF001
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code)


def _serve(modules: str | None) -> None:
  """Serves runs; `modules`: what to import ahead (None: the CLIs' imports, PRELOAD), as a
  comma-separated list ("": nothing)."""
  if modules is None:
    _preload()
  else:
    import importlib  # noqa: PLC0415

    for name in filter(None, modules.split(",")):
      importlib.import_module(name)
  reply = os.fdopen(os.dup(1), "w", buffering=1)
  reply.write(json.dumps({"ready": True}) + "\n")
  for line in sys.stdin:
    req = json.loads(line)
    for path in {req["out"], req["err"]}:  # there when the caller gets the pid
      open(path, "w").close()  # noqa: SIM115
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      _child(req)
    reply.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    reply.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")


class Run:
  """One run of the server: a `subprocess.Popen` in the parts the tests use."""

  def __init__(self, server: WarmPython, out: pathlib.Path, err: pathlib.Path):
    self._server, self.out, self.err = server, out, err
    self.pid = server._reply()["pid"]
    self.returncode: int | None = None

  def poll(self) -> int | None:
    if self.returncode is None:
      try:
        self.returncode = self._server._replies.get_nowait()["rc"]
      except queue.Empty:
        pass
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    """The exit code; raises subprocess.TimeoutExpired after `timeout` s, as Popen.wait."""
    if self.returncode is None:
      try:
        self.returncode = self._server._reply(timeout)["rc"]
      except queue.Empty:
        raise subprocess.TimeoutExpired(f"warm_python run {self.pid}", timeout) from None
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def result(self, args) -> subprocess.CompletedProcess:
    self.wait()
    return subprocess.CompletedProcess(
      args, self.returncode, self.out.read_text(), self.err.read_text()
    )


class WarmPython:
  """A server of runs (by default in its environment `env`); `preload`: the modules it imports
  ahead (default: what the CLIs import; tests of the server itself take fewer)."""

  def __init__(self, env: dict[str, str], preload: tuple[str, ...] | None = None):
    self.env = dict(env)
    self._dir = pathlib.Path(tempfile.mkdtemp(prefix="warm_python_"))
    flag = [] if preload is None else [f"--preload={','.join(preload)}"]
    self._proc = subprocess.Popen(
      [sys.executable, __file__, *flag],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      env=env,
      text=True,
      bufsize=1,
    )
    self._replies: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    if not self._reply(timeout=600).get("ready"):
      raise RuntimeError("warm_python server did not start")
    self._count = 0
    self._current: Run | None = None

  def _read(self) -> None:
    for line in self._proc.stdout:
      self._replies.put(json.loads(line))
    self._replies.put({"rc": None, "pid": None, "ready": False})  # the server is gone

  def _reply(self, timeout: float | None = None) -> dict:
    reply = self._replies.get(timeout=timeout)
    if reply.get("rc", 0) is None:
      raise RuntimeError(f"the warm_python server exited (rc={self._proc.wait()})")
    return reply

  def start(self, *argv, cwd, merge_stderr: bool = False, env: dict | None = None) -> Run:
    """Starts `python *argv` (argv: "-m", module, args...; "-c", code, args...; or script,
    args...) in `cwd`, in environment `env` (default: the server's); its stdout and stderr go to
    files (Run.out, Run.err: the same file with `merge_stderr`)."""
    if self._current is not None and self._current.poll() is None:
      # A run its test left behind (it failed before waiting): its exit reply comes first.
      self._current.send_signal(signal.SIGKILL)
      self._current.wait()
    self._count += 1
    out, err = (self._dir / f"{self._count}.{k}" for k in ("out", "err"))
    err = out if merge_stderr else err
    diff = (
      {}
      if env is None
      else {k: env.get(k) for k in {*env, *self.env} if env.get(k) != self.env.get(k)}
    )
    req = {
      "argv": [str(a) for a in argv],
      "cwd": str(cwd),
      "out": str(out),
      "err": str(err),
      "env": diff,
    }
    self._proc.stdin.write(json.dumps(req) + "\n")
    self._proc.stdin.flush()
    self._current = Run(self, out, err)
    return self._current

  def run(self, *argv, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([python, *argv], cwd=cwd, env=env, capture_output=True, text=True)`."""
    return self.start(*argv, cwd=cwd, env=env).result([sys.executable, *map(str, argv)])

  def with_env(self, env: dict[str, str]) -> WithEnv:
    """This server's runs in environment `env` (one server serves a test run's files)."""
    return WithEnv(self, dict(env))

  def close(self) -> None:
    if self._current is not None and self._current.poll() is None:
      self._current.send_signal(signal.SIGKILL)
    self._proc.stdin.close()
    self._proc.wait()
    shutil.rmtree(self._dir, ignore_errors=True)


class WithEnv:
  """A server's `start` and `run` in one environment."""

  def __init__(self, server: WarmPython, env: dict[str, str]):
    self.server, self.env = server, env

  def start(self, *argv, cwd, merge_stderr: bool = False) -> Run:
    return self.server.start(*argv, cwd=cwd, merge_stderr=merge_stderr, env=self.env)

  def run(self, *argv, cwd) -> subprocess.CompletedProcess:
    return self.server.run(*argv, cwd=cwd, env=self.env)


if __name__ == "__main__":
  _serve(sys.argv[1].removeprefix("--preload=") if sys.argv[1:] else None)
