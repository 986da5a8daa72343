"""Tokenizers: load an HF tokenizer directory, or build the tiny character-level one locally.

The synthetic task runs through exactly the path real data takes: a `PreTrainedTokenizerFast`
directory with a Qwen-style jinja chat template, loaded with `transformers.AutoTokenizer`, and
prompts encoded by `encode_prompt` (chat template with `add_generation_prompt=True`, or the plain
message content).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from typing import Any

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn; the EOS of generation
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
# Characters of the synthetic task and of ordinary English/maths prompts; anything else -> <unk>.
ALPHABET = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
UNK = "<unk>"

# Qwen2.5's template without the system-prompt and tool branches.
CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable-character table (the alphabet of byte-level BPE vocabularies)."""
  kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table = {b: chr(b) for b in kept}
  shifted = (b for b in range(256) if b not in table)
  table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
  return table


def build_tokenizer(out_dir: str) -> str:
  """Writes the character-level tokenizer to `out_dir` and returns the path.

  Vocabulary: ids 0-2 the specials (<|endoftext|> = pad, <|im_start|>, <|im_end|> = eos),
  3 <unk>, then one id per character of ALPHABET (97 printable ASCII characters): 101 in all.
  It is a byte-level BPE with no merges, i.e. exactly the pipeline transformers' Qwen2Tokenizer
  builds from a vocabulary, so every loader agrees on the ids: AutoTokenizer on this directory,
  and on an exported qwen2 directory (where transformers forces Qwen2Tokenizer whatever
  tokenizer_config.json says). Characters outside ALPHABET are dropped, as Qwen2Tokenizer does
  (<unk> keeps its id but is never produced). Deterministic: the same call writes the same files.
  """
  import tokenizers  # noqa: PLC0415 (only needed when building)
  import transformers  # noqa: PLC0415

  byte_chars = _byte_chars()
  chars = [byte_chars[ord(c)] for c in ALPHABET]  # ' ' -> 'Ġ', '\n' -> 'Ċ', ...
  vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, UNK, *chars))}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [], unk_token=None))
  tok.normalizer = tokenizers.normalizers.NFC()
  # Every character is its own word (no merges make it one token); specials match first.
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
    tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated"),
    tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=IM_END,
    chat_template=CHAT_TEMPLATE, model_max_length=1 << 20, clean_up_tokenization_spaces=False)
  fast.padding_side = "left"
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  _set_tokenizer_class(out_dir, "Qwen2Tokenizer")
  return out_dir


def _set_tokenizer_class(path: str, name: str) -> None:
  """Names the class AutoTokenizer loads: the same one with or without a qwen2 config.json."""
  cfg_path = os.path.join(path, "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["tokenizer_class"] = name
  with open(cfg_path, "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")


def load_tokenizer(path: str) -> Any:
  """`transformers.AutoTokenizer.from_pretrained(path)` with a clear error if it is missing.

  The character-level tokenizer as `build_tokenizer` writes it is loaded as the Qwen2Tokenizer
  that AutoTokenizer picks for it (its tokenizer_class), without AutoTokenizer: its config
  machinery imports torch wherever torch is installed (about 2 CPU-s at each start of a tiny
  run; the same tokenizer: tests/test_data.py)."""
  import transformers  # noqa: PLC0415 (slow import, only when a tokenizer is needed)

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory not found: {path}")
  loader = transformers.Qwen2Tokenizer if _is_built_character_tokenizer(path) \
    else transformers.AutoTokenizer
  try:
    tok = loader.from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
    raise OSError(f"could not load a tokenizer from {path}: {e}") from e
  if tok.pad_token_id is None:  # base-model tokenizers may lack one; pad is never attended
    tok.pad_token = tok.eos_token
  return tok


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]],
                  apply_chat_template: bool) -> list[int]:
  """Chat messages -> token ids [P], with the generation prompt appended when templated."""
  if apply_chat_template:
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                         tokenize=False)
  else:
    text = "".join(m["content"] for m in messages)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(tokenizer: Any) -> list[int]:
  """Ids that end a response: the tokenizer's EOS plus <|im_end|>/<|endoftext|> if present."""
  ids = {tokenizer.eos_token_id}
  for tok in (IM_END, PAD):
    tid = tokenizer.convert_tokens_to_ids(tok)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id:
      ids.add(tid)
  return sorted(i for i in ids if i is not None)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
  """bos/eos/pad ids for an HF config.json. Without a BOS token, bos is <|endoftext|> (as in
  Qwen2.5's own config.json); eos is the tokenizer's single EOS (eos_token_ids lists them all)."""
  bos = tokenizer.bos_token_id
  if bos is None:
    tid = tokenizer.convert_tokens_to_ids(PAD)
    bos = tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None
  return {"bos_token_id": bos, "eos_token_id": tokenizer.eos_token_id,
          "pad_token_id": tokenizer.pad_token_id}


def is_character_tokenizer(path: str) -> bool:
  """True if `path` holds a tokenizer with this module's vocabulary (of any fipo_jax version)."""
  try:
    with open(os.path.join(path, "tokenizer.json")) as f:
      vocab = json.load(f)["model"].get("vocab")
  except (OSError, ValueError, KeyError, AttributeError):
    return False
  return isinstance(vocab, dict) and len(vocab) == len(SPECIAL_TOKENS) + 1 + len(ALPHABET) \
    and UNK in vocab


def _is_built_character_tokenizer(path: str) -> bool:
  """A character tokenizer that names Qwen2Tokenizer as its class (as `build_tokenizer`
  writes it; not one from before it was byte-level), checked without parsing a large
  vocabulary file (a real one: megabytes)."""
  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file) or os.path.getsize(file) >= (1 << 16):
    return False
  try:
    with open(os.path.join(path, "tokenizer_config.json")) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return False
  return cfg.get("tokenizer_class") == "Qwen2Tokenizer" and "auto_map" not in cfg and \
    is_character_tokenizer(path)


def vocab_size(path: str) -> int:
  """Vocabulary size of a tokenizer directory written by `build_tokenizer` (no transformers)."""
  with open(os.path.join(path, "tokenizer.json")) as f:
    spec = json.load(f)
  ids = set(spec["model"]["vocab"].values()) | {t["id"] for t in spec["added_tokens"]}
  return max(ids) + 1
