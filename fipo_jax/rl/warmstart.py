"""Supervised warm start for the synthetic task: the part a pretrained base model plays.

A random model cannot learn by RL alone (it never samples a rewarded answer), so `tiny_cpu`
first fits the task on the train split for `sft.steps` steps. To leave RL something to fix, as
with a real base model, a fraction `sft.wrong_fraction` of the supervised answers carry a
systematic slip (copy: the middle two digits swapped; arith: the carry forgotten). The
warm-started policy then samples both the right and the slipped answer, and RL, rewarded only by
the verifier, must move the probability mass; the slip sits mid-answer, so the tokens before it
carry Future-KL from the tokens after it. For 'parity' (configs/reasoning_cpu.py) the base model
instead answers directly (right at about chance) and gives the running-parity chain of thought
(long, mostly right) for a share `sft.chain_fraction` of its supervised examples, drawn per
example and step; RL must move it to the long form.

The warm start runs until the mean loss of its last `LOSS_WINDOW` steps is at most
`sft.loss_threshold`, with at most `sft.steps` steps and a linear lr warmup over
`sft.warmup_steps`. With chains, that stage sees chains only, and `sft.mix_steps` steps on the
mix follow (`_train`), their lr annealed to 0 (`stage_lr`). In the mix a direct answer's bit is
asked for without being named (`mix_step`): trained on the true parity, which the model cannot
compute in one token, it taught the answer step after the chain to guess. A batch of chains
is held in place alongside the mix, its first token trained only given that the response is a
chain, so the chain (its first digit included) stays learnt while the share of chains the model
samples moves. A warm start that ends above
the threshold raises `CannotLearn` (the CLI: one line, exit 2) and caches nothing. The result
is cached in WORKDIR/sft for restarts.
"""

from __future__ import annotations

import functools
import json
import logging
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from fipo_jax import config_schema, models, paths, seeds, sharding
from fipo_jax.data import synthetic, verl
from fipo_jax.rl import packing
from fipo_jax.rl import steps as steps_lib

LOSS_WINDOW = 10  # steps averaged for the loss-threshold test (one batch's loss is noisy)


class CannotLearn(RuntimeError):
  """The run cannot learn: the warm start missed its loss threshold, or no group of responses
  has mixed accuracy (every advantage 0). Raised before any update it would waste."""


def no_carry_sum(question: str) -> str | None:
  """'Q: 37+45=' -> '72' (digit-wise sum mod 10), or None when it is not an a+b question."""
  expr = question.removeprefix("Q: ").removesuffix("=")
  parts = expr.split("+")
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    return None
  a, b = parts
  width = max(len(a), len(b))
  a, b = a.zfill(width), b.zfill(width)
  digits = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))
  return str(int(digits))


def swapped_middle(question: str) -> str | None:
  """'Q: copy 4831=' -> '4381' (the two middle digits swapped), None if they are equal."""
  digits = question.removeprefix("Q: copy ").removesuffix("=")
  i = len(digits) // 2 - 1
  if len(digits) < 2 or not digits.isdigit() or digits[i] == digits[i + 1]:
    return None
  return digits[:i] + digits[i + 1] + digits[i] + digits[i + 2 :]


def slipped_answer(kind: str, question: str) -> str | None:
  """The systematic wrong answer of the warm start's 'base model', or None if there is none."""
  return swapped_middle(question) if kind == "copy" else no_carry_sum(question)


def sft_rows(rc, workdir: str) -> list[dict]:
  """The train rows with `wrong_fraction` of the slippable answers replaced by the slip."""
  train_file = paths.join(workdir, "data", synthetic.TRAIN_FILE)
  rows = [json.loads(line) for line in paths.read_text(train_file).splitlines() if line.strip()]
  rng = random.Random(seeds.seed_for(rc.seed, "sft_rows"))
  out = []
  for row in rows:
    question = row["prompt"][0]["content"]
    answer = row["reward_model"]["ground_truth"]
    slip = slipped_answer(rc.data.synthetic.kind, question)
    if slip is not None and slip != answer and rng.random() < rc.sft.wrong_fraction:
      answer = slip
    out.append(
      verl.make_row(question, answer, data_source=row["data_source"], index=len(out), split="sft")
    )
  return out


def _batch(
  examples, *, max_prompt_length: int, max_response_length: int, pad_id: int
) -> steps_lib.Batch:
  """Supervised examples on the padded layout, one micro-batch on one shard, slot e = example
  e; the loss reads only the response mask."""
  p, t = max_prompt_length, max_response_length
  packed = packing.pack_rollouts(
    [e["prompt_ids"] for e in examples],
    [e["response_ids"] for e in examples],
    [np.zeros(len(e["response_ids"]), np.float32) for e in examples],
    np.zeros(len(examples), np.float32),
    mini=len(examples),
    max_prompt_length=p,
    max_response_length=t,
    layout=packing.Layout(p + t, 1, 1, padded=True),
    pad_id=pad_id,
  )
  arrays = packed.batches[0]
  assert (arrays["seq_index"][0, 0] == np.arange(len(examples))).all()  # one row per example
  return steps_lib.Batch(**{k: jax.numpy.asarray(v) for k, v in arrays.items()})


