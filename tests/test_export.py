"""Exports that transformers uses as the trainer does, and the CLIs that read them.

A tiny_cpu workdir holds the stored warm-start weights (tests/testdata/tiny_cpu_sft.npz), which
answer "Q: copy 4831=" with "Answer: 4831" and <|im_end|>. `python -m fipo_jax.export` of it
must give a directory where AutoTokenizer encodes a prompt with spaces to the trainer's ids and
transformers' greedy `generate` gives our sampler's answer and stops at EOS; `eval --hf_dir` of
the export must score what `eval --checkpoint` of the workdir scores. The Qwen2.5 tokenizer
fixture gets the same round trip. Bad inputs to export and eval exit 2 with one line.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from conftest import QWEN_ENDOFTEXT, QWEN_IM_END
from flax import nnx

from fipo_jax import checkpoints, export, generate, models
from fipo_jax import config as config_lib
from fipo_jax import policy as policy_lib
from fipo_jax.data import synthetic, verl
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.sampling import driver
from fipo_jax.sampling import engine as engine_lib

PROMPTS = ["Q: copy 4831=", "Q: copy 1234=", "Q: copy 9070="]  # 13 tokens each
MAX_NEW = 20  # tiny_cpu's max_response_length; "Answer: 4831" + EOS is 13 tokens


@pytest.fixture(scope="module")
def warm(warm_server):
  """The CLI runs fork from one process that has imported what they import (this process's
  environment): each skips ~10 CPU-s of imports (tests/warm_python.py)."""
  return warm_server.with_env(dict(os.environ))


@pytest.fixture(scope="module")
def cli(warm):
  """`python -m MODULE ARGS` as a `subprocess.CompletedProcess`."""
  return lambda module, *args: warm.run("-m", module, *args, cwd=os.getcwd())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, testdata):
  """A tiny_cpu workdir: run config.json, tokenizer/, checkpoint step 1 = the warm start."""
  from configs import tiny_cpu  # noqa: PLC0415

  w = tmp_path_factory.mktemp("run")
  config = tiny_cpu.get_config()
  policy_lib.save_run_config(config, str(w))
  tokenizer_lib.build_tokenizer(str(w / "tokenizer"))
  cfg = policy_lib.model_config(config_lib.validate(config.to_dict(), check_paths=False))
  graphdef, state = nnx.split(models.init_model(cfg))
  stored = dict(np.load(testdata / "tiny_cpu_sft.npz"))
  state = nnx.from_flat_state([(p, v.replace(jnp.asarray(stored["/".join(p)])))
                               for p, v in nnx.to_flat_state(state)])
  with checkpoints.CheckpointManager(str(w / "checkpoints"), keep=1, async_save=False) as m:
    m.save(1, params=state, opt_state={"unused": jnp.zeros(())})
  return w


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory, cli):
  out = tmp_path_factory.mktemp("export") / "hf"
  proc = cli("fipo_jax.export", "--checkpoint", workdir, "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def our_greedy(workdir):
  """(prompt ids, greedy samples) of the trainer's tokenizer and our sampler on the workdir."""
  tok = tokenizer_lib.load_tokenizer(str(workdir / "tokenizer"))
  ids = [tokenizer_lib.encode_prompt(tok, [{"role": "user", "content": p}], False)
         for p in PROMPTS]  # tiny_cpu: apply_chat_template=False
  policy = policy_lib.load_policy(checkpoint_dir=str(workdir))
  engine, params = engine_lib.Engine.from_model(
    nnx.merge(policy.graphdef, policy.params),
    engine_lib.EngineConfig(num_slots=len(ids), max_prompt_len=13, max_new_tokens=MAX_NEW))
  samples = driver.generate_samples(engine, params, ids, n=1, max_new_tokens=MAX_NEW,
                                    eos_ids=tokenizer_lib.eos_token_ids(tok))
  return ids, samples


@pytest.mark.slow
def test_export_writes_token_ids_and_generation_config(exported):
  cfg = json.loads((exported / "config.json").read_text())
  assert cfg["model_type"] == "qwen2"
  # <|endoftext|> (0) is pad and bos, <|im_end|> (2) the EOS; generation stops on both.
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 0)
  gen = transformers.GenerationConfig.from_pretrained(exported)
  assert (gen.eos_token_id, gen.pad_token_id, gen.bos_token_id) == ([0, 2], 0, 0)
  # tiny_cpu's prompt format and lengths, for eval/generate --hf_dir of the export.
  assert cfg["fipo_jax_run"] == {"apply_chat_template": False, "max_prompt_length": 16,
                                 "max_response_length": MAX_NEW, "reward_fn": "math_dapo"}


