"""DAPO-Math-17k rows in verl's schema, written by the tests (no downloaded data).

One row, as in `dapo-math-17k.parquet`:

  {"data_source": "math_dapo",
   "prompt": [{"role": "user", "content": DAPO_PREFIX + problem + DAPO_SUFFIX}],
   "ability": "MATH",
   "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
   "extra_info": {"index": "<uuid4 string>"}}

`rows(n)` cycles through PROBLEMS (integer answers, like the real set): 94-200 tokens each with
the Qwen2.5 chat template. The first `n_long` rows get about `long_words` extra words in front of
the problem, for truncation tests (400 words: ~530 tokens templated; 1000 words: ~1250).
"""

from __future__ import annotations

import json
import pathlib
import random
import uuid

# The instruction DAPO-Math-17k wraps around every problem.
DAPO_PREFIX = (
  "Solve the following math problem step by step. The last line of your response should be of "
  "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

# (problem, ground truth): hand-written, of different lengths; the answers are checked by hand.
PROBLEMS = (
  ("What is $7 \\cdot 8 - 6$?", "50"),
  ("Find the remainder when $2^{10}$ is divided by $7$.", "2"),
  ("How many positive divisors does $360$ have?", "24"),
  (
    "A rectangle has perimeter $46$ and area $120$. What is the length of its diagonal?",
    "17",
  ),
  (
    "Let $f(x) = x^2 - 5x + 6$. Find the sum of the squares of the roots of $f(x) = 0$, and then "
    "add the product of the roots.",
    "19",
  ),
  (
    "A bag contains $4$ red marbles and $6$ blue marbles. Two marbles are drawn at random without "
    "replacement. The probability that both are red can be written as $\\frac{m}{n}$ with $m$ and "
    "$n$ relatively prime positive integers. Find $m + n$.",
    "17",
  ),
  (
    "In triangle $ABC$, $AB = 13$, $BC = 14$ and $CA = 15$. Let $H$ be the foot of the altitude "
    "from $A$ to line $BC$. The area of triangle $ABC$ is $K$ and the length $AH$ is $h$. Find "
    "$K + h$. (Recall Heron's formula: the area of a triangle with sides $a$, $b$, $c$ and "
    "semi-perimeter $s$ is $\\sqrt{s(s-a)(s-b)(s-c)}$.)",
    "96",
  ),
  (
    "The sequence $a_1, a_2, a_3, \\ldots$ satisfies $a_1 = 1$, $a_2 = 1$ and "
    "$a_{n+2} = a_{n+1} + a_n$ for every $n \\ge 1$. Find the remainder when "
    "$a_1 + a_2 + \\cdots + a_{10}$ is divided by $100$.",
    "43",
  ),
)
# Filler for long prompts: a story around the problem, as long competition problems have.
_FILLER = (
  "Before the contest starts, the organisers describe the setting in great detail: the hall, "
  "the tables, the clocks on the walls and the order in which the papers are handed out. "
)


def dapo_prompt(problem: str) -> str:
  """The user message of a DAPO-Math-17k row for `problem`."""
  return DAPO_PREFIX + problem + DAPO_SUFFIX


def _long_problem(problem: str, words: int) -> str:
  reps = max(1, words // len(_FILLER.split()))
  return (_FILLER * reps) + problem


def rows(n: int = 8, *, n_long: int = 0, long_words: int = 400, seed: int = 0) -> list[dict]:
  """`n` DAPO-schema rows (the first `n_long` with ~`long_words` extra words); deterministic."""
  if not 0 <= n_long <= n:
    raise ValueError(f"n_long must be in [0, n={n}], got {n_long}")
  rng = random.Random(seed)
  out = []
  for i in range(n):
    problem, answer = PROBLEMS[i % len(PROBLEMS)]
    if i < n_long:
      problem = _long_problem(problem, long_words)
    out.append(
      {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": dapo_prompt(problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": str(uuid.UUID(int=rng.getrandbits(128), version=4))},
      }
    )
  return out


def write_parquet(path, row_list: list[dict]) -> pathlib.Path:
  """Writes rows as a parquet file with the column order of dapo-math-17k.parquet."""
  import pyarrow as pa  # noqa: PLC0415 (heavy; only for tests that write parquet)
  import pyarrow.parquet as pq  # noqa: PLC0415

  path = pathlib.Path(path)
  pq.write_table(pa.Table.from_pylist(row_list), path)
  return path


def write_jsonl(path, row_list: list[dict]) -> pathlib.Path:
  """Writes rows as JSON lines (the form `eval` and `generate` read)."""
  path = pathlib.Path(path)
  path.write_text("".join(json.dumps(r) + "\n" for r in row_list))
  return path
