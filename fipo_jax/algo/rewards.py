"""Verifier scores and DAPO's soft overlong penalty: pure python and numpy, one response at a time.

`math_dapo_score` reproduces the official Minerva-style check exactly (golden
`math_dapo_reward_cases.jsonl`), but in time linear in the input: the official normaliser's
`re.sub(r"(.*?)(\\$)(.*?)(\\$)(.*)", ...)` and the `\\text{...}` / `\\boxed{...}` patterns
retry from every position of a line without a closing delimiter, which is quadratic in the
line's length. The same substitutions are done here by direct scans that give identical output
(property-tested against the regex form). Anything that is not a string, and any unexpected
failure, is scored as a wrong answer instead of raising.

Bounding a verifier call in time and size, the isolated `math_verify` child process and scoring
a batch of rollouts are the training system's (`fipo_jax.rl.rewards`).
"""

import re

import numpy as np

# The reward functions (rl.reward_fn), each with the score of a wrong answer, which any verifier
# failure also gets: math_dapo is the official +1/-1, math_verify verl's 1/0.
WRONG_SCORES = {"math_dapo": -1.0, "math_verify": 0.0}

_WINDOW = 300  # only the last 300 characters of a response are looked at (official)
_INVALID = "[INVALID]"
_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# Minerva normalisation tables (verl math_dapo / lm-eval hendrycks_math), applied in order.
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
_REMOVED_EXPRESSIONS = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
_FRAC_RE = re.compile(r"(frac)([^{])(.)")  # literal prefix, fixed width: linear
_SQRT_RE = re.compile(r"(sqrt)([^{])")


def _first_dollar_pair(s: str) -> str:
  """`re.sub(r"(.*?)(\\$)(.*?)(\\$)(.*)", "$\\3$", s)`: `.` stops at newlines, so each line
  holding two or more `$` becomes `$<text between its first two $>$`; other lines stay."""
  if s.count("$") < 2:
    return s
  lines = s.split("\n")
  for n, line in enumerate(lines):
    i = line.find("$")
    j = line.find("$", i + 1) if i >= 0 else -1
    if j >= 0:
      lines[n] = "$" + line[i + 1 : j] + "$"
  return "\n".join(lines)


def _unwrap(s: str, prefix: str, *, greedy: bool = False) -> str:
  """`re.sub(prefix + r"(.*?)(\\})", "\\2", s)` (greedy: `(.*)`) with `prefix` a literal like
  `\\text{`: the text up to the first (greedy: the last) `}` on the same line replaces the
  wrapper; without one, no match. Each wrapper looks no further than its own line: linear time."""
  out, i = [], 0
  while (p := s.find(prefix, i)) >= 0:
    start = p + len(prefix)
    end = s.find("\n", start)
    end = len(s) if end < 0 else end
    q = s.rfind("}", start, end) if greedy else s.find("}", start, end)
    if q < 0:  # no `}` on this line: nothing on it can match
      out.append(s[i:end])
      i = end
      continue
    out.append(s[i:p])
    out.append(s[start:q])
    i = q + 1
  out.append(s[i:])
  return "".join(out)


def normalize_final_answer(answer: str) -> str:
  """Minerva normalisation of an answer string, exactly as the official code, linear time."""
  answer = answer.split("=")[-1]
  for before, after in _SUBSTITUTIONS:
    answer = answer.replace(before, after)
  for expr in _REMOVED_EXPRESSIONS:
    answer = answer.replace(expr, "")
  answer = _first_dollar_pair(answer)
  answer = _unwrap(answer, "\\text{")
  answer = _unwrap(answer, "\\textbf{")
  answer = _unwrap(answer, "\\overline{")
  answer = _unwrap(answer, "\\boxed{", greedy=True)
  answer = _FRAC_RE.sub("frac{\\2}{\\3}", answer)
  answer = _SQRT_RE.sub("sqrt{\\2}", answer)
  answer = answer.replace("$", "")
  if answer.replace(",", "").isdigit():
    answer = answer.replace(",", "")
  return answer.strip()


def extract_answer(response: str) -> str:
  """The rest of the line after the last `Answer:` in the last 300 characters, or [INVALID]."""
  matches = _ANSWER_RE.findall(response[-_WINDOW:])
  return matches[-1] if matches else _INVALID


def math_dapo_score(response, ground_truth) -> dict:
  """verl `math_dapo.compute_score(response, ground_truth)` with the default (Minerva) check.

  Args:
    response: the decoded solution text.
    ground_truth: the reference answer string.

  Returns:
    {'score': 1.0 or -1.0, 'acc': bool, 'pred': normalised prediction}. Non-string inputs and
    internal failures give {'score': -1.0, 'acc': False, 'pred': '[INVALID]'}.
  """
  if not isinstance(response, str) or not isinstance(ground_truth, str):
    return {"score": -1.0, "acc": False, "pred": _INVALID}
  try:
    pred = normalize_final_answer(extract_answer(response))
    correct = pred == normalize_final_answer(ground_truth)
  except Exception:  # noqa: BLE001 - a reward must never take the trainer down
    return {"score": -1.0, "acc": False, "pred": _INVALID}
  return {"score": 1.0 if correct else -1.0, "acc": bool(correct), "pred": pred}


def overlong_penalty(
  response_length, max_response_length, overlong_buffer_len, penalty_factor
) -> float:
  """DAPO soft overlong penalty: min(-(length - expected) / buffer * factor, 0) in float32.

  `expected = max_response_length - overlong_buffer_len`. The official code computes the ratio
  as a float32 tensor, so this rounds like it (e.g. -1/3000 * 0.1 = -3.3333334e-05); the
  result is 0 up to `expected` tokens and -factor at `max_response_length`.
  """
  if overlong_buffer_len <= 0:
    raise ValueError(f"overlong_buffer_len must be positive, got {overlong_buffer_len}")
  exceed = response_length - (max_response_length - overlong_buffer_len)
  ratio = np.float32(-exceed) / np.float32(overlong_buffer_len)
  penalty = ratio * np.float32(penalty_factor)
  return float(penalty) if penalty <= 0 else 0.0