@pytest.mark.slow
def test_transformers_on_the_export_matches_the_trainer(exported, our_greedy):
  ids, ours = our_greedy
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
  model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  assert model.generation_config.eos_token_id == [0, 2]
  for prompt, prompt_ids, sample in zip(PROMPTS, ids, ours, strict=True):
    assert len(prompt_ids) == len(prompt) == 13  # one id per character, spaces included
    assert hf_tok(prompt)["input_ids"] == prompt_ids
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, 13, dtype=int),
                           max_new_tokens=MAX_NEW, do_sample=False)
    response = out[0, 13:].tolist()
    # Our sampler stopped at EOS (kept in response_ids, as in verl); transformers stops there too.
    assert sample.finish_reason == "stop" and response == sample.response_ids.tolist()
    assert response[-1] == tokenizer_lib.eos_token_ids(hf_tok)[-1] == 2
    assert hf_tok.decode(response, skip_special_tokens=True).startswith("Answer: ")
  assert hf_tok.decode(ours[0].response_ids, skip_special_tokens=True) == "Answer: 4831"


@pytest.mark.parametrize("source", ["--checkpoint", "--hf_dir"])
def test_generate_uses_the_runs_prompt_format(source, workdir, exported, our_greedy, tmp_path):
  _, ours = our_greedy
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  model_dir = workdir if source == "--checkpoint" else exported
  generate.main([source, str(model_dir), "--prompts_file", str(prompts), "--output",
                 str(tmp_path / "out.jsonl"), "--n", "1", "--temperature", "0",
                 "--max_new_tokens", str(MAX_NEW), "--no_progress"])
  rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [r["response_ids"] for r in rows] == [s.response_ids.tolist() for s in ours]
  assert rows[0]["response"] == "Answer: 4831"


@pytest.mark.slow  # two eval processes (~60 s on 2 cores)
def test_eval_of_the_export_scores_like_the_checkpoint(workdir, exported, tmp_path, cli):
  data = verl.write_jsonl(str(tmp_path / "val.jsonl"), synthetic.make_rows(
    8, seed=1, min_digits=4, max_digits=4, kind="copy", split="test"))
  flags = ["--data", data, "--n", "1", "--temperature", "0"]  # format, lengths: the run's
  results = []
  # the export's eval scores in 2 verifier processes (rl.reward_workers' pool): the same scores
  for src in (["--checkpoint", workdir], ["--hf_dir", exported, "--reward_workers", "2"]):
    proc = cli("fipo_jax.eval", *src, *flags, "--output", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results.append(json.loads((tmp_path / "r.json").read_text()))
  ckpt, hf = results
  assert [s["response_ids"] for s in hf["samples"]] == [s["response_ids"] for s in ckpt["samples"]]
  # Before the byte-level tokenizer the export scored 0 (its prompts lost their spaces).
  assert hf["metrics"]["eval/acc_mean"] == ckpt["metrics"]["eval/acc_mean"] > 0


@pytest.mark.slow  # two eval processes (~60 s on 2 cores)
def test_eval_scores_with_the_runs_reward_fn(workdir, tmp_path, cli):
  """Ground truths written "4831.0": math_dapo compares strings (every "Answer: 4831" wrong),
  math_verify numbers. eval --checkpoint of a run with rl.reward_fn=math_verify uses it."""
  verify_run = tmp_path / "verify_run"
  shutil.copytree(workdir, verify_run)
  cfg = json.loads((verify_run / "config.json").read_text())
  cfg["rl"]["reward_fn"] = "math_verify"
  (verify_run / "config.json").write_text(json.dumps(cfg))
  rows = synthetic.make_rows(8, seed=1, min_digits=4, max_digits=4, kind="copy", split="test")
  for row in rows:
    row["reward_model"]["ground_truth"] += ".0"
  data = verl.write_jsonl(str(tmp_path / "val.jsonl"), rows)
  acc = {}
  for name, run in (("math_dapo", workdir), ("math_verify", verify_run)):
    proc = cli("fipo_jax.eval", "--checkpoint", run, "--data", data, "--n", "1",
               "--temperature", "0", "--output", tmp_path / f"{name}.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["eval/acc_mean"]
  assert acc["math_dapo"] == 0.0 < acc["math_verify"]


def _word_level_tokenizer(out_dir):
  """The character tokenizer as fipo_jax wrote it before byte-level BPE (same ids, WordLevel):
  transformers' Qwen2Tokenizer rebuilds it with a byte-level pre-tokenizer that loses spaces."""
  vocab = {t: i for i, t in enumerate((*tokenizer_lib.SPECIAL_TOKENS, tokenizer_lib.UNK,
                                       *tokenizer_lib.ALPHABET))}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=tokenizer_lib.UNK))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
  tok.decoder = tokenizers.decoders.Fuse()
  tok.add_special_tokens(list(tokenizer_lib.SPECIAL_TOKENS))
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token=tokenizer_lib.UNK, pad_token=tokenizer_lib.PAD,
    eos_token=tokenizer_lib.IM_END).save_pretrained(out_dir)


