"""Rewards: the verifiers of `rl.reward_fn`, the soft overlong penalty, and scoring rollouts.

`score_responses` is what the trainer and eval score with: the verifier named by
`RewardConfig.reward_fn`, size- and time-bounded, plus DAPO's overlong shaping.

  math_dapo   verl `math_dapo.compute_score` (the official FIPO/DAPO reward): +1 / -1 on the
              last "Answer: ..." line, in this process under a SIGALRM bound.
  math_verify verl `math_verify.compute_score` on the `math-verify` package (the optional
              `[math_verify]` extra): 1.0 / 0.0, symbolic; in a child process
              (`fipo_jax.verifier_worker`) that is killed when a call runs past the bound.

The verifiers' own scores (`math_dapo_score`) and the overlong penalty are the algorithm's
(`fipo_jax.algo.rewards`); this module bounds each call, isolates `math_verify` in a child
process and scores a batch of rollouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from fipo_jax.algo.rewards import math_dapo_score, overlong_penalty

# --- Scoring rollouts ------------------------------------------------------------------------

ScoreFn = Callable[[str, str], dict]  # (response, ground_truth) -> {'score', 'acc', 'pred'}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  max_response_length: int
  overlong_buffer_enable: bool = True
  overlong_buffer_len: int = 4096
  overlong_penalty_factor: float = 1.0
  reward_fn: str = "math_dapo"  # rl.reward_fn, a key of VERIFIERS
  # Size bounds of one verifier call: with the linear-time math_dapo_score they bound its time.
  # Only the response's tail is passed (math_dapo reads its last 300 characters, math-verify
  # the last answer, so this changes no score); a longer ground truth is a data error, scored
  # wrong and counted.
  max_response_chars: int = 4096
  max_ground_truth_chars: int = 1024
  # Wall-clock bound of one verifier call. In-process verifiers: SIGALRM in the main thread,
  # where the trainer runs (elsewhere only the size bounds hold); math_verify: its child
  # process is killed.
  max_seconds: float = 2.0

  @classmethod
  def from_section(cls, rl) -> RewardConfig:
    """The trainer's reward settings from the validated `rl` section."""
    return cls(max_response_length=rl.max_response_length,
               overlong_buffer_enable=rl.overlong_buffer_enable,
               overlong_buffer_len=rl.overlong_buffer_len,
               overlong_penalty_factor=rl.overlong_penalty_factor, reward_fn=rl.reward_fn)


@dataclasses.dataclass(frozen=True)
class Verifier:
  """A reward function: its scorer and the score of a wrong answer (given on any failure)."""

  score_fn: ScoreFn
  wrong_score: float = -1.0
  bounds_itself: bool = False  # enforces max_seconds itself (no SIGALRM around the call)


class VerifierTimeout(Exception):
  """A verifier call ran past RewardConfig.max_seconds."""