def _alt_ids(examples, *, max_response_length: int, pad_id: int) -> np.ndarray:
  """int32[B, T]: each example's `alt_ids` right-padded as `_batch` pads its responses."""
  out = np.full((len(examples), max_response_length), pad_id, np.int32)
  for row, e in zip(out, examples, strict=True):
    row[: len(e["alt_ids"])] = e["alt_ids"]
  return out


def mix_step(
  graphdef,
  params,
  opt_state,
  batch: steps_lib.Batch,
  alt_ids,
  held,
  *,
  cfg: steps_lib.UpdateConfig,
  tx,
):
  """`steps.sft_step` on the mix, plus the chain held in place. Rows with held f32[B] = 0 are the
  mix: where alt_ids int32[B, T] differs from the response the loss is -log(p(token) + p(alt
  token)), as a direct parity answer names no bit (a model that cannot compute the parity in one
  token would learn only noise there, on the answer step the chain's answer shares); every other
  token, the negative log-likelihood. Rows with held = 1 are chains: where alt_ids differs (the
  first token, whose alt is the direct answer's) the loss is -log(p(token) / (1 - p(alt
  token))), the chain's first digit given that the response is a chain, which leaves the share
  of chains the model samples free (p(alt) gets no gradient); elsewhere the NLL. With the first
  token out of the held loss it was trained only by the mix's few chains and drifted to chance
  on a seed: its chains were then right half the time, no better than a direct answer, and RL
  had no reason to choose them. Loss: the token mean over the mix plus the one over the held
  rows. `batch` is `_batch`'s padded layout: [1, 1, B, P + T] rows, responses at [P, P + T)."""
  ids, segments, pos = batch.input_ids[0, 0], batch.segment_ids[0, 0], batch.positions[0, 0]
  response_mask = batch.response_mask[0, 0]  # [B, T]
  t = response_mask.shape[1]
  length = ids.shape[1]
  free = alt_ids != ids[:, length - t :]  # bool[B, T]

  def loss_fn(p):
    model = nnx.merge(graphdef, p)
    hidden = model.hidden_states(
      ids, positions=pos, attention_mask=(segments > 0).astype(jnp.int32)
    )[:, length - t - 1 : -1]
    kw = dict(temperature=cfg.temperature, chunk_size=cfg.logprob_chunk_size)
    w = model.unembedding()
    log_prob = models.token_log_probs_from_hidden(hidden, w, ids[:, length - t :], **kw)
    alt = models.token_log_probs_from_hidden(hidden, w, alt_ids, **kw)
    either = jnp.logaddexp(log_prob, alt)  # mix: one of two tokens, unnamed
    given = log_prob - jnp.log(-jnp.expm1(jnp.minimum(alt, -1e-6)))  # held: given not alt
    log_prob = jnp.where(free, jnp.where(held[:, None] > 0, given, either), log_prob)
    mix_mask = response_mask * (1.0 - held[:, None])
    held_mask = response_mask * held[:, None]
    mix = -jnp.sum(log_prob * mix_mask) / (jnp.sum(mix_mask) + 1e-8)
    kept = -jnp.sum(log_prob * held_mask) / (jnp.sum(held_mask) + 1e-8)
    return mix + kept, (mix, kept)

  (_, (mix, kept)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {
    "sft/loss": mix,
    "sft/held_chain_loss": kept,
    "sft/grad_norm": optax.global_norm(grads),
  }
  return params, opt_state, metrics


def _mix_batch(examples, held, *, max_prompt_length: int, max_response_length: int, pad_id: int):
  """(batch, alt_ids, held f32[B]): the mix's `examples`, then the `held` chains with their
  `held_alt_ids` (the first token's alt: the direct answer's first token)."""
  rows = [*examples, *held]
  batch = _batch(
    rows,
    max_prompt_length=max_prompt_length,
    max_response_length=max_response_length,
    pad_id=pad_id,
  )
  is_held = np.r_[np.zeros(len(examples)), np.ones(len(held))].astype(np.float32)
  alt_rows = [*examples, *({"alt_ids": e["held_alt_ids"]} for e in held)]
  alt = _alt_ids(alt_rows, max_response_length=max_response_length, pad_id=pad_id)
  return batch, jnp.asarray(alt), jnp.asarray(is_held)


def _examples(rc, tokenizer, workdir: str) -> tuple[list[dict], list[dict]]:
  """(direct examples, chain examples; [] unless sft.chain_fraction > 0), one per train row.

  With chains, each example also carries `alt_ids` int32[T]: a direct answer's response with
  its bit flipped, a chain's response itself. The mix stage asks for a bit where they differ
  without naming it (`mix_step`). A chain also carries `held_alt_ids`: its response with the
  first token the direct answer's, for the held rows (the first digit given a chain).
  """
  rows = sft_rows(rc, workdir)
  kw = dict(apply_chat_template=rc.data.apply_chat_template)
  direct = synthetic.sft_examples(tokenizer, rows, **kw)
  if rc.sft.chain_fraction <= 0.0:
    return direct, []
  flipped = [
    verl.make_row(
      r["prompt"][0]["content"],
      str(1 - int(r["reward_model"]["ground_truth"])),
      data_source=r["data_source"],
      index=i,
      split="sft",
    )
    for i, r in enumerate(rows)
  ]
  for e, f in zip(direct, synthetic.sft_examples(tokenizer, flipped, **kw), strict=True):
    e["alt_ids"] = f["response_ids"]
  chain = synthetic.sft_examples(tokenizer, rows, chain=True, **kw)
  for e, d in zip(chain, direct, strict=True):
    e["alt_ids"] = e["response_ids"]  # no free token
    e["held_alt_ids"] = np.r_[d["response_ids"][:1], e["response_ids"][1:]].astype(np.int32)
  return direct, chain


def stage_lr(sft, i: int, *, mix: bool) -> float:
  """The warm start's lr at step i of a stage (0-based). First stage: linear from 0 over
  sft.warmup_steps, then sft.lr (optax.linear_schedule). Mix stage: sft.lr linearly to 0 over
  sft.mix_steps, so the base model's chain share ends near sft.chain_fraction rather than
  where the last noisy batches left it, and the chain learnt first drifts less."""
  if mix:
    return sft.lr * (1.0 - i / sft.mix_steps)
  return sft.lr * min(i, sft.warmup_steps) / sft.warmup_steps if sft.warmup_steps else sft.lr


def _jit_steps(params, *, graphdef, update_cfg, mesh, lr: float):
  """(opt_state, sft step, mix step): AdamW whose lr is set per step (`stage_lr`: the first
  stage's length is known only when it ends), its moments in the params' shards (multi-host:
  not on one device), the steps' outputs pinned to their inputs' shardings (no recompiles)."""
  tx = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=0.0)
  opt_shardings = sharding.optimizer_shardings(tx, params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  shardings = (jax.tree.map(lambda x: x.sharding, params), opt_shardings, None)
  jit = functools.partial(jax.jit, out_shardings=shardings, donate_argnums=(0, 1))
  sft_fn = jit(functools.partial(steps_lib.sft_step, graphdef, cfg=update_cfg, tx=tx))
  mix_fn = jit(functools.partial(mix_step, graphdef, cfg=update_cfg, tx=tx))
  return opt_state, sft_fn, mix_fn


def _train(
  rc, params, direct: list[dict], chain: list[dict], *, graphdef, update_cfg, mesh, pad_id: int
):
  """Supervised steps: to sft.loss_threshold (at most sft.steps), then sft.mix_steps on the mix.

  With chains (parity) the first stage trains on chains only, the part whose learning time
  varies from seed to seed (a plateau, then the fixed-offset attention forms), and the second
  on the base model's mix (`mix_step`): a share sft.chain_fraction of chains, direct answers
  otherwise, and a batch of held chains. Returns (params, first-stage steps, its final mean loss).
  """
  sft = rc.sft
  opt_state, sft_fn, mix_fn = _jit_steps(
    params, graphdef=graphdef, update_cfg=update_cfg, mesh=mesh, lr=sft.lr
  )
  rng = np.random.default_rng(seeds.seed_for(rc.seed, "sft_batches"))
  shape = dict(
    max_prompt_length=rc.data.max_prompt_length,
    max_response_length=rc.rl.max_response_length,
    pad_id=pad_id,
  )

  def run(steps: int, chain_share: float, desc: str, threshold: float, mix: bool):
    nonlocal params, opt_state
    bar = tqdm.trange(steps, desc=desc, dynamic_ncols=True, disable=jax.process_index() != 0)
    losses: list[float] = []
    for step in bar:
      lr = opt_state.hyperparams["learning_rate"]
      new_lr = np.float32(stage_lr(sft, step, mix=mix))
      opt_state.hyperparams["learning_rate"] = jax.device_put(new_lr, lr.sharding)
      idx = rng.choice(len(direct), size=sft.batch_size, replace=False)
      use_chain = rng.random(sft.batch_size) < chain_share  # all False without a chain
      examples = [chain[i] if c else direct[i] for i, c in zip(idx, use_chain, strict=True)]
      if mix:
        held = [chain[i] for i in rng.choice(len(chain), size=sft.batch_size, replace=False)]
        params, opt_state, m = mix_fn(params, opt_state, *_mix_batch(examples, held, **shape))
      else:
        params, opt_state, m = sft_fn(params, opt_state, _batch(examples, **shape))
      losses.append(float(m["sft/loss"]))
      mean = float(np.mean(losses[-LOSS_WINDOW:]))
      bar.set_postfix(loss=f"{mean:.3f}")
      if threshold > 0 and len(losses) >= LOSS_WINDOW and mean <= threshold:
        break
    bar.close()
    return len(losses), float(np.mean(losses[-LOSS_WINDOW:])) if losses else float("nan")

  if not chain:
    steps, loss = run(sft.steps, 0.0, "warm start (SFT)", sft.loss_threshold, mix=False)
    return params, steps, loss
  steps, loss = run(sft.steps, 1.0, "warm start (SFT, chains)", sft.loss_threshold, mix=False)
  if not sft.loss_threshold or loss <= sft.loss_threshold:
    run(sft.mix_steps, sft.chain_fraction, "warm start (SFT, mix)", 0.0, mix=True)
  return params, steps, loss


def sft_warm_start(rc, params, workdir: str, *, graphdef, update_cfg, mesh, tokenizer, pad_id: int):
  """Returns params after the supervised warm start (or the cached result in WORKDIR/sft).

  `params` (the policy's, in their shardings on `mesh`) are trained with `steps_lib.sft_step` of
  `graphdef` under `update_cfg`, on the train split tokenized by `tokenizer`.

  Raises CannotLearn when the loss ends above sft.loss_threshold (nothing is cached then).
  """
  cache = paths.join(paths.absolute(workdir), "sft")  # orbax: absolute, or gs://
  ckptr = ocp.StandardCheckpointer()
  if paths.isdir(cache):
    check_cache(cache, rc)
    logging.info("warm start: reusing %s", cache)
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      nnx.to_pure_dict(params),
    )
    restored = ckptr.restore(cache, target)
    nnx.replace_by_pure_dict(params, restored)
    return params

  direct, chain = _examples(rc, tokenizer, workdir)
  params, steps, loss = _train(
    rc, params, direct, chain, graphdef=graphdef, update_cfg=update_cfg, mesh=mesh, pad_id=pad_id
  )
  if rc.sft.loss_threshold > 0 and not loss <= rc.sft.loss_threshold:
    raise CannotLearn(
      f"the warm start ended at loss {loss:.3f} after {steps} steps, above sft.loss_threshold="
      f"{rc.sft.loss_threshold} (mean of its last {min(steps, LOSS_WINDOW)} steps): the base "
      f"model has not learnt the task, so RL would get no signal; raise sft.steps or change "
      f"sft.lr"
    )
  logging.info("warm start: loss %.4f after %d steps", loss, steps)
  ckptr.save(cache, nnx.to_pure_dict(params))
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_text(paths.join(cache, CACHE_KEY_FILE), cache_key(rc))
  return params


