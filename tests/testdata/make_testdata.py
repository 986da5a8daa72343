"""Regenerates the small verl-schema data files and the tiny tokenizer in this directory.

  cd tests/testdata && python make_testdata.py

verl_math.parquet: 10 good rows shaped like DAPO-Math-17k plus 4 malformed ones that a parquet
column can hold (null ground truth, empty prompt list, blank content, null data_source).
verl_aime.jsonl: 6 good rows shaped like AIME-2024 (one with an integer ground truth) plus 8
malformed lines (bad JSON, non-UTF-8 bytes, a string prompt, no reward_model, a lone surrogate,
a non-object extra_info, a list instead of an object, a message without content).
The good/bad row indices are listed in EXPECTED below and asserted by tests/test_data.py.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from fipo_jax.data import tokenizer, verl  # noqa: E402

DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response "
                 "should be of the form Answer: $Answer (without quotes) where $Answer is the "
                 "answer to the problem.\n\n{q}\n\nRemember to put your answer on its own line "
                 "after \"Answer:\".")

MATH = [("What is $3 + 4 \\cdot 5$?", "23"), ("Compute $\\binom{6}{2}$.", "15"),
        ("Find the remainder when $2^{10}$ is divided by 7.", "2"),
        ("How many positive divisors does 36 have?", "9"), ("Solve $2x + 3 = 11$ for $x$.", "4"),
        ("What is the sum of the interior angles of a hexagon, in degrees?", "720"),
        ("Evaluate $\\sqrt{144} + \\sqrt{25}$.", "17"), ("What is $7!/5!$?", "42"),
        ("Find the least common multiple of 12 and 18.", "36"),
        ("If $f(x) = x^2 - 1$, what is $f(5)$?", "24")]
AIME = [("Find the number of ordered pairs $(m,n)$ of positive integers with $mn = 100$.", "9"),
        ("Let $x$ satisfy $\\log_2 x = 5$. Find $x$.", "32"),
        ("Find the largest prime factor of 1001.", "13"),
        ("How many integers between 1 and 1000 are divisible by 7?", "142"),
        ("Find the remainder when $3^{100}$ is divided by 1000.", "1"),
        ("What is the sum of the digits of $2^{15}$?", "26")]
EXPECTED = {
  "verl_math.parquet": {"num_rows": 14, "bad": [3, 7, 10, 13]},
  "verl_aime.jsonl": {"num_rows": 14, "bad": [1, 2, 4, 5, 7, 9, 11, 13]},
}


def math_rows():
  rows = [verl.make_row(DAPO_TEMPLATE.format(q=q), a, data_source="math_dapo", index=i,
                        split="train") for i, (q, a) in enumerate(MATH)]
  bad = [dict(rows[0], reward_model={"ground_truth": None, "style": "rule-lang"}),
         dict(rows[1], prompt=[]),
         dict(rows[2], prompt=[{"role": "user", "content": "   "}]),
         dict(rows[3], data_source=None)]
  for pos, row in zip(EXPECTED["verl_math.parquet"]["bad"], bad, strict=True):
    rows.insert(pos, row)
  return rows


def aime_lines():
  good = [json.dumps(verl.make_row(q, a, data_source="aime24", index=i, split="test"))
          for i, (q, a) in enumerate(AIME)]
  good[3] = good[3].replace('"ground_truth": "142"', '"ground_truth": 142')
  ok = json.loads(good[0])
  bad = [b'{"prompt": [{"role": "user", "content": "unterminated',
         b'{"data_source": "aime24", "prompt": [{"role": "user", "content": "caf\xe9 \xff"}], '
         b'"reward_model": {"ground_truth": "1"}}',
         json.dumps(dict(ok, prompt="Find x.")).encode(),
         json.dumps({k: v for k, v in ok.items() if k != "reward_model"}).encode(),
         json.dumps(ok).replace("Find the number", "\\udc80 Find").encode(),
         json.dumps(dict(ok, extra_info="index 3")).encode(),
         b'[1, 2, 3]',
         json.dumps(dict(ok, prompt=[{"role": "user"}])).encode()]
  lines = [g.encode() for g in good]
  for pos, line in zip(EXPECTED["verl_aime.jsonl"]["bad"], bad, strict=True):
    lines.insert(pos, line)
  return lines


def main():
  verl.write_parquet(os.path.join(HERE, "verl_math.parquet"), math_rows())
  with open(os.path.join(HERE, "verl_aime.jsonl"), "wb") as f:
    f.write(b"\n".join(aime_lines()) + b"\n")
  with open(os.path.join(HERE, "verl_expected.json"), "w") as f:
    json.dump(EXPECTED, f, indent=1)
  tokenizer.build_tokenizer(os.path.join(HERE, "tiny_tokenizer"))


if __name__ == "__main__":
  main()
