"""Data: verl-schema parquet/jsonl incl. malformed rows, truncation, resumable iterator state,
the synthetic task and the locally built tokenizer."""

import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest

from fipo_jax.data import pipeline, synthetic, truncation, verl
from fipo_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(testdata):
  return tokenizer_lib.load_tokenizer(str(testdata / "tiny_tokenizer"))


@pytest.fixture(scope="module")
def expected(testdata):
  return json.loads((testdata / "verl_expected.json").read_text())


def _dataset(testdata, tok, name, **kw):
  kw.setdefault("max_prompt_length", 1024)
  return pipeline.PromptDataset([str(testdata / name)], tok, **kw)


@pytest.mark.parametrize("name", ["verl_math.parquet", "verl_aime.jsonl"])
def test_malformed_rows_are_skipped_counted_and_logged(testdata, tok, expected, name, caplog):
  ds = _dataset(testdata, tok, name)
  exp = expected[name]
  assert len(ds) == exp["num_rows"]
  with caplog.at_level(logging.WARNING, logger="fipo_jax.data.pipeline"):
    got_bad = [i for i in range(len(ds)) if ds.get(i) is None]
  assert got_bad == exp["bad"]
  for i in exp["bad"]:
    assert any(f"global index {i})" in r.getMessage() and name in r.getMessage()
               for r in caplog.records), i
  examples, skipped = ds.examples()
  assert skipped == len(exp["bad"])
  assert len(examples) == exp["num_rows"] - len(exp["bad"])
  for ex in examples:
    assert ex["prompt_ids"].dtype == np.int32 and ex["prompt_ids"].ndim == 1
    assert isinstance(ex["ground_truth"], str) and ex["ground_truth"]
    assert ex["data_source"] in ("math_dapo", "aime24")


def test_fields_and_chat_template(testdata, tok):
  ds = _dataset(testdata, tok, "verl_aime.jsonl")
  ex = ds.get(0)
  assert ex["ground_truth"] == "9" and ex["data_source"] == "aime24" and ex["index"] == 0
  text = tok.decode(ex["prompt_ids"])
  assert text == ("<|im_start|>user\nFind the number of ordered pairs $(m,n)$ of positive "
                  "integers with $mn = 100$.<|im_end|>\n<|im_start|>assistant\n")
  # An integer ground truth (row 6 of the file) is read as its string.
  assert [e["ground_truth"] for e in ds.examples()[0]] == ["9", "32", "13", "142", "1", "26"]
  plain = _dataset(testdata, tok, "verl_aime.jsonl", apply_chat_template=False)
  assert tok.decode(plain.get(0)["prompt_ids"]).startswith("Find the number of ordered pairs")


HEAD, GEN = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"


def test_truncation_modes(testdata, tok, caplog):
  ds = _dataset(testdata, tok, "verl_math.parquet")
  full = ds.get(0)
  assert not full["truncated"]
  content = verl.parse_row(ds.rows[0]).messages[0]["content"]
  n = 40
  assert len(full["prompt_ids"]) > n
  left = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n).get(0)
  assert left["truncated"] and len(left["prompt_ids"]) == n  # char tokenizer: an exact fit
  text = tok.decode(left["prompt_ids"])
  # Cut inside the user message: the template's head and the generation prompt survive, and
  # the message keeps its tail.
  assert text.startswith(HEAD) and text.endswith(GEN)
  kept = text.removeprefix(HEAD).removesuffix(GEN)
  assert kept and content.endswith(kept) and len(kept) < len(content)
  drop = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n, truncation="drop")
  with caplog.at_level(logging.WARNING):
    assert drop.get(0) is None
  assert "prompt of " in caplog.text and "dropped (data.truncation='drop')" in caplog.text
  err = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n, truncation="error")
  with pytest.raises(pipeline.PromptTooLongError, match=r"row 0 of .*verl_math.parquet .*: "
                     r"prompt of \d+ tokens > data.max_prompt_length=40"):
    err.get(0)


def test_truncation_without_template_and_with_a_system_prompt(tok):
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 50 + "END"},
          {"role": "assistant", "content": "ok"}]
  ids, kept = truncation.truncate_left(tok, msgs, max_length=30, apply_chat_template=False)
  assert tok.decode(ids) == "Be brief." + "x" * (30 - 9 - 2 - 3) + "END" + "ok"
  assert kept == 30 - 9 - 2
  ids, _ = truncation.truncate_left(tok, msgs, max_length=60, apply_chat_template=True)
  text = tok.decode(ids)
  assert len(ids) == 60 and text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n" + HEAD)
  assert text.endswith("END<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n" + GEN[11:])
  # The template around an empty user message does not fit: nothing to cut, the row is dropped.
  assert truncation.truncate_left(tok, msgs, max_length=20, apply_chat_template=True) is None