CACHE_KEY_FILE = "fipo_warm_start.json"  # in WORKDIR/sft: the settings that made it
# Raised when the warm start's objective changes, so that a cache trained by the old one is not
# reused. 2: held chains train their first token given a chain (mix_step).
WARM_START_VERSION = 2


def cache_key(rc) -> str:
  """JSON of what decides the warm start's params: its version, the seed and the sft, model and
  data sections (not rl.*: a sweep over RL settings shares one warm start per seed)."""
  sections = ("seed", "sft", "model", "data")
  key = {name: config_schema.as_dict(getattr(rc, name)) for name in sections}
  key["warm_start_version"] = WARM_START_VERSION
  return json.dumps(key, sort_keys=True, default=str)


def _flat(tree, prefix: str = "") -> dict:
  """{"sft": {"lr": 1}} -> {"sft.lr": 1}."""
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}


class CacheMismatch(ValueError):
  """WORKDIR/sft was made with other warm-start settings than the run's."""


def check_cache(cache: str, rc) -> None:
  """Raises CacheMismatch (one line) when the cached warm start was made with other settings than
  `rc`'s, which reusing it would silently ignore. A cache without the key file (written by an
  older version, or by hand) is reused as it is."""
  path = paths.join(cache, CACHE_KEY_FILE)
  if not paths.isfile(path):
    return
  cached, now = _flat(json.loads(paths.read_text(path))), _flat(json.loads(cache_key(rc)))
  differ = sorted(k for k in set(cached) | set(now) if cached.get(k) != now.get(k))
  if differ:
    raise CacheMismatch(
      f"{cache} holds a warm start made with other settings ({', '.join(differ[:4])}"
      f"{' ...' if len(differ) > 4 else ''} differ): remove it, or use another --workdir"
    )
