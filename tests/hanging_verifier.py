"""A verifier worker's score function for tests: math_dapo, except on two marker responses.

Run as `python -m fipo_jax.verifier_worker hanging_verifier:score` with this directory on
PYTHONPATH. "HANG" never returns (a verifier stuck on one response); "DIE" ends the worker
process without a reply (a crash); "MEET:<dir>:<k>" returns a right answer once k workers are
in that call at the same time (a pool that scores one response at a time never gets there).
Imports no JAX, like the real verifiers.
"""

import os
import pathlib
import time

from fipo_jax import verifier_worker

_MATH_DAPO = verifier_worker.SCORERS["math_dapo"]()


def score(response, ground_truth) -> dict:
  if response == "HANG":
    time.sleep(3600)
  if response == "DIE":
    os._exit(3)
  if isinstance(response, str) and response.startswith("MEET:"):
    _, where, k = response.split(":")
    pathlib.Path(where, str(os.getpid())).touch()
    while len(list(pathlib.Path(where).iterdir())) < int(k):
      time.sleep(0.01)
    return {"score": 1.0, "acc": True, "pred": "met"}
  return _MATH_DAPO(response, ground_truth)
