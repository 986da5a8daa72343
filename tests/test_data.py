"""Data: verl-schema parquet/jsonl incl. malformed rows, truncation, resumable iterator state,
the synthetic task and the locally built tokenizer."""

import json
import logging
import random

import numpy as np
import pytest

from fipo_jax.data import pipeline, synthetic, verl
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


def test_truncation_modes(testdata, tok, caplog):
  full = _dataset(testdata, tok, "verl_math.parquet").get(0)["prompt_ids"]
  n = 40
  assert len(full) > n
  left = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n).get(0)["prompt_ids"]
  np.testing.assert_array_equal(left, full[-n:])  # keeps the generation prompt at the end
  assert tok.decode(left).endswith("<|im_start|>assistant\n")
  drop = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n, truncation="drop")
  with caplog.at_level(logging.WARNING):
    assert drop.get(0) is None
  assert "tokens > max_prompt_length" in caplog.text
  err = _dataset(testdata, tok, "verl_math.parquet", max_prompt_length=n, truncation="error")
  with pytest.raises(ValueError, match=r"row 0 in .*verl_math.parquet has \d+ tokens"):
    err.get(0)


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
  with pytest.raises(ValueError, match="no valid rows"):
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
  assert it.metrics() == {"data/skipped_rows": 2 * len(exp["bad"]), "data/epoch": 2}
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
  from fipo_jax.rl import rewards

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