class IsolatedVerifier:
  """`python -m fipo_jax.verifier_worker NAME` as a scorer: one child process, reused.

  Each call waits at most `max_seconds` for its reply. A call past that, a child that died or
  any error while talking to it kills the child and raises (VerifierTimeout or RuntimeError:
  `score_responses` scores it wrong and counts it); the next call starts a new child. A new
  child gets `startup_seconds` for its imports before the first request is sent.
  """

  def __init__(self, name: str, max_seconds: float, startup_seconds: float = 120.0):
    self.name, self.max_seconds, self.startup_seconds = name, max_seconds, startup_seconds
    self._proc: subprocess.Popen | None = None
    self._buf = b""

  def __call__(self, response: str, ground_truth: str) -> dict:
    proc = self._proc or self._start()
    try:
      proc.stdin.write(json.dumps({"response": response, "ground_truth": ground_truth}).encode()
                       + b"\n")
      proc.stdin.flush()
      reply = self._read_line(self.max_seconds)
    except BaseException:  # incl. KeyboardInterrupt: a child mid-call is never reused
      self.close()
      raise
    if "error" in reply:
      raise RuntimeError(f"{self.name}: {reply['error']}")
    return reply

  def _start(self) -> subprocess.Popen:
    self._buf = b""
    self._proc = subprocess.Popen(
      [sys.executable, "-m", "fipo_jax.verifier_worker", self.name],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
      ready = self._read_line(self.startup_seconds)
    except BaseException:
      self.close()
      raise
    if not ready.get("ready"):
      self.close()
      raise RuntimeError(f"verifier {self.name} did not start: {ready.get('error')}")
    return self._proc

  def _read_line(self, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buf:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        raise VerifierTimeout(f"verifier {self.name} ran past {timeout}s")
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        raise RuntimeError(f"verifier {self.name} exited (code {self._proc.poll()})")
      self._buf += chunk
    line, _, self._buf = self._buf.partition(b"\n")
    return json.loads(line)

  def close(self) -> None:
    """Kills the child (if any); the next call starts a new one."""
    proc, self._proc = self._proc, None
    if proc is not None:
      proc.kill()
      proc.wait()
      for f in (proc.stdin, proc.stdout):
        f.close()


@functools.cache
def _isolated(name: str, max_seconds: float) -> IsolatedVerifier:
  return IsolatedVerifier(name, max_seconds)  # one child per process and setting, reused


def verifier(cfg: RewardConfig) -> Verifier:
  """The verifier of `cfg.reward_fn` (config_rl.REWARD_FNS lists the names)."""
  if cfg.reward_fn == "math_dapo":
    return Verifier(math_dapo_score, wrong_score=-1.0)
  if cfg.reward_fn == "math_verify":  # verl's 0/1 scale: a wrong answer scores 0.0
    return Verifier(_isolated("math_verify", cfg.max_seconds), wrong_score=0.0,
                    bounds_itself=True)
  raise ValueError(f"rl.reward_fn: unknown reward function {cfg.reward_fn!r}")


@contextlib.contextmanager
def _time_bound(seconds: float):
  """Raises VerifierTimeout in the block after `seconds` (main thread, POSIX); else no bound."""
  usable = (seconds > 0 and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread())
  if not usable:
    yield
    return

  def on_alarm(signum, frame):  # noqa: ARG001
    raise VerifierTimeout(f"verifier ran past {seconds}s")

  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Scores:
  """Per-response rewards of B responses.

  `scores` is what advantages are computed from: verl's `token_level_scores` summed over the
  response (its `seq_reward`), i.e. the verifier score plus the overlong penalty. The
  verifier's own score is verl's `score` (reward_extra_info), without the penalty.
  """

  scores: np.ndarray  # f32[B], verifier score + overlong penalty
  verifier_scores: np.ndarray  # f32[B]
  acc: np.ndarray  # bool[B]
  preds: list[str]
  overlong: np.ndarray  # bool[B], penalty < 0
  errors: int = 0  # verifier failures (scored as wrong answers)


def _score_one(v: Verifier, text, gt, cfg: RewardConfig) -> tuple[float, bool, str]:
  """(score, acc, pred) of one response; raises on any verifier failure."""
  if isinstance(gt, str) and len(gt) > cfg.max_ground_truth_chars:
    raise ValueError(f"ground truth of {len(gt)} chars > {cfg.max_ground_truth_chars}")
  if isinstance(text, str):
    text = text[-cfg.max_response_chars:]
  bound = contextlib.nullcontext() if v.bounds_itself else _time_bound(cfg.max_seconds)
  with bound:
    res = v.score_fn(text, gt)
  score, acc, pred = float(res["score"]), bool(res["acc"]), str(res.get("pred", ""))
  if not math.isfinite(score):
    raise ValueError(f"non-finite score {score}")
  return score, acc, pred


def score_responses(
  texts: Sequence[str],
  lengths: Sequence[int],
  ground_truths: Sequence[str],
  cfg: RewardConfig,
  score_fn: ScoreFn | None = None,
) -> Scores:
  """Verifier score plus DAPO overlong shaping, per response.

  The verifier is `cfg.reward_fn`'s, or `score_fn` (wrong answers -1) when given. One that
  raises, times out or returns a non-finite score scores the sample as wrong and is counted;
  it never kills the run. Inputs are size-bounded first (see RewardConfig).
  """
  v = verifier(cfg) if score_fn is None else Verifier(score_fn)
  scores, raw, accs, preds, overlong, errors = [], [], [], [], [], 0
  for text, length, gt in zip(texts, lengths, ground_truths, strict=True):
    try:
      score, acc, pred = _score_one(v, text, gt, cfg)
    except Exception as e:  # noqa: BLE001 -- any verifier failure is a wrong answer
      logging.warning("reward function failed (%s: %.200s); scoring as wrong",
                      type(e).__name__, e)
      score, acc, pred, errors = v.wrong_score, False, "[ERROR]", errors + 1
    penalty = 0.0
    if cfg.overlong_buffer_enable:
      penalty = overlong_penalty(length, cfg.max_response_length, cfg.overlong_buffer_len,
                                 cfg.overlong_penalty_factor)
    scores.append(score + penalty)
    raw.append(score)
    accs.append(acc)
    preds.append(pred)
    overlong.append(penalty < 0)
  return Scores(np.asarray(scores, np.float32), np.asarray(raw, np.float32),
                np.asarray(accs, bool), preds, np.asarray(overlong, bool), errors)