@pytest.mark.slow
def test_export_refuses_a_tokenizer_transformers_would_load_differently(workdir, tmp_path, cli):
  old = shutil.copytree(workdir, tmp_path / "old_run")
  shutil.rmtree(old / "tokenizer")
  _word_level_tokenizer(old / "tokenizer")
  proc = cli("fipo_jax.export", "--checkpoint", old, "--out", tmp_path / "hf")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  (line,) = proc.stderr.strip().splitlines()
  assert line.startswith(f"export: {tmp_path / 'hf'} was written but its tokenizer is wrong: ")
  assert "(Qwen2Tokenizer) encodes" in line
  # The fix the message gives: rebuild the character tokenizer (same ids); then export works.
  fix = line.split("with python -c ")[1].removesuffix(")").strip('"')
  assert subprocess.run([sys.executable, "-c", fix], check=False).returncode == 0
  assert cli("fipo_jax.export", "--checkpoint", old, "--out", tmp_path / "hf").returncode == 0


@pytest.mark.slow
def test_qwen2_5_export_round_trip(qwen_model_dir, tmp_path):
  trainer_tok = tokenizer_lib.load_tokenizer(str(qwen_model_dir))
  model = models.from_pretrained(qwen_model_dir, param_dtype=jnp.float32)
  out = tmp_path / "hf"
  models.save_pretrained(model, out, tokenizer_dir=qwen_model_dir)
  assert export.tokenizer_mismatch(str(qwen_model_dir), str(out)) is None
  assert not tokenizer_lib.is_character_tokenizer(str(out))  # (export's rebuild hint: not here)
  cfg = json.loads((out / "config.json").read_text())
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (QWEN_ENDOFTEXT,) * 3
  gen = json.loads((out / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [QWEN_ENDOFTEXT, QWEN_IM_END]  # base EOS and the chat turn end
  assert "_from_model_config" not in gen and gen["transformers_version"]  # source fields kept
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert type(hf_tok).__name__ == "Qwen2Tokenizer"
  messages = [{"role": "user", "content": "What is 3 + 4? Put the answer after \"Answer:\"."}]
  ids = tokenizer_lib.encode_prompt(trainer_tok, messages, True)
  assert tokenizer_lib.encode_prompt(hf_tok, messages, True) == ids
  # Greedy continuations agree (a random model: a few tokens, no EOS expected).
  new = 4
  engine, params = engine_lib.Engine.from_model(
    models.from_pretrained(out),
    engine_lib.EngineConfig(num_slots=1, max_prompt_len=len(ids), max_new_tokens=new))
  (ours,) = driver.generate_samples(engine, params, [ids], n=1, max_new_tokens=new, eos_ids=[])
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    got = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                            max_new_tokens=new, min_new_tokens=new, do_sample=False)
  assert got[0, len(ids):].tolist() == ours.response_ids.tolist()


@pytest.mark.parametrize("tool", ["export", "eval"])
@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(tool, workdir, tmp_path, cli):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  nope = tmp_path / "nope"
  cases = {
    "export": [(("--checkpoint", nope, "--out", tmp_path / "o"),
                f"export: {nope / 'config.json'} not found: is {nope} a fipo_jax workdir?"),
               (("--checkpoint", workdir, "--out", tmp_path / "o", "--dtype", "int8"),
                "export: --dtype='int8' is not one of ('float32', 'bfloat16', 'float16') "
                "(a name or a jnp/numpy dtype)")],
    "eval": [(("--hf_dir", nope, "--data", empty), f"eval: HF model directory {nope}: not found"),
             (("--checkpoint", workdir, "--data", empty),
              f"eval: no rows in {empty} (empty data file)")],
  }[tool]
  for args, want in cases:
    proc = cli(f"fipo_jax.{tool}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [want]
  assert not (tmp_path / "o").exists()
