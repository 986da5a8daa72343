"""A verifier in its own process: `python -m fipo_jax.verifier_worker math_verify`.

`fipo_jax.rl.rewards.IsolatedVerifier` starts it, bounds each call in time and kills it when a
call runs past the bound. Protocol, one JSON object per line: the worker first writes
{"ready": true} (or {"error": ...} and exits), then answers every request
{"response": str, "ground_truth": str} on stdin with {"score", "acc", "pred"} on stdout, or
with {"error": "<type>: <message>"} when the scorer raised. It lives outside `fipo_jax.rl` so
that the child imports neither JAX nor the trainer: it starts in about a second.
"""

from __future__ import annotations

import functools
import json
import logging
import sys


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


SCORERS = {"math_verify": math_verify_score}


def main(argv: list[str]) -> int:
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # one warning per unparsed answer
  out, sys.stdout = sys.stdout, sys.stderr  # a library's print() must not corrupt the replies

  def _reply(obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()

  if len(argv) != 1 or argv[0] not in SCORERS:
    _reply({"error": f"usage: python -m fipo_jax.verifier_worker {{{','.join(SCORERS)}}}"})
    return 2
  scorer = SCORERS[argv[0]]
  try:
    _math_metric()  # import before "ready": the first call's time bound is for scoring only
  except ImportError as e:
    _reply({"error": f"{type(e).__name__}: {e}"})
    return 2
  _reply({"ready": True})
  for line in sys.stdin:
    try:
      req = json.loads(line)
      _reply(scorer(req["response"], req["ground_truth"]))
    except Exception as e:  # noqa: BLE001 -- reported to the caller, which counts it
      _reply({"error": f"{type(e).__name__}: {str(e)[:200]}"})
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
