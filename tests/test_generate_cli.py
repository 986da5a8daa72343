"""python -m fipo_jax.generate on a tiny local model + character tokenizer (no network)."""

import json
import os

import numpy as np
import pytest

from fipo_jax import generate, models
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.data import verl
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


@pytest.fixture(scope="module")
def warm(warm_server):
  """The CLI runs fork from one process that has imported what they import (this process's
  environment): each skips ~10 CPU-s of imports (tests/warm_python.py)."""
  return warm_server.with_env(os.environ)


def _read(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_cli_text_prompts_with_chat_template_by_default_greedy(model_dirs, tmp_path, warm):
  hf_dir, _ = model_dirs
  prompts_file = tmp_path / "in.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _PROMPTS))
  out = tmp_path / "out.jsonl"
  # No --chat flag: the chat template by default, as in the trainer and eval.
  cmd = ["-m", "fipo_jax.generate", "--hf_dir", str(hf_dir), "--prompts_file",
         str(prompts_file), "--output", str(out), "--n", "2", "--max_new_tokens", "8",
         "--temperature", "0"]  # fmt: skip
  proc = warm.run(*cmd, cwd=os.getcwd())
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


@pytest.mark.slow
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


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _greedy(hf_dir, prompts_file, out, *flags):
  generate.main(["--hf_dir", str(hf_dir), "--prompts_file", str(prompts_file), "--output",
                 str(out), "--n", "1", "--max_new_tokens", "6", "--temperature", "0",
                 "--no_progress", *flags])  # fmt: skip
  return [r["response_ids"] for r in _read(out)]


@pytest.mark.slow
def test_cli_reads_verl_rows_and_no_chat_turns_the_template_off(model_dirs, tmp_path):
  hf_dir, _ = model_dirs
  tok = tokenizer_lib.load_tokenizer(str(hf_dir))
  system_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
  verl_row = verl.make_row("Name a prime.", "2", data_source="x", index=0, split="test")
  rows = [
    {"prompt": "Name a prime."},
    verl_row,
    dict(verl_row, prompt=system_user),
    {"prompt_ids": tokenizer_lib.encode_prompt(tok, system_user, True)},
  ]
  got = _greedy(hf_dir, _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl")
  # A verl row's message list goes through the chat template like a text prompt does.
  assert got[0] == got[1] and got[2] == got[3]
  plain = tokenizer_lib.encode_prompt(tok, system_user, False)
  rows = [{"prompt": system_user}, {"prompt_ids": plain}]
  got = _greedy(
    hf_dir, _write_jsonl(tmp_path / "in2.jsonl", rows), tmp_path / "out2.jsonl", "--no_chat"
  )
  assert got[0] == got[1]


def test_bad_rows_are_refused_by_row(model_dirs, tmp_path, capsys):
  hf_dir, bare = model_dirs
  out = tmp_path / "o.jsonl"
  for rows, flags, want in [
    ([{"prompt": "hello"}], ("--hf_dir", bare), "row 1: has 'prompt' text but there is no"),
    ([{"prompt_ids": [1]}, {"text": "x"}], ("--hf_dir", hf_dir), "row 2: has neither"),
    ([{"prompt": [{"role": "user"}]}], ("--hf_dir", hf_dir), "row 1: 'prompt' is neither"),
    ([{"prompt_ids": []}], ("--hf_dir", hf_dir), "row 1: is an empty prompt"),
  ]:
    args = [
      *map(str, flags),
      "--prompts_file",
      str(_write_jsonl(tmp_path / "in.jsonl", rows)),
      "--output",
      str(out),
    ]
    with pytest.raises(SystemExit) as e:
      generate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("generate: ") and want in err[0], err


def _run_cli(warm, *args):
  return warm.run("-m", "fipo_jax.generate", *args, cwd=os.getcwd())


@pytest.mark.slow
def test_cli_bad_inputs_exit_2_with_one_line(model_dirs, tmp_path, warm):
  _, bare = model_dirs
  ids_file = _write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [1, 2]}])
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  out = tmp_path / "o.jsonl"
  for args, want in [
    (
      ("--hf_dir", tmp_path / "nope", "--prompts_file", ids_file),
      f"generate: HF model directory {tmp_path / 'nope'}: not found",
    ),
    (
      ("--checkpoint", tmp_path / "ckpt", "--prompts_file", ids_file),
      f"generate: checkpoint directory not found: {tmp_path / 'ckpt'}",
    ),
    (
      ("--hf_dir", bare, "--prompts_file", empty),
      f"generate: no rows in {empty} (empty data file)",
    ),
  ]:
    proc = _run_cli(warm, *args, "--output", out)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [want]
    assert not out.exists()


@pytest.mark.slow
def test_top_k_off_is_minus_one_and_zero_is_refused(model_dirs, tmp_path, capsys, warm):
  """One "off" value for top-k (-1, as in the configs) in generate and eval: 0 exits 2."""
  _, bare = model_dirs
  ids_file = _write_jsonl(tmp_path / "ids.jsonl", [{"prompt_ids": [1, 2]}])
  out = tmp_path / "o.jsonl"
  generate.main(["--hf_dir", str(bare), "--prompts_file", str(ids_file), "--output", str(out),
                 "--n", "1", "--max_new_tokens", "2"])  # the default top_k: -1 (off)
  assert len(_read(out)) == 1
  capsys.readouterr()  # its progress bar
  with pytest.raises(SystemExit) as e:
    generate.main(["--hf_dir", str(bare), "--prompts_file", str(ids_file), "--output",
                   str(tmp_path / "o2.jsonl"), "--top_k", "0"])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    "generate: top_k must be -1 (off) or > 0, got 0"]
  proc = warm.run("-m", "fipo_jax.eval", "--hf_dir", bare, "--data", ids_file, "--top_k", "0",
                  cwd=os.getcwd())
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == ["eval: top_k must be -1 (off) or > 0, got 0"]
