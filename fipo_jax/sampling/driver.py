"""The offline rollout driver: prompts x n samples through an Engine, continuously batched.

Scheduling knobs of `run` (the defaults are the fast path; `REFERENCE` is today's engine path):
  share_prefill (True): one prefill per prompt. A fill prefills the distinct waiting prompts
    once, with all n of their requests: each request's first token comes from that one prefill
    (with the request's own key), and the Prefix stays on the host until every one of its
    requests is inserted, so a prompt whose samples spread over several fills is still prefilled
    once. False: one prefill row per request (the prompt repeated n times).
  refill_fraction (1/8): with requests waiting, `generate` returns once
    min_free = ceil(refill_fraction * num_slots) slots finished (at most the number of requests
    still waiting), and the host refills them in one prefill + insert. 0: after every finish.
  overlap (True): host and device overlap. After dispatching call i the host decodes call i-1's
    tokens (already computed) while call i runs, then blocks on call i's `active` flags only:
    they say which slots to release and refill before call i+1 is dispatched. A slot is refilled
    only after the host saw it finish, and a call's tokens are attributed through the slot ->
    request map of the moment it was dispatched (a slot may hold a new request by the time its
    tokens are read). False: each call's whole result is read before anything else happens.
  mode: 'continuous' (refill freed slots as above) or 'static' (fill every slot, run them all to
    completion, then take the next batch; the benchmark's baseline).

Every request's PRNG key is derived from (seed, prompt_index, sample_index), so the same seed
gives the same samples whatever the slot count, batching mode or knobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fipo_jax.sampling import batching
from fipo_jax.sampling import params as params_lib

MODES = ("continuous", "static")
# Today's engine path (with EngineConfig(kv_layout='dense')): a prefill row per request, back to
# the host after every finish, no overlap. The benchmark's reference mode.
REFERENCE = {"share_prefill": False, "refill_fraction": 0.0, "overlap": False}
_GREEDY = params_lib.Greedy()


def generate_samples(engine, params, prompts: Sequence[Sequence[int]], **kwargs
                     ) -> list[batching.Sample]:
  """Samples n responses per prompt; see `run` for the arguments. Sorted by (prompt, sample)."""
  return run(engine, params, prompts, **kwargs).samples


def run(
  engine,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  n: int = 1,
  max_new_tokens: int | Sequence[int],
  sampling: params_lib.SamplingMethod = _GREEDY,
  eos_ids: Sequence[int] = (),
  stop_ids: Sequence[int] = (),
  seed: int = 0,
  mode: str = "continuous",
  share_prefill: bool = True,
  refill_fraction: float = 0.125,
  overlap: bool = True,
  progress: bool = False,
) -> batching.Result:
  """Runs all prompts x n samples through `engine` with `params`.

  Args:
    engine: an `engine.Engine` (or anything with its prefill/insert/can_insert/release/generate).
    params: the model params state; pass the newest after each optimizer step.
    prompts: token-id lists, each 1..engine max_prompt_len long.
    n: samples per prompt.
    max_new_tokens: response budget: one int, one per prompt, or one per request
      ([num_prompts][n], e.g. the benchmark's long-tailed lengths).
    sampling: `Greedy()` or `Sampling(temperature, top_p, top_k)`.
    eos_ids, stop_ids: tokens that end a response (kept in it, finish_reason 'stop').
    seed: makes runs reproducible; request keys derive from (seed, prompt, sample).
    mode, share_prefill, refill_fraction, overlap: scheduling (module docstring).
    progress: show a tqdm bar with tokens/s.

  Returns:
    Result(samples sorted by (prompt_index, sample_index), stats).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if n <= 0:
    raise ValueError(f"n must be positive, got {n}")
  if not 0.0 <= refill_fraction <= 1.0:
    raise ValueError(f"refill_fraction must be in [0, 1], got {refill_fraction}")
  loop = batching.Loop(engine, [np.asarray(p, np.int32) for p in prompts], n=n,
               budgets=_budgets(max_new_tokens, len(prompts), n),
               stops=frozenset(int(i) for i in (*eos_ids, *stop_ids)), mode=mode,
               share_prefill=share_prefill, refill_fraction=refill_fraction, overlap=overlap,
               progress=progress)  # fmt: skip
  return loop.run(params, seed=seed, sampling=sampling)


def _budgets(max_new_tokens, num_prompts: int, n: int) -> list[list[int]]:
  """Per-request budgets [num_prompts][n] from one int, one per prompt, or one per request."""
  if isinstance(max_new_tokens, int | np.integer):
    max_new_tokens = [int(max_new_tokens)] * num_prompts
  if len(max_new_tokens) != num_prompts:
    raise ValueError(f"{len(max_new_tokens)} max_new_tokens for {num_prompts} prompts")
  budgets = [[int(b)] * n if np.ndim(b) == 0 else [int(x) for x in b] for b in max_new_tokens]
  if any(len(b) != n for b in budgets):
    raise ValueError(f"max_new_tokens per request must give n={n} budgets per prompt")
  if budgets and min(min(b) for b in budgets) <= 0:
    raise ValueError("max_new_tokens must be positive")
  return budgets
