"""Verifiers in child processes: `IsolatedVerifier` (one, reused) and `VerifierPool` (several).

Both talk to `python -m fipo_jax.verifier_worker NAME` (its docstring has the line protocol),
bound each call in wall-clock time with `select` and kill a child that runs past it. The pool
is `rl.reward_workers`; `fipo_jax.rl.rewards.score_responses` scores with either.
"""

from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence


class VerifierTimeout(Exception):
  """A verifier call ran past RewardConfig.max_seconds."""


class IsolatedVerifier:
  """`python -m fipo_jax.verifier_worker NAME` as a scorer: one child process, reused.

  Each call waits at most `max_seconds` for its reply. A call past that, a child that died or
  any error while talking to it kills the child and raises (VerifierTimeout or RuntimeError:
  `score_responses` scores it wrong and counts it); the next call starts a new child. A new
  child gets `startup_seconds` for its imports before the first request is sent. `ready` is
  the child's ready line (its "heavy_modules" are those it imported, none by design).
  """

  def __init__(self, name: str, max_seconds: float, startup_seconds: float = 120.0):
    self.name, self.max_seconds, self.startup_seconds = name, max_seconds, startup_seconds
    self._proc: subprocess.Popen | None = None
    self._buf = b""
    self.ready: dict = {}

  def __call__(self, response: str, ground_truth: str) -> dict:
    if self._proc is None:
      self._start()
    try:
      self._send(json.dumps({"response": response, "ground_truth": ground_truth}).encode())
      reply = self._read_line(self.max_seconds)
    except BaseException:  # incl. KeyboardInterrupt: a child mid-call is never reused
      self.close()
      raise
    return self._result(reply)

  def _result(self, reply: dict) -> dict:
    if "error" in reply:
      raise RuntimeError(f"{self.name}: {reply['error']}")
    return reply

  def _start(self) -> subprocess.Popen:
    self._spawn()
    self._await_ready()
    return self._proc

  def _spawn(self) -> None:
    """Starts the child; `_await_ready` waits for its imports (several children start at once)."""
    self._buf = b""
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "fipo_jax.verifier_worker", self.name],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
    )

  def _await_ready(self) -> None:
    try:
      ready = self._read_line(self.startup_seconds)
    except BaseException:
      self.close()
      raise
    if not ready.get("ready"):
      self.close()
      raise RuntimeError(f"verifier {self.name} did not start: {ready.get('error')}")
    self.ready = ready

  def _send(self, request: bytes) -> None:
    self._proc.stdin.write(request + b"\n")
    self._proc.stdin.flush()

  @property
  def fd(self) -> int:
    return self._proc.stdout.fileno()

  def _read_available(self) -> dict | None:
    """Reads what the child wrote (call when its fd is readable); its line once complete."""
    if b"\n" not in self._buf:
      chunk = os.read(self.fd, 1 << 16)
      if not chunk:
        raise RuntimeError(f"verifier {self.name} exited (code {self._proc.poll()})")
      self._buf += chunk
    if b"\n" not in self._buf:
      return None
    line, _, self._buf = self._buf.partition(b"\n")
    return json.loads(line)

  def _read_line(self, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if b"\n" not in self._buf and (left <= 0 or not select.select([self.fd], [], [], left)[0]):
        raise VerifierTimeout(f"verifier {self.name} ran past {timeout}s")
      line = self._read_available()
      if line is not None:
        return line

  @property
  def running(self) -> bool:
    return self._proc is not None

  def close(self) -> None:
    """Kills the child (if any); the next call starts a new one."""
    proc, self._proc = self._proc, None
    if proc is not None:
      proc.kill()
      proc.wait()
      for f in (proc.stdin, proc.stdout):
        f.close()


class VerifierPool:
  """`workers` children of `python -m fipo_jax.verifier_worker NAME`, scoring concurrently.

  `map` spreads the requests over the children, one in flight per child, so each call keeps
  its own `max_seconds` bound: a child past it, or one that died, is killed and its response
  alone is an error (scored wrong and counted by `score_responses`); the next request it gets
  starts a new child. Called with one response it scores that one (a `ScoreFn`).
  """

  def __init__(self, name: str, workers: int, max_seconds: float, startup_seconds: float = 120.0):
    self.name = name
    self.members = [IsolatedVerifier(name, max_seconds, startup_seconds) for _ in range(workers)]

  def __call__(self, response: str, ground_truth: str) -> dict:
    (reply,) = self.map([(response, ground_truth)])
    if isinstance(reply, Exception):
      raise reply
    return reply

  def map(self, requests: Sequence[tuple]) -> list[dict | Exception]:
    """[(response, ground_truth)] -> the verifier's reply, or the exception, of each, in order."""
    results: list = [None] * len(requests)
    todo = collections.deque(range(len(requests)))
    busy: dict[int, tuple[int, float]] = {}  # member -> (request, deadline)
    try:
      while todo or busy:
        self._dispatch(requests, todo, busy, results)
        self._collect(busy, results)
    except BaseException:  # incl. KeyboardInterrupt: children mid-call are never reused
      for m in busy:
        self.members[m].close()
      raise
    return results

  def _dispatch(self, requests, todo, busy, results) -> None:
    """Gives each idle child the next request; children are started together."""
    idle = [m for m in range(len(self.members)) if m not in busy][: len(todo)]
    starting = {m: None for m in idle if not self.members[m].running}  # -> a failure to spawn
    for m in starting:
      try:
        self.members[m]._spawn()
      except Exception as e:  # noqa: BLE001 -- e.g. out of processes: the response fails alone
        starting[m] = e
    for m in idle:
      member, i = self.members[m], todo.popleft()
      try:
        if starting.get(m) is not None:
          raise starting[m]
        if m in starting:
          member._await_ready()
        response, ground_truth = requests[i]
        # A non-JSON value (bytes, ...) goes as null: not a string, as the verifiers score it.
        member._send(
          json.dumps(
            {"response": response, "ground_truth": ground_truth}, default=lambda _: None
          ).encode()
        )
      except Exception as e:  # noqa: BLE001 -- a child that fails to start or to listen
        member.close()
        results[i] = e
        continue
      busy[m] = (i, time.monotonic() + member.max_seconds)

  def _collect(self, busy, results) -> None:
    """Waits for the first reply or deadline; takes every reply ready, kills the late children."""
    if not busy:  # every child given a request failed to start: nothing to wait for
      return
    fds = {self.members[m].fd: m for m in busy}
    left = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
    for fd in select.select(list(fds), [], [], left)[0]:
      m = fds[fd]
      member, (i, _) = self.members[m], busy[m]
      try:
        reply = member._read_available()
      except Exception as e:  # noqa: BLE001 -- the child died or wrote garbage
        member.close()
        reply = e
      if reply is not None:
        results[i] = reply if isinstance(reply, Exception) else _as_result(member, reply)
        del busy[m]
    now = time.monotonic()
    for m, (i, deadline) in list(busy.items()):
      if deadline <= now:
        self.members[m].close()
        results[i] = VerifierTimeout(
          f"verifier {self.name} ran past {self.members[m].max_seconds}s"
        )
        del busy[m]

  def close(self) -> None:
    """Kills every child; the next call starts new ones."""
    for member in self.members:
      member.close()


def _as_result(member: IsolatedVerifier, reply: dict) -> dict | Exception:
  try:
    return member._result(reply)
  except RuntimeError as e:  # the worker's own error reply: the child stays
    return e