def _long_rows(path, lengths):
  rows = [verl.make_row("y" * k + f" {i}?", str(i), data_source="math_dapo", index=i,
                        split="train") for i, k in enumerate(lengths)]
  return str(verl.write_jsonl(str(path), rows))


@pytest.mark.parametrize("mode", ["left", "drop"])
def test_truncated_and_dropped_prompts_are_counted_and_warned_once(tmp_path, tok, caplog, mode):
  lengths = [5, 80, 5, 90, 100, 5]  # 3 of 6 prompts over the limit
  path = _long_rows(tmp_path / "rows.jsonl", lengths)
  ds = pipeline.PromptDataset([path], tok, max_prompt_length=64, truncation=mode)
  it = pipeline.PromptIterator(ds, batch_size=3 if mode == "drop" else 6, shuffle=False)
  with caplog.at_level(logging.WARNING, logger="fipo_jax.data.pipeline"):
    batches = [next(it), next(it)]  # two epochs: each long prompt met twice
  assert all(len(ex["prompt_ids"]) <= 64 for b in batches for ex in b)
  m = it.metrics()
  if mode == "left":
    assert [ex["truncated"] for ex in batches[0]] == [k > 40 for k in lengths]
    assert m["data/truncated_prompts"] == 6 and m["data/dropped_prompts"] == 0
    assert m["data/skipped_rows"] == 0
  else:
    assert [ex["index"] for ex in batches[0]] == [0, 2, 5]
    assert m["data/dropped_prompts"] == m["data/skipped_rows"] == 6
    assert m["data/truncated_prompts"] == 0
  kind = "truncated" if mode == "left" else "dropped"
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == 1, warned  # one example, the rest counted
  assert warned[0].startswith(f"row 1 of {path} (global index 1): prompt of ")
  assert "> data.max_prompt_length=64" in warned[0] and f"data/{kind}_prompts" in warned[0]
  state = json.loads(json.dumps(it.get_state()))
  fresh = pipeline.PromptIterator(pipeline.PromptDataset([path], tok, max_prompt_length=64,
                                                         truncation=mode),
                                  batch_size=it.batch_size, shuffle=False)
  fresh.set_state(state)
  assert fresh.metrics() == m
  del state["truncated_prompts"], state["dropped_prompts"]  # a checkpoint from before them
  fresh.set_state(state)
  assert fresh.metrics()["data/truncated_prompts"] == 0


def test_bad_data_raises_data_error_naming_the_file(tmp_path, tok, caplog):
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415

  rows = [verl.make_row("Q: 1+1=", "2", data_source="math_dapo", index=i, split="train")
          for i in range(3)]
  empty = tmp_path / "empty.parquet"
  pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), empty)
  with pytest.raises(verl.DataError, match=f"no rows in {empty}"):
    pipeline.PromptDataset([str(empty)], tok, max_prompt_length=64)
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(verl.DataError, match="no rows in"):
    pipeline.PromptDataset([str(tmp_path / "empty.jsonl")], tok, max_prompt_length=64)
  no_reward = tmp_path / "no_reward.parquet"
  pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "reward_model"}
                                       for r in rows]), no_reward)
  with pytest.raises(verl.DataError, match=f"{no_reward} has no column 'reward_model'"):
    pipeline.PromptDataset([str(no_reward)], tok, max_prompt_length=64)
  # jsonl rows are free-form: the same problem is found by `check`, quietly, in one error.
  bad = _long_rows(tmp_path / "bad.jsonl", [3, 3])
  (tmp_path / "bad.jsonl").write_text(
    (tmp_path / "bad.jsonl").read_text().replace('"reward_model"', '"reward"'))
  ds = pipeline.PromptDataset([bad], tok, max_prompt_length=64)
  with caplog.at_level(logging.WARNING), pytest.raises(
      verl.DataError, match=r"no usable train rows in .*bad.jsonl: all 2 skipped \(row 0 of "
      r".*: missing 'reward_model' object\)"):
    ds.check("train")
  assert not caplog.records
  # truncation='error' refuses a too-long prompt anywhere in the files, not only when met.
  long = _long_rows(tmp_path / "long.jsonl", [5, 5, 5, 200])
  ds = pipeline.PromptDataset([long], tok, max_prompt_length=64, truncation="error")
  with pytest.raises(pipeline.PromptTooLongError, match="row 3 of"):
    ds.check("train")
  pipeline.PromptDataset([long], tok, max_prompt_length=64, truncation="left").check("train")


