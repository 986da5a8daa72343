"""Scoring a batch in this process vs a pool of verifier processes (rl.reward_workers).

  python benchmarks/reward_pool.py [--reward_fn math_dapo|math_verify --n 4096 --workers 2
                                    --repeats 2]

The trainer's own entry point on both sides: `rewards.score_responses` with reward_workers=0
(math_dapo in this process, math_verify in one child) and with `--workers` children. The batch
is synthetic: solutions of 300-3000 characters of filler ending in a right, a wrong or no
answer, as LaTeX (\\frac, \\boxed) and an "Answer:" line, so both verifiers have work to do.
The pool's children are started (and kept) before timing; their start-up is reported apart.
Both sides must give identical Scores (checked). Time is the best of `--repeats` calls each.
The last line is JSON: {"reward_fn", "n", "workers", "serial_s", "pool_s", "speedup",
"pool_startup_s", "errors"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from fipo_jax.rl import rewards  # noqa: E402


def batch(n: int, seed: int = 0) -> tuple[list[str], list[int], list[str]]:
  """n synthetic solutions, their token lengths and ground truths (fractions p/q)."""
  rng = random.Random(seed)
  texts, lengths, gts = [], [], []
  for _ in range(n):
    p, q = rng.randint(1, 99), rng.randint(2, 99)
    filler = " ".join(f"step {k}: $x_{{{k}}} = {rng.randint(0, 999)}$" for k in range(500))
    filler = filler[: rng.randint(300, 3000)]
    kind = rng.random()
    if kind < 0.45:
      end = f"\\boxed{{\\frac{{{p}}}{{{q}}}}}\nAnswer: \\frac{{{p}}}{{{q}}}"
    elif kind < 0.9:
      end = f"\\boxed{{\\frac{{{p + 1}}}{{{q}}}}}\nAnswer: \\frac{{{p + 1}}}{{{q}}}"
    else:
      end = "I could not finish."
    texts.append(f"{filler}\n{end}")
    lengths.append(rng.randint(100, 2048))
    gts.append(f"\\frac{{{p}}}{{{q}}}")
  return texts, lengths, gts


def best_time(fn, repeats: int):
  out, best = None, float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return out, best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reward_fn", default="math_dapo", choices=("math_dapo", "math_verify"))
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=2)
  a = ap.parse_args()
  texts, lengths, gts = batch(a.n)
  cfgs = [rewards.RewardConfig(max_response_length=2048, overlong_buffer_len=512,
                               reward_fn=a.reward_fn, reward_workers=w) for w in (0, a.workers)]
  t0 = time.perf_counter()  # start (and keep) each side's children: math_verify's, the pool's
  rewards.score_responses(texts[:1], lengths[:1], gts[:1], cfgs[0])
  rewards.score_responses(texts[:a.workers], lengths[:a.workers], gts[:a.workers], cfgs[1])
  startup = time.perf_counter() - t0
  serial, serial_s = best_time(lambda: rewards.score_responses(texts, lengths, gts, cfgs[0]),
                               a.repeats)
  pool, pool_s = best_time(lambda: rewards.score_responses(texts, lengths, gts, cfgs[1]),
                           a.repeats)
  for field in ("scores", "verifier_scores", "acc", "overlong"):
    np.testing.assert_array_equal(getattr(pool, field), getattr(serial, field), err_msg=field)
  assert pool.preds == serial.preds and pool.errors == serial.errors
  print(f"{a.reward_fn}: {a.n} responses, accuracy {serial.acc.mean():.3f}, "
        f"{serial.errors} errors; serial {serial_s:.2f}s, {a.workers} workers {pool_s:.2f}s "
        f"(x{serial_s / pool_s:.2f}); children started in {startup:.2f}s")
  print(json.dumps({"reward_fn": a.reward_fn, "n": a.n, "workers": a.workers,
                    "serial_s": round(serial_s, 3), "pool_s": round(pool_s, 3),
                    "speedup": round(serial_s / pool_s, 3), "pool_startup_s": round(startup, 3),
                    "errors": serial.errors}))


if __name__ == "__main__":
  main()
