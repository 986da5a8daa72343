"""FLOPs counted from a step's jaxpr (scans multiplied by their length), and FLOPs per RL step.

fipo_jax.aot reports FLOPs from the compiled programs (fipo_jax.perf_model); this count, from
the traced program, needs no compile and compares the packed and padded layouts per RL step.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from fipo_jax import aot_batches, aot_phases


def jaxpr_flops(jaxpr) -> tuple[float, int]:
  """(FLOPs of a (closed) jaxpr with scans multiplied by their length, uncounted kernels).

  Counts dot_general (2 * out size * contracted size) and Pallas kernels with a cost estimate;
  while loops count one iteration (decode compiles one step); cond counts its costliest branch.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total, uncounted = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_c, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_c)
      continue
    if name == "pallas_call":
      est = eqn.params.get("cost_estimate")
      if est is not None and getattr(est, "flops", None):
        total += float(est.flops)
      else:
        uncounted += 1
      continue
    subs = [v for v in eqn.params.values() if isinstance(v, jax.extend.core.ClosedJaxpr | tuple)]
    sub = [jaxpr_flops(j) for v in subs for j in (v if isinstance(v, tuple) else (v,))
           if hasattr(j, "eqns") or hasattr(j, "jaxpr")]
    if name == "cond":
      f, u = max(sub, default=(0.0, 0))
    else:
      f, u = sum(s[0] for s in sub), sum(s[1] for s in sub)
    if name == "scan":
      f *= eqn.params["length"]
    if name == "shard_map":  # the body sees one shard; FLOPs are summed over the mesh
      f *= eqn.params["mesh"].size
    for v in eqn.params.values():  # pjit, remat, custom_vjp carry a bare Jaxpr
      if isinstance(v, jax.extend.core.Jaxpr):
        f2, u2 = jaxpr_flops(v)
        f, u = f + f2, u + u2
    total, uncounted = total + f, uncounted + u
  return total, uncounted


def rl_step_flops(run, mcfg, mesh, mean_prompt: int, mean_response: int) -> dict:
  """FLOPs of one RL step's model passes (all chips), packed and padded, traced not compiled.

  Updates: rl.num_mini_batches x ppo_epochs train steps; plus one old-log-prob pass per
  mini-batch (two with the KL term's reference pass). Returns {packed, padded, shape}.
  """
  from fipo_jax.rl import steps as steps_lib

  prog = aot_phases.build(run, mcfg, list(mesh.devices.flat))
  graphdef, params, opt_state, cfg = prog.graphdef, prog.params, prog.opt_state, prog.update_cfg
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
  shape = aot_batches.packed_shape(run, mesh, cfg, mean_prompt, mean_response)
  passes = 2 if cfg.use_kl_loss else 1
  out = {"shape": dataclasses.asdict(shape)}
  steps = steps_lib.jit_steps(graphdef, cfg=cfg, tx=prog.tx, param_sharding=param_sh,
                              opt_sharding=opt_sh)  # one set of steps, two layouts
  for name, layout in (("packed", shape), ("padded", aot_batches.padded_shape(run, mesh, cfg))):
    batch = aot_batches.batch(run, mesh, layout, cfg)
    train = jaxpr_flops(steps.train.trace(params, opt_state, batch).jaxpr)[0]
    logp = jaxpr_flops(steps.log_prob.trace(params, batch).jaxpr)[0]
    out[name] = run.rl.num_mini_batches * (run.rl.ppo_epochs * train + passes * logp)
  return out