def test_skipped_rows_are_logged_up_to_a_cap(tmp_path, tok, caplog):
  path = tmp_path / "many_bad.jsonl"
  path.write_text("[1]\n" * 25 + json.dumps(verl.make_row("Q: 1=", "1", data_source="d",
                                                           index=0, split="train")) + "\n")
  ds = pipeline.PromptDataset([str(path)], tok, max_prompt_length=64)
  with caplog.at_level(logging.WARNING, logger="fipo_jax.data.pipeline"):
    examples, skipped = ds.examples()
  assert skipped == 25 and len(examples) == 1
  assert len(caplog.records) == pipeline.MAX_LOGGED_ROWS
  assert "not logged" in caplog.records[-1].getMessage()


def test_missing_and_unreadable_files(tmp_path, tok):
  missing = tmp_path / "nope.parquet"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    verl.RowSource([str(missing)])
  garbage = tmp_path / "garbage.parquet"
  garbage.write_bytes(b"this is not parquet")
  with pytest.raises(OSError, match=str(garbage)):
    verl.RowSource([str(garbage)])
  other = tmp_path / "rows.csv"
  other.write_text("a,b\n")
  with pytest.raises(ValueError, match="unsupported data file type"):
    verl.RowSource([str(other)])


def test_all_rows_bad_raises_not_hangs(tmp_path, tok):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": []}\n[1]\n')
  it = pipeline.PromptIterator(pipeline.PromptDataset([str(path)], tok, max_prompt_length=64),
                               batch_size=1)
  with pytest.raises(verl.DataError, match="no valid rows"):
    next(it)


def test_multiple_files_concatenate(testdata, tok, expected):
  ds = pipeline.PromptDataset(
    [str(testdata / "verl_math.parquet"), str(testdata / "verl_aime.jsonl")], tok,
    max_prompt_length=1024)
  n_math = expected["verl_math.parquet"]["num_rows"]
  assert len(ds) == n_math + expected["verl_aime.jsonl"]["num_rows"]
  assert ds.rows.locate(n_math + 2)[1] == 2
  assert ds.get(n_math)["data_source"] == "aime24"


def _ids(batch):
  return [ex["index"] for ex in batch]


def test_iterator_epochs_cover_valid_rows_once_and_reshuffle(testdata, tok, expected):
  ds = _dataset(testdata, tok, "verl_math.parquet")
  exp = expected["verl_math.parquet"]
  good = sorted(set(range(exp["num_rows"])) - set(exp["bad"]))
  it = pipeline.PromptIterator(ds, batch_size=len(good), shuffle=True, seed=7)
  epoch0, epoch1 = _ids(next(it)), _ids(next(it))
  assert sorted(epoch0) == good and sorted(epoch1) == good
  assert epoch0 != epoch1  # a fresh permutation per epoch
  assert it.skipped_rows == 2 * len(exp["bad"])
  assert it.metrics() == {"data/skipped_rows": 2 * len(exp["bad"]), "data/epoch": 2,
                          "data/truncated_prompts": 0, "data/dropped_prompts": 0}
  ordered = pipeline.PromptIterator(ds, batch_size=len(good), shuffle=False)
  assert _ids(next(ordered)) == good
  other_seed = pipeline.PromptIterator(ds, batch_size=len(good), shuffle=True, seed=8)
  assert _ids(next(other_seed)) != epoch0


def test_iterator_state_restores_exactly(testdata, tok):
  ds = _dataset(testdata, tok, "verl_aime.jsonl")
  it = pipeline.PromptIterator(ds, batch_size=4, shuffle=True, seed=3)
  for _ in range(3):  # crosses an epoch boundary (6 valid rows per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
  expected_next = [_ids(next(it)) for _ in range(4)]
  skipped_after = it.skipped_rows
  fresh = pipeline.PromptIterator(_dataset(testdata, tok, "verl_aime.jsonl"), batch_size=4,
                                  shuffle=True, seed=3)
  fresh.set_state(state)
  assert [_ids(next(fresh)) for _ in range(4)] == expected_next
  assert fresh.skipped_rows == skipped_after
  wrong_seed = pipeline.PromptIterator(ds, batch_size=4, shuffle=True, seed=4)
  with pytest.raises(ValueError, match="seed"):
    wrong_seed.set_state(state)
  with pytest.raises(ValueError, match="rows"):
    fresh.set_state(dict(state, num_rows=99))


