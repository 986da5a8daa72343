"""Rewards: the verifiers of `rl.reward_fn`, the soft overlong penalty, and scoring rollouts.

`score_responses` is what the trainer and eval score with: the verifier named by
`RewardConfig.reward_fn`, size- and time-bounded, plus DAPO's overlong shaping.

  math_dapo   verl `math_dapo.compute_score` (the official FIPO/DAPO reward): +1 / -1 on the
              last "Answer: ..." line, in this process under a SIGALRM bound.
  math_verify verl `math_verify.compute_score` on the `math-verify` package (the optional
              `[math_verify]` extra): 1.0 / 0.0, symbolic; in a child process
              (`fipo_jax.verifier_worker`) that is killed when a call runs past the bound.

With `rl.reward_workers` = N >= 1 either verifier runs in N JAX-free child processes
(`VerifierPool`) that score a batch's responses concurrently, each call still bounded.

The verifiers' own scores (`math_dapo_score`) and the overlong penalty are the algorithm's
(`fipo_jax.algo.rewards`); the child processes are `fipo_jax.rl.verifier_processes`'s; this
module bounds each call, chooses where a verifier runs and scores a batch of rollouts.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import math
import signal
import threading
from collections.abc import Callable, Sequence

import numpy as np

from fipo_jax.algo.rewards import WRONG_SCORES, math_dapo_score, overlong_penalty
from fipo_jax.rl.verifier_processes import IsolatedVerifier, VerifierPool, VerifierTimeout

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
  reward_workers: int = 0  # rl.reward_workers: 0 scores in this process, N a VerifierPool of N

  @classmethod
  def from_section(cls, rl) -> RewardConfig:
    """The trainer's reward settings from the validated `rl` section."""
    return cls(max_response_length=rl.max_response_length,
               overlong_buffer_enable=rl.overlong_buffer_enable,
               overlong_buffer_len=rl.overlong_buffer_len,
               overlong_penalty_factor=rl.overlong_penalty_factor, reward_fn=rl.reward_fn,
               reward_workers=rl.reward_workers)


@dataclasses.dataclass(frozen=True)
class Verifier:
  """A reward function: its scorer and the score of a wrong answer (given on any failure)."""

  score_fn: ScoreFn
  wrong_score: float = -1.0
  bounds_itself: bool = False  # enforces max_seconds itself (no SIGALRM around the call)


@functools.cache
def _isolated(name: str, max_seconds: float) -> IsolatedVerifier:
  return IsolatedVerifier(name, max_seconds)  # one child per process and setting, reused


@functools.cache
def _pool(name: str, workers: int, max_seconds: float) -> VerifierPool:
  pool = VerifierPool(name, workers, max_seconds)  # per process and setting, reused
  atexit.register(pool.close)
  return pool


def verifier(cfg: RewardConfig) -> Verifier:
  """The verifier of `cfg.reward_fn` (a name of algo.rewards.WRONG_SCORES), in
  `cfg.reward_workers` child processes when that is >= 1."""
  if cfg.reward_fn not in WRONG_SCORES:
    raise ValueError(f"rl.reward_fn: unknown reward function {cfg.reward_fn!r}")
  wrong = WRONG_SCORES[cfg.reward_fn]
  if cfg.reward_workers > 0:
    return Verifier(_pool(cfg.reward_fn, cfg.reward_workers, cfg.max_seconds),
                    wrong_score=wrong, bounds_itself=True)
  if cfg.reward_fn == "math_dapo":
    return Verifier(math_dapo_score, wrong_score=wrong)
  return Verifier(_isolated(cfg.reward_fn, cfg.max_seconds), wrong_score=wrong,
                  bounds_itself=True)


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


def _bounded(text, gt, cfg: RewardConfig) -> tuple:
  """The verifier's inputs, size-bounded; raises on a ground truth past the bound."""
  if isinstance(gt, str) and len(gt) > cfg.max_ground_truth_chars:
    raise ValueError(f"ground truth of {len(gt)} chars > {cfg.max_ground_truth_chars}")
  if isinstance(text, str):
    text = text[-cfg.max_response_chars:]
  return text, gt


def _checked(res: dict) -> tuple[float, bool, str]:
  """(score, acc, pred) of a verifier's reply; raises on a non-finite score."""
  score, acc, pred = float(res["score"]), bool(res["acc"]), str(res.get("pred", ""))
  if not math.isfinite(score):
    raise ValueError(f"non-finite score {score}")
  return score, acc, pred


def _score_one(v: Verifier, text, gt, cfg: RewardConfig) -> tuple[float, bool, str]:
  """(score, acc, pred) of one response; raises on any verifier failure."""
  text, gt = _bounded(text, gt, cfg)
  bound = contextlib.nullcontext() if v.bounds_itself else _time_bound(cfg.max_seconds)
  with bound:
    res = v.score_fn(text, gt)
  return _checked(res)


def _attempt(fn, *args) -> tuple[float, bool, str] | Exception:
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 -- any verifier failure is a wrong answer
    return e


def _verify_all(v: Verifier, texts, ground_truths, cfg: RewardConfig) -> list:
  """(score, acc, pred) or the failure of each response: one at a time, or over a pool."""
  if not isinstance(v.score_fn, VerifierPool):
    return [_attempt(_score_one, v, text, gt, cfg)
            for text, gt in zip(texts, ground_truths, strict=True)]
  inputs = [_attempt(_bounded, text, gt, cfg)
            for text, gt in zip(texts, ground_truths, strict=True)]
  sent = [i for i, x in enumerate(inputs) if not isinstance(x, Exception)]
  replies = v.score_fn.map([inputs[i] for i in sent])
  for i, reply in zip(sent, replies, strict=True):
    inputs[i] = reply if isinstance(reply, Exception) else _attempt(_checked, reply)
  return inputs


def score_responses(
  texts: Sequence[str],
  lengths: Sequence[int],
  ground_truths: Sequence[str],
  cfg: RewardConfig,
  score_fn: ScoreFn | None = None,
) -> Scores:
  """Verifier score plus DAPO overlong shaping, per response.

  The verifier is `cfg.reward_fn`'s, or `score_fn` (wrong answers -1) when given; a
  `VerifierPool` (cfg.reward_workers >= 1) scores the responses concurrently. One that
  raises, times out or returns a non-finite score scores the sample as wrong and is counted;
  it never kills the run. Inputs are size-bounded first (see RewardConfig).
  """
  v = verifier(cfg) if score_fn is None else Verifier(score_fn)
  outcomes = _verify_all(v, texts, ground_truths, cfg)
  scores, raw, accs, preds, overlong, errors = [], [], [], [], [], 0
  for outcome, length in zip(outcomes, lengths, strict=True):
    if isinstance(outcome, Exception):
      e = outcome
      logging.warning("reward function failed (%s: %.200s); scoring as wrong",
                      type(e).__name__, e)
      score, acc, pred, errors = v.wrong_score, False, "[ERROR]", errors + 1
    else:
      score, acc, pred = outcome
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
