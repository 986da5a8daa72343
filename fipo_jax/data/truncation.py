"""Prompt truncation inside the last user message, never through the chat template.

Cutting rendered ids (verl's 'left') loses the system prompt and `<|im_start|>user` of a long
prompt; cutting on the right loses the generation prompt `<|im_start|>assistant\\n`. Here the text
of the LAST USER MESSAGE is shortened instead, and the prompt is rendered again, so the template's
head and the generation prompt always survive.

The message keeps its TAIL (the cut is on its left, as the name 'left' says): a problem states
its question at its end, and DAPO's instruction ends with the answer-format reminder
("Remember to put your answer on its own line after "Answer:""), which the verifier depends on.
The head of a long DAPO prompt is its generic "Solve the following math problem" line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fipo_jax.data import tokenizer as tokenizer_lib

_MAX_TRIES = 16  # re-renders before giving up on a tight fit (one or two suffice in practice)


def last_user_message(messages: Sequence[dict[str, str]]) -> int:
  """Index of the last message with role 'user' (the last message if none has it)."""
  users = [i for i, m in enumerate(messages) if m["role"] == "user"]
  return users[-1] if users else len(messages) - 1


def _token_starts(tokenizer: Any, text: str) -> list[int]:
  """Character offset where each token of `text` (tokenized alone) starts; one per character
  for a tokenizer without offsets (slow tokenizers)."""
  if getattr(tokenizer, "is_fast", False):
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [start for start, _ in offsets["offset_mapping"]]
  return list(range(len(text)))


def truncate_left(tokenizer: Any, messages: Sequence[dict[str, str]], *, max_length: int,
                  apply_chat_template: bool) -> tuple[list[int], int] | None:
  """Prompt ids [<= max_length] with the last user message cut on its left, and the number of
  characters of that message kept; None if the prompt does not fit even with it empty.

  The first cut drops as many of the message's tokens as the empty-message prompt leaves no room
  for; each further try drops the excess measured on the re-rendered prompt (BPE merges at the
  cut can differ by a token or two).
  """
  k = last_user_message(messages)
  text = messages[k]["content"]

  def encode(start: int) -> list[int]:
    msgs = [dict(m) for m in messages]
    msgs[k]["content"] = text[start:]
    return tokenizer_lib.encode_prompt(tokenizer, msgs, apply_chat_template)

  empty = encode(len(text))
  if len(empty) > max_length:
    return None
  starts = _token_starts(tokenizer, text) + [len(text)]
  j = max(0, len(starts) - 1 - (max_length - len(empty)))  # keep the budget's worth of tokens
  for _ in range(_MAX_TRIES):
    ids = encode(starts[j])
    excess = len(ids) - max_length
    if excess <= 0:
      return ids, len(text) - starts[j]
    j = min(len(starts) - 1, j + excess)
  return empty, 0
