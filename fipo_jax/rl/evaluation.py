"""Evaluation on held-out prompts: avg@k, pass@k, cons@k and response lengths.

Used inside training (every `eval_every` steps, RL step 0 included) and by
`python -m fipo_jax.eval`. Each prompt gets `eval.n` samples with the eval sampling settings
(official: temperature 1.0, top-p 0.7); `eval/acc_mean` is avg@n (avg@1 when n = 1).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fipo_jax import estimators, seeds
from fipo_jax import metrics as metrics_lib
from fipo_jax.rl import rewards, scoring
from fipo_jax.sampling import driver as driver_lib


def evaluate_examples(engine, params, examples: Sequence[dict], *, tokenizer, eos_ids,
                      reward_cfg: rewards.RewardConfig, n: int, sampling, seed: int,
                      max_new_tokens: int, progress: bool = False) -> tuple[dict, list[dict]]:
  """Samples n responses per example and scores them. Returns (metrics, per-sample records)."""
  t0 = time.perf_counter()
  res = driver_lib.run(engine, params, [e["prompt_ids"] for e in examples], n=n,
                       max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                       seed=seed, progress=progress)
  r = scoring.make_rollouts(tokenizer, reward_cfg, examples, res.samples)
  correct = r.acc.reshape(len(examples), n)
  preds = np.asarray(r.preds, dtype=object).reshape(len(examples), n)
  lengths = np.asarray([len(x) for x in r.response_ids])
  metrics: dict[str, Any] = {
    "eval/acc_mean": float(correct.mean()),
    f"eval/avg@{n}": float(correct.mean()),
    f"eval/pass@{n}": float(np.mean([estimators.pass_at_k(n, int(c.sum()), n) for c in correct])),
    f"eval/cons@{n}": float(estimators.cons_at_k(preds.tolist(), correct.tolist())),
    "eval/num_prompts": len(examples),
    "eval/reward_errors": int(r.reward_errors),
    "timing_s/eval": time.perf_counter() - t0,
  }
  if n >= 2:
    k = min(n, 8) if n > 8 else n // 2
    metrics[f"eval/pass@{k}"] = float(
      np.mean([estimators.pass_at_k(n, int(c.sum()), k) for c in correct]))
  for key, val in metrics_lib.response_length_metrics(lengths, max_new_tokens).items():
    metrics["eval/" + key] = val
  records = [{"prompt_index": s.prompt_index, "sample_index": s.sample_index,
              "response_ids": s.response_ids.tolist(), "finish_reason": s.finish_reason,
              "pred": pred, "acc": bool(acc)}
             for s, pred, acc in zip(res.samples, r.preds, r.acc, strict=True)]
  return metrics, records


def evaluate(rc, sampler: scoring.Sampler, examples: Sequence[dict], params, *,
             step: int, n: int | None = None, stream: str = "eval") -> dict:
  """In-training eval on the held-out `examples` (eval.max_prompts of them; -1 = all), with
  the sampling method of `sampler`, n samples each (None: eval.n), seeded by `stream`."""
  if rc.eval.max_prompts > 0:
    examples = examples[: rc.eval.max_prompts]
  metrics, _ = evaluate_examples(
    sampler.engine, sampler.engine.load_params(params), examples, tokenizer=sampler.tokenizer,
    eos_ids=sampler.eos_ids, reward_cfg=sampler.reward_cfg, n=rc.eval.n if n is None else n,
    sampling=sampler.method, seed=seeds.seed_for(rc.seed, stream, step),
    max_new_tokens=rc.rl.max_response_length,
  )
  return metrics
