"""A verifier in its own process: `python -m fipo_jax.verifier_worker NAME`.

NAME is `math_dapo`, `math_verify` or `package.module:function` (a score function of your own,
imported in the child). `fipo_jax.rl.rewards.IsolatedVerifier` starts it, bounds each call in
time and kills it when a call runs past the bound; `VerifierPool` runs several
(`rl.reward_workers`). Protocol, one JSON object per line: the worker first writes
{"ready": true, "heavy_modules": [...]} (or {"error": ...} and exits), then answers every request
{"response": str, "ground_truth": str} on stdin with {"score", "acc", "pred"} on stdout, or
with {"error": "<type>: <message>"} when the scorer raised. It lives outside `fipo_jax.rl` so
that the child imports neither JAX nor the trainer: it starts in about a second, and a pool of
them costs no accelerator memory. "heavy_modules" lists those of HEAVY_MODULES that the worker
has imported (none: tests/test_reward_pool.py checks it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import pathlib
import sys

HEAVY_MODULES = ("jax", "flax", "transformers", "torch", "tensorflow")


@functools.cache
def _math_metric():
  """verl's `math_verify.compute_score` extraction: LaTeX gold, expression or LaTeX prediction."""
  from math_verify.metric import math_metric  # noqa: PLC0415 (the optional [math_verify] extra)
  from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig  # noqa: PLC0415

  return math_metric(
    gold_extraction_target=(LatexExtractionConfig(),),
    pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
  )


def math_verify_score(response: str, ground_truth: str) -> dict:
  """verl `reward_score.math_verify.compute_score(response, ground_truth)` as a score dict.

  The ground truth is wrapped in `\\boxed{}` and compared symbolically with the answer that
  math-verify extracts from the response. verl returns the float 1.0 (correct) or 0.0 (wrong);
  mapped onto this package's verifier dicts that is {'score': 1.0 | 0.0, 'acc': score == 1.0},
  so `acc` means what it means for math_dapo (+1/-1) while the score keeps verl's 0/1 scale.
  `pred` is math-verify's first (sympy) rendering of the extracted answer, '' when none.
  Exceptions propagate: the caller scores them as a wrong answer and counts them (verl scores
  them 0.0 silently).
  """
  score, extracted = _math_metric()(["\\boxed{" + ground_truth + "}"], [response])
  preds = extracted[1] if extracted else []
  score = float(score)
  return {"score": score, "acc": score == 1.0, "pred": str(preds[0]) if preds else ""}


def _load_math_verify():
  _math_metric()  # import before "ready": the first call's time bound is for scoring only
  return math_verify_score


def _load_math_dapo():
  """`fipo_jax.algo.rewards.math_dapo_score`, executed from its file.

  `import fipo_jax.algo.rewards` would first run fipo_jax/algo/__init__.py, which imports jax
  (seconds, and accelerator state in every worker). The module itself imports only `re` and
  numpy, so it is loaded alone, under a private name; the trainer's copy is the same file.
  """
  path = pathlib.Path(__file__).resolve().parent / "algo" / "rewards.py"
  spec = importlib.util.spec_from_file_location("_fipo_jax_worker_algo_rewards", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.math_dapo_score


SCORERS = {"math_dapo": _load_math_dapo, "math_verify": _load_math_verify}  # name -> loader


def _load(name: str):
  """The score function of NAME: a SCORERS key, or `package.module:function`."""
  if name in SCORERS:
    return SCORERS[name]()
  module, _, attr = name.partition(":")
  return getattr(importlib.import_module(module), attr)


def main(argv: list[str]) -> int:
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # one warning per unparsed answer
  out, sys.stdout = sys.stdout, sys.stderr  # a library's print() must not corrupt the replies

  def _reply(obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()

  if len(argv) != 1 or not (argv[0] in SCORERS or ":" in argv[0]):
    _reply(
      {
        "error": f"usage: python -m fipo_jax.verifier_worker "
        f"{{{','.join(SCORERS)},package.module:function}}"
      }
    )
    return 2
  try:
    scorer = _load(argv[0])
  except (ImportError, AttributeError) as e:
    _reply({"error": f"{type(e).__name__}: {e}"})
    return 2
  _reply({"ready": True, "heavy_modules": [m for m in HEAVY_MODULES if m in sys.modules]})
  for line in sys.stdin:
    try:
      req = json.loads(line)
      _reply(scorer(req["response"], req["ground_truth"]))
    except Exception as e:  # noqa: BLE001 -- reported to the caller, which counts it
      _reply({"error": f"{type(e).__name__}: {str(e)[:200]}"})
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
