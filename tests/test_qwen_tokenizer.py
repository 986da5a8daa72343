"""The Qwen2.5 tokenizer fixture against llama.cpp's reference encodings and the chat template.

tests/testdata/qwen2_5_tokenizer/ggml-vocab-qwen2.gguf.{inp,out} are llama.cpp's
`test-tokenizer-0` vectors: the .inp texts are separated by the line `__ggml_vocab_test__`, and
line i of .out holds the ids of text i (space-separated; an empty line for the empty text).
"""

import json

import dapo_rows
import pytest
import tokenizers
import transformers
from conftest import QWEN_ENDOFTEXT, QWEN_IM_END, QWEN_IM_START, QWEN_TOKENIZER

from fipo_jax.data import tokenizer as tok_lib

_SEP = "\n__ggml_vocab_test__\n"
# Ids of the role names and the newline in the Qwen2.5 vocabulary.
_SYSTEM, _USER, _ASSISTANT, _NL = 8948, 872, 77091, 198
_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _vectors() -> list[tuple[str, list[int]]]:
  """(text, expected ids) for every llama.cpp vector."""
  texts = (QWEN_TOKENIZER / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split(_SEP)
  assert texts[-1] == "", "the .inp file ends with a separator"
  lines = (QWEN_TOKENIZER / "ggml-vocab-qwen2.gguf.out").read_text().split("\n")
  assert lines[-1] == "", "the .out file ends with a newline"
  texts, lines = texts[:-1], lines[:-1]
  assert len(texts) == len(lines) == 46
  return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


@pytest.fixture(scope="module")
def hf_tok(qwen_tokenizer_dir):
  return tok_lib.load_tokenizer(str(qwen_tokenizer_dir))


def test_vectors_parse():
  vectors = _vectors()
  assert ("", []) in vectors  # the empty text encodes to nothing
  assert ("Hello world", [9707, 1879]) in vectors


def test_llama_cpp_vectors_tokenizers(qwen_tokenizer_dir):
  raw = tokenizers.Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
  for text, ids in _vectors():
    assert raw.encode(text, add_special_tokens=False).ids == ids, repr(text)


def test_llama_cpp_vectors_auto_tokenizer(hf_tok):
  assert isinstance(hf_tok, transformers.PreTrainedTokenizerBase)
  for text, ids in _vectors():
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
    assert hf_tok(text)["input_ids"] == ids, f"Qwen2.5 adds no BOS/EOS: {text!r}"
    assert hf_tok.decode(ids) == text, repr(text)


def test_special_tokens(hf_tok):
  config = json.loads((QWEN_TOKENIZER / "tokenizer_config.json").read_text())
  assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
  assert hf_tok.eos_token_id == hf_tok.pad_token_id == QWEN_ENDOFTEXT
  assert hf_tok.bos_token_id is None
  assert hf_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [QWEN_IM_START,
                                                                         QWEN_IM_END]
  assert len(hf_tok) == 151665  # 151643 BPE tokens + 22 added
  assert tok_lib.eos_token_ids(hf_tok) == [QWEN_ENDOFTEXT, QWEN_IM_END]
  # Specials inside text are single ids, not split into characters.
  assert hf_tok("a<|im_end|>b", add_special_tokens=False)["input_ids"] == [64, QWEN_IM_END, 65]


def _expected_prompt_ids(hf_tok, system: str, user: str) -> list[int]:
  """The Qwen2.5 chat layout, assembled from ids: each turn is
  <|im_start|> role \\n content <|im_end|> \\n, then <|im_start|> assistant \\n."""

  def enc(s):
    return hf_tok(s, add_special_tokens=False)["input_ids"]

  return ([QWEN_IM_START, _SYSTEM, _NL, *enc(system), QWEN_IM_END, _NL,
           QWEN_IM_START, _USER, _NL, *enc(user), QWEN_IM_END, _NL,
           QWEN_IM_START, _ASSISTANT, _NL])


def test_chat_template_dapo_prompt(hf_tok):
  row = dapo_rows.rows(4)[3]
  messages = row["prompt"]
  text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert text == (f"<|im_start|>system\n{_DEFAULT_SYSTEM}<|im_end|>\n"
                  f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n"
                  "<|im_start|>assistant\n")
  ids = tok_lib.encode_prompt(hf_tok, messages, apply_chat_template=True)
  assert ids == _expected_prompt_ids(hf_tok, _DEFAULT_SYSTEM, messages[0]["content"])
  assert ids.count(QWEN_IM_START) == 3 and ids.count(QWEN_IM_END) == 2
  assert QWEN_ENDOFTEXT not in ids
  assert hf_tok.decode(ids) == text
  # DAPO prompts are ~90-140 tokens with the template (the rows span that range).
  assert 80 <= len(ids) <= 200, len(ids)


def test_chat_template_system_message(hf_tok):
  messages = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": dapo_rows.dapo_prompt("What is $1+1$?")}]
  ids = tok_lib.encode_prompt(hf_tok, messages, apply_chat_template=True)
  assert ids == _expected_prompt_ids(hf_tok, "Be brief.", messages[1]["content"])
  assert _DEFAULT_SYSTEM not in hf_tok.decode(ids)


def test_dapo_rows_schema(dapo_parquet):
  import pyarrow.parquet as pq

  table = pq.read_table(dapo_parquet(n=10, n_long=2, long_words=300))
  assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
  got = table.to_pylist()
  assert got == dapo_rows.rows(10, n_long=2, long_words=300)
  assert len({r["extra_info"]["index"] for r in got}) == 10
  for r in got:
    assert r["data_source"] == "math_dapo" and r["ability"] == "MATH"
    assert r["reward_model"]["style"] == "rule-lighteval/MATH_v2"
    assert r["reward_model"]["ground_truth"].isdigit()
    content = r["prompt"][0]["content"]
    assert content.startswith(dapo_rows.DAPO_PREFIX) and content.endswith(dapo_rows.DAPO_SUFFIX)
  lengths = [len(r["prompt"][0]["content"].split()) for r in got]
  assert min(lengths[:2]) > 300 > max(lengths[2:])


def test_qwen_model_dir_loads_in_both(qwen_model_dir, hf_tok):
  """The fixture model: Qwen2.5's shape in our loader, same logits as transformers."""
  import jax.numpy as jnp
  import numpy as np
  import torch

  from fipo_jax import models

  model = models.from_pretrained(qwen_model_dir)
  cfg = model.cfg
  assert (cfg.model_type, cfg.vocab_size, cfg.tie_word_embeddings) == ("qwen2", 151936, True)
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 8)
  config = json.loads((qwen_model_dir / "config.json").read_text())
  assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == 151643
  ids = tok_lib.encode_prompt(hf_tok, dapo_rows.rows(1)[0]["prompt"], apply_chat_template=True)
  ours = np.asarray(model(jnp.asarray([ids], jnp.int32)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(qwen_model_dir, dtype=torch.float32)
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits.numpy()
  assert np.std(ref) > 0.01  # not all-zero weights
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