def test_pad_left_right():
  ids, mask = pipeline.pad_left([[1, 2, 3], [4]], pad_id=0)
  np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
  ids, mask = pipeline.pad_right([[1, 2, 3], [4]], pad_id=9, length=4)
  np.testing.assert_array_equal(ids, [[1, 2, 3, 9], [4, 9, 9, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  with pytest.raises(ValueError, match="pad length"):
    pipeline.pad_left([[1, 2, 3]], 0, length=2)


def test_tokenizer_is_char_level_and_deterministic(tmp_path, testdata, tok):
  path = tokenizer_lib.build_tokenizer(str(tmp_path / "tok"))
  assert (tmp_path / "tok" / "tokenizer.json").read_text() == (
    testdata / "tiny_tokenizer" / "tokenizer.json").read_text()
  assert tokenizer_lib.vocab_size(path) == len(tok) == 101
  text = "Answer: -82\n x"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == len(text) and tok.decode(ids) == text
  assert tok.pad_token_id == 0 and tok.eos_token == "<|im_end|>"
  assert tokenizer_lib.eos_token_ids(tok) == [0, 2]
  with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing"))


def test_the_character_tokenizer_loads_as_autotokenizer_would_without_torch(testdata, tok):
  """load_tokenizer skips AutoTokenizer for the character tokenizer: the same class and the same
  ids, template and specials, and (in a fresh process) no torch import."""
  import transformers  # noqa: PLC0415

  auto = transformers.AutoTokenizer.from_pretrained(str(testdata / "tiny_tokenizer"))
  assert type(tok) is type(auto)
  assert tok.init_kwargs == auto.init_kwargs and tok.all_special_ids == auto.all_special_ids
  assert tok.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
  messages = [{"role": "user", "content": "What is 12 + 30?\nAnswer: é"}]
  for t in (tok, auto):
    assert t.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
      auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert t("x = -82\té")["input_ids"] == auto("x = -82\té")["input_ids"]
  code = ("import sys; from fipo_jax.data import tokenizer as t; "
          f"t.load_tokenizer({str(testdata / 'tiny_tokenizer')!r}); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False", out.stdout


def test_tiny_model_vocab_covers_tokenizer(tok):
  from configs import tiny_cpu

  assert tiny_cpu.get_config().model.overrides.vocab_size >= len(tok)


def test_synthetic_problems_are_correct():
  rng = random.Random(0)
  for ops in ("+", "-", "*", "+-*"):
    for _ in range(50):
      q, a = synthetic.make_problem(rng, min_digits=1, max_digits=3, num_operands=3, ops=ops)
      expr = q.removeprefix("Q: ").removesuffix("=")
      assert set(expr) <= set("0123456789" + ops)
      # Independent check: evaluate with explicit precedence.
      nums = [int(x) for x in expr.replace("+", " ").replace("-", " ").replace("*", " ").split()]
      signs = [c for c in expr if c in "+-*"]
      terms, cur = [], nums[0]
      pending = "+"
      for op, x in zip(signs, nums[1:], strict=True):
        if op == "*":
          cur *= x
        else:
          terms.append(cur if pending == "+" else -cur)
          cur, pending = x, op
      terms.append(cur if pending == "+" else -cur)
      assert int(a) == sum(terms), (q, a)


def test_synthetic_dataset_through_the_verl_pipeline(tmp_path, tok):
  from configs import tiny_cpu
  from fipo_jax import config as config_lib

  rc = config_lib.validate(tiny_cpu.get_config("runlocal"))
  train_it, val = pipeline.build_datasets(rc, tok, workdir=str(tmp_path))
  task = rc.data.synthetic
  assert len(val) == task.num_val and len(train_it.dataset) == task.num_train
  val_q = {tok.decode(e["prompt_ids"]) for e in val}
  train_q = {tok.decode(train_it.dataset.get(i)["prompt_ids"]) for i in range(task.num_train)}
  assert not val_q & train_q  # held-out prompts are disjoint from the train prompts
  assert max(len(e["prompt_ids"]) for e in val) <= rc.data.max_prompt_length
  batch = next(train_it)
  assert len(batch) == rc.rl.gen_batch_size and train_it.skipped_rows == 0
  # Deterministic: a second workdir gets identical files.
  t1, v1 = synthetic.write_dataset(str(tmp_path / "a"), task)
  t2, v2 = synthetic.write_dataset(str(tmp_path / "b"), task)
  assert open(t1).read() == open(t2).read() and open(v1).read() == open(v2).read()


def test_sft_examples_score_correct_with_math_dapo(tok):
  from fipo_jax.algo import rewards

  rows = synthetic.make_rows(20, seed=1, max_digits=3, num_operands=2, ops="+-")
  examples = synthetic.sft_examples(tok, rows)
  for row, ex in zip(rows, examples, strict=True):
    assert ex["response_ids"][-1] == tok.eos_token_id
    response = tok.decode(ex["response_ids"], skip_special_tokens=True)
    truth = row["reward_model"]["ground_truth"]
    assert response == f"Answer: {truth}"
    assert rewards.math_dapo_score(response, truth)["acc"]
    assert not rewards.math_dapo_score(f"Answer: {int(truth) + 1}", truth)["acc"]
    assert tok.decode(ex["prompt_ids"]).endswith(
      row["prompt"][0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_synthetic_too_small_space_raises():
  with pytest.raises(ValueError, match="make it harder"):
    synthetic.make_rows(200, seed=0, min_digits=1, max_digits=1, num_operands=2, ops="+")


@pytest.fixture(scope="module")
def qwen_tok(qwen_tokenizer_dir):
  return tokenizer_lib.load_tokenizer(str(qwen_tokenizer_dir))


# The real Qwen2.5 template: its default system prompt, then the user turn; the generation
# prompt is <|im_start|> 'assistant' '\n'.
QWEN_HEAD = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
             "assistant.<|im_end|>\n<|im_start|>user\n")
QWEN_GEN_IDS = [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n


def test_long_dapo_prompt_is_cut_inside_the_user_message_on_qwen2_5(qwen_tok, dapo_parquet,
                                                                   caplog):
  import dapo_rows  # noqa: PLC0415

  path = str(dapo_parquet(n=6, n_long=2, long_words=400))  # rows 0-1: ~530 tokens
  full = pipeline.PromptDataset([path], qwen_tok, max_prompt_length=4096)
  lengths = [len(full.get(i)["prompt_ids"]) for i in range(6)]
  assert min(lengths[:2]) > 400 and max(lengths[2:]) < 256
  ds = pipeline.PromptDataset([path], qwen_tok, max_prompt_length=256)
  it = pipeline.PromptIterator(ds, batch_size=6, shuffle=False)
  with caplog.at_level(logging.WARNING, logger="fipo_jax.data.pipeline"):
    batch = next(it)
  head = qwen_tok(QWEN_HEAD, add_special_tokens=False)["input_ids"]
  assert head[0] == 151644 and len(head) > 20
  for i, ex in enumerate(batch):
    ids = ex["prompt_ids"].tolist()
    assert ex["truncated"] == (i < 2) and len(ids) <= 256
    assert ids[:len(head)] == head and ids[-len(QWEN_GEN_IDS):] == QWEN_GEN_IDS
    if i >= 2:
      assert ids == full.get(i)["prompt_ids"].tolist()  # short prompts untouched
  # The long prompts keep the tail of their message: the problem's end and DAPO's reminder.
  for i in range(2):
    ids = batch[i]["prompt_ids"].tolist()
    assert len(ids) >= 250  # cut to the limit, not far below it
    kept = qwen_tok.decode(ids[len(head):-len(QWEN_GEN_IDS)])
    content = dapo_rows.rows(6, n_long=2, long_words=400)[i]["prompt"][0]["content"]
    assert content.endswith(kept) and kept.endswith(dapo_rows.DAPO_SUFFIX)
    assert dapo_rows.PROBLEMS[i][0] in kept and not kept.startswith("Solve the following")
  assert it.metrics()["data/truncated_prompts"] == 2
  assert it.metrics()["data/dropped_prompts"] == 0
  [msg] = [r.getMessage() for r in caplog.records]
  assert f"row 0 of {path}" in msg and f"prompt of {lengths[0]} tokens" in msg
  assert "data.max_prompt_length=256" in msg
  drop = pipeline.PromptIterator(
    pipeline.PromptDataset([path], qwen_tok, max_prompt_length=256, truncation="drop"),
    batch_size=4, shuffle=False)
  assert [ex["index"] for ex in next(drop)] == [2, 3, 4, 5]
  assert drop.metrics()["data/dropped_prompts"] == 2
