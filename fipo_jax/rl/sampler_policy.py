"""The sampler's side of rollout correction, in the training system.

Which model the sampler runs (the trainer's, or another compute dtype) and on which RL steps
the trainer's old-log-prob pass checks it. The weights and mismatch metrics themselves are the
algorithm's (`fipo_jax.algo.rollout_correction`).
"""

import dataclasses

from flax import nnx

from fipo_jax import models


def metrics_due(rl, step: int) -> bool:
  """Whether RL step `step` (0-based) runs the trainer's old-log-prob pass: always with
  rl.old_log_prob_source 'trainer', every rl.mismatch_metrics_every steps with 'sampler'
  (0: never), so that the drift stays visible."""
  if rl.old_log_prob_source == "trainer":
    return True
  every = rl.mismatch_metrics_every
  return every > 0 and step % every == 0


def sampler_model(model_cfg, graphdef, sampler_dtype: str | None):
  """(ModelConfig, GraphDef) the sampler runs: the trainer's, or with compute dtype
  `sampler_dtype` (rl.sampler_dtype; the params and their layout are the same)."""
  if sampler_dtype is None or sampler_dtype == model_cfg.dtype:
    return model_cfg, graphdef
  cfg = dataclasses.replace(model_cfg, dtype=sampler_dtype)
  return cfg, nnx.split(models.abstract_model(cfg))[0]
