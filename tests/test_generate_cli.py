"""python -m fipo_jax.generate on a tiny local model + character tokenizer (no network)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fipo_jax import generate, models
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.sampling import driver
from fipo_jax.sampling import engine as engine_lib

_PROMPTS = ["What is 2+3?", "Name a prime.", "hi"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  """(dir with tokenizer, dir without) holding the same tiny random qwen2 model."""
  root = tmp_path_factory.mktemp("cli")
  tok_dir = tokenizer_lib.build_tokenizer(str(root / "tok"))
  cfg = models.ModelConfig(
    vocab_size=tokenizer_lib.vocab_size(tok_dir), hidden_size=32, intermediate_size=64,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
  )  # fmt: skip
  model = models.init_model(cfg, seed=0)
  with_tok, bare = root / "with_tok", root / "bare"
  models.save_pretrained(model, with_tok, tokenizer_dir=tok_dir)
  models.save_pretrained(model, bare)
  return with_tok, bare


def _read(path):
  return [json.loads(line) for line in open(path)]


def test_cli_text_prompts_with_chat_template_greedy(model_dirs, tmp_path):
  hf_dir, _ = model_dirs
  prompts_file = tmp_path / "in.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _PROMPTS))
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, "-m", "fipo_jax.generate", "--hf_dir", str(hf_dir), "--prompts_file",
         str(prompts_file), "--output", str(out), "--n", "2", "--max_new_tokens", "8",
         "--temperature", "0", "--chat"]  # fmt: skip
  proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tok/s" in proc.stderr
  rows = _read(out)
  assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
    (p, s) for p in range(3) for s in range(2)]  # fmt: skip
  # The same model in-process, same chat-templated prompts, greedy: identical tokens.
  tok = tokenizer_lib.load_tokenizer(str(hf_dir))
  ids = [tokenizer_lib.encode_prompt(tok, [{"role": "user", "content": p}], True) for p in _PROMPTS]
  assert ids[0][0] == tok.convert_tokens_to_ids(tokenizer_lib.IM_START)
  engine, params = engine_lib.Engine.from_model(
    models.from_pretrained(hf_dir),
    engine_lib.EngineConfig(num_slots=6, max_prompt_len=max(map(len, ids)), max_new_tokens=8),
  )
  want = driver.generate_samples(engine, params, ids, n=2, max_new_tokens=8,
                                 eos_ids=tokenizer_lib.eos_token_ids(tok))  # fmt: skip
  for r, w in zip(rows, want, strict=True):
    assert r["response_ids"] == w.response_ids.tolist()
    np.testing.assert_allclose(r["response_logprobs"], w.response_logprobs, atol=1e-6)
    assert r["finish_reason"] == w.finish_reason and r["length"] == w.length
    assert r["response"] == tok.decode(r["response_ids"], skip_special_tokens=True)


def test_cli_prompt_ids_sampling_without_tokenizer(model_dirs, tmp_path, capsys):
  _, bare = model_dirs
  prompts_file = tmp_path / "in.jsonl"
  prompts_file.write_text('{"prompt_ids": [5, 6, 7]}\n{"prompt_ids": [9]}\n')
  outs = []
  for name in ("a", "b"):
    out = tmp_path / f"{name}.jsonl"
    generate.main(["--hf_dir", str(bare), "--prompts_file", str(prompts_file), "--output",
                   str(out), "--n", "3", "--max_new_tokens", "5", "--temperature", "0.8",
                   "--top_p", "0.9", "--top_k", "20", "--seed", "4", "--no_progress"])  # fmt: skip
    outs.append(_read(out))
  assert outs[0] == outs[1]  # same seed, same samples
  rows = outs[0]
  assert len(rows) == 6 and all("response" not in r for r in rows)
  for r in rows:
    assert r["length"] == len(r["response_ids"]) == len(r["response_logprobs"]) == 5
    assert r["finish_reason"] == "length" and all(lp <= 0 for lp in r["response_logprobs"])
  assert len({tuple(r["response_ids"]) for r in rows}) > 1


def test_cli_errors_are_clear(model_dirs, tmp_path):
  _, bare = model_dirs
  ids_file = tmp_path / "ids.jsonl"
  ids_file.write_text('{"prompt_ids": [1, 2]}\n')
  text_file = tmp_path / "text.jsonl"
  text_file.write_text('{"prompt": "hello"}\n')
  out = str(tmp_path / "o.jsonl")
  with pytest.raises(SystemExit, match="checkpoint"):
    generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts_file", str(ids_file),
                   "--output", out])  # fmt: skip
  with pytest.raises(SystemExit, match="no tokenizer"):
    generate.main(["--hf_dir", str(bare), "--prompts_file", str(text_file), "--output", out])
  with pytest.raises(SystemExit, match="config.json"):
    generate.main(["--hf_dir", str(tmp_path), "--prompts_file", str(ids_file), "--output", out])
