"""Synthetic tasks with a verifiable "Answer: ..." response: arithmetic, copy and parity.

A prompt "Q: 37+45=" is answered "Answer: 82" followed by EOS. The answer goes through the same
"Answer: ..." extraction and exact-match reward as DAPO-Math (fipo_jax.rl.math_dapo_score), and
the rows are written in the verl schema, so the data pipeline, tokenizer and chat template are
exactly those of real data. Difficulty: digits per operand and number of operands; operators
'+', '-' and '*' (evaluated left to right by Python precedence; answers may be negative).

'copy': "Q: copy 4831=" -> "Answer: 4831". 'parity' (configs/reasoning_cpu.py): "Q: parity
1011=" -> "Answer: 1", the parity of min_digits..max_digits bits. It has two right responses, the
direct one and one with a chain of thought, the running parity with the bit it reads: step i
writes the digit 2*b_i + p_i (p_i the parity of bits 1..i), "1011=" -> "3123 Answer: 1"
(`chain_response`). Chain digit i is predicted at digit i-1, a fixed number of tokens after bit
i, so a tiny transformer learns the chain: its bit part is a copy at a fixed offset, which a
gradient finds directly, and its parity part one XOR of that bit and the parity in the token it
reads. A chain of parities alone is an XOR of two inputs neither of which predicts it, and its
warm start sat on a plateau for a seed-dependent time (700+ steps on some seeds). A direct
answer needs all bits at once and stays at chance.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from fipo_jax import paths
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.data import verl

DATA_SOURCE = "synthetic_arith"
TRAIN_FILE = "synthetic_train.jsonl"
VAL_FILE = "synthetic_val.jsonl"


def make_problem(rng: random.Random, *, min_digits: int, max_digits: int, num_operands: int,
                 ops: str, kind: str = "arith") -> tuple[str, str]:
  """One (question, answer) pair, e.g. ("Q: 37+45=", "82") or ("Q: copy 4831=", "4831")."""
  if kind == "parity":
    bits = [rng.choice("01") for _ in range(rng.randint(min_digits, max_digits))]
    return f"Q: parity {''.join(bits)}=", str(bits.count("1") % 2)
  if kind == "copy":
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
    return f"Q: copy {digits}=", digits
  terms = []
  for _ in range(num_operands):
    digits = rng.randint(min_digits, max_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    terms.append(str(rng.randint(lo, 10**digits - 1)))
  expr = terms[0]
  for term in terms[1:]:
    expr += rng.choice(ops) + term
  # eval is safe here: the expression is built only from digits and '+-*'.
  return f"Q: {expr}=", str(eval(expr))  # noqa: S307


def make_rows(num: int, *, seed: int, min_digits: int = 1, max_digits: int = 2,
              num_operands: int = 2, ops: str = "+", kind: str = "arith",
              exclude: Sequence[str] = (),
              split: str = "train") -> list[dict[str, Any]]:
  """`num` distinct verl-schema rows whose questions are not in `exclude`.

  Raises ValueError if the problem space is too small to draw `num` distinct questions.
  """
  rng = random.Random(seed)
  seen = set(exclude)
  rows = []
  tries = 0
  while len(rows) < num:
    tries += 1
    if tries > 50 * num + 1000:
      raise ValueError(f"cannot draw {num} distinct problems with digits {min_digits}-"
                       f"{max_digits}, {num_operands} operands, ops {ops!r}; make it harder")
    question, answer = make_problem(rng, min_digits=min_digits, max_digits=max_digits,
                                    num_operands=num_operands, ops=ops, kind=kind)
    if question in seen:
      continue
    seen.add(question)
    rows.append(verl.make_row(question, answer, data_source=DATA_SOURCE, index=len(rows),
                              split=split))
  return rows


def write_dataset(out_dir: str, task_cfg: Any) -> tuple[str, str]:
  """Writes disjoint train/val jsonl files for `task_cfg` (data.synthetic); returns their paths.

  Deterministic in the config, so a resumed run reads the same files.
  """
  kw = dict(min_digits=task_cfg.min_digits, max_digits=task_cfg.max_digits,
            num_operands=task_cfg.num_operands, ops=task_cfg.ops,
            kind=getattr(task_cfg, "kind", "arith"))
  val = make_rows(task_cfg.num_val, seed=task_cfg.seed + 1, split="test", **kw)
  held_out = [r["prompt"][0]["content"] for r in val]
  train = make_rows(task_cfg.num_train, seed=task_cfg.seed, exclude=held_out, split="train", **kw)
  return (verl.write_jsonl(paths.join(out_dir, TRAIN_FILE), train),
          verl.write_jsonl(paths.join(out_dir, VAL_FILE), val))


def gold_response(answer: str) -> str:
  """The target completion of a problem (EOS not included)."""
  return f"Answer: {answer}"


def parity_bits(question: str) -> str | None:
  """'Q: parity 101=' -> '101', or None when it is not a parity question."""
  bits = question.removeprefix("Q: parity ").removesuffix("=")
  if not question.startswith("Q: parity ") or not bits or set(bits) - set("01"):
    return None
  return bits


def chain_response(question: str) -> str | None:
  """The chain-of-thought completion of a parity question (EOS not included), or None.

  'Q: parity 1011=' -> '3123 Answer: 1': digit i is 2*b_i + p_i, bit i and the running parity
  p_i after it (so p_i = digit % 2), then the answer.
  """
  bits = parity_bits(question)
  if bits is None:
    return None
  steps, p = [], 0
  for b in bits:
    p ^= int(b)
    steps.append(str(2 * int(b) + p))
  return f"{''.join(steps)} {gold_response(str(p))}"


def sft_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], *,
                 apply_chat_template: bool = True, chain: bool = False
                 ) -> list[dict[str, np.ndarray]]:
  """Supervised warm-start pairs: prompt_ids int32[P] and response_ids int32[T] (gold + EOS).

  chain: the parity chain of thought (`chain_response`) instead of the direct answer.
  """
  out = []
  for row in rows:
    prompt = tokenizer_lib.encode_prompt(tokenizer, row["prompt"], apply_chat_template)
    answer = row["reward_model"]["ground_truth"]
    text = gold_response(answer)
    if chain:
      text = chain_response(row["prompt"][-1]["content"])
      if text is None:
        raise ValueError(f"no chain of thought for {row['prompt'][-1]['content']!r}")
    response = tokenizer(text, add_special_tokens=False)["input_ids"]
    out.append({"prompt_ids": np.asarray(prompt, np.int32),
                "response_ids": np.asarray([*response, tokenizer.eos_token_id], np.int32)})
  return out
