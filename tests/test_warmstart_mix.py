"""The parity warm start's mix stage: a direct answer's bit is asked for without being named,
chains are held in place, and the lr anneals to 0 over the mix (fipo_jax/rl/warmstart.py)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from fipo_jax import config as config_lib
from fipo_jax import models, recipes
from fipo_jax.data import synthetic
from fipo_jax.data import tokenizer as tokenizer_lib
from fipo_jax.rl import steps as steps_lib
from fipo_jax.rl import warmstart


@pytest.fixture(scope="module")
def setup(testdata, tmp_path_factory):
  """(rc, tokenizer, direct examples, chain examples) of 8 train rows of the parity recipe."""
  from configs import reasoning_cpu

  c = reasoning_cpu.get_config()
  c.data.synthetic.num_train, c.data.synthetic.num_val = 8, 4
  rc = config_lib.validate(c)
  workdir = str(tmp_path_factory.mktemp("mix"))
  synthetic.write_dataset(f"{workdir}/data", rc.data.synthetic)
  tok = tokenizer_lib.load_tokenizer(str(testdata / "tiny_tokenizer"))
  direct, chain = warmstart._examples(rc, tok, workdir)
  return rc, tok, direct, chain


def test_direct_examples_free_only_the_answer_bit(setup):
  _, tok, direct, chain = setup
  for d, c in zip(direct, chain, strict=True):
    assert np.array_equal(c["alt_ids"], c["response_ids"])
    # Held, a chain's first token is asked for given that the response is no direct answer.
    (where,) = np.nonzero(c["held_alt_ids"] != c["response_ids"])
    assert where.tolist() == [0] and c["held_alt_ids"][0] == d["response_ids"][0]
    (where,) = np.nonzero(d["alt_ids"] != d["response_ids"])
    assert len(where) == 1  # "Answer: 0" against "Answer: 1"
    bit, alt = tok.decode(d["response_ids"][where]), tok.decode(d["alt_ids"][where])
    assert {bit, alt} == {"0", "1"}


def _tiny_model():
  cfg = models.get_preset(
    "qwen2.5-0.5b", param_dtype="float32", dtype="float32", **recipes.tiny_model().to_dict()
  )
  return nnx.split(models.init_model(cfg, seed=0))


@pytest.mark.slow
def test_mix_loss_frees_the_direct_bit_and_holds_chains(setup):
  """mix_step's two losses against ones computed from the model's full logits. The mix rows:
  -log(p('0') + p('1')) at a direct answer's bit, the negative log-likelihood at every other
  response token. The held chains: the NLL of every response token but the first, and the first
  given that it is not the direct answer's first token, -log(p(digit) / (1 - p('A')))."""
  rc, tok, direct, chain = setup
  mix_rows, held_rows = [direct[0], chain[1], direct[2]], [chain[3], chain[4]]
  kw = dict(max_response_length=rc.rl.max_response_length, pad_id=tok.pad_token_id)
  batch, alt, held = warmstart._mix_batch(
    mix_rows, held_rows, max_prompt_length=rc.data.max_prompt_length, **kw
  )
  graphdef, params = _tiny_model()
  tx = optax.sgd(0.0)
  cfg = steps_lib.UpdateConfig()
  mix = jax.jit(lambda *a: warmstart.mix_step(graphdef, *a, cfg=cfg, tx=tx))
  _, _, m = mix(params, tx.init(params), batch, alt, held)

  # The padded layout: [1, 1, B, P + T] rows, one example per row.
  ids, segments, pos = (
    np.asarray(x)[0, 0] for x in (batch.input_ids, batch.segment_ids, batch.positions)
  )
  logits = jax.jit(
    lambda p: nnx.merge(graphdef, p)(ids, positions=pos, attention_mask=(segments > 0).astype(int))
  )
  logp = np.asarray(jax.nn.log_softmax(logits(params), axis=-1))
  alt = np.asarray(alt)
  t = rc.rl.max_response_length
  p = ids.shape[1] - t
  nll = {"mix": [], "held": []}
  free = given = 0
  for b, e in enumerate(mix_rows + held_rows):
    for j in range(len(e["response_ids"])):
      row = logp[b, p + j - 1]  # the logits that predict response token j
      token = ids[b, p + j]
      if alt[b, j] == token:
        nll["mix" if b < len(mix_rows) else "held"].append(-row[token])
      elif b < len(mix_rows):
        nll["mix"].append(-np.logaddexp(row[token], row[alt[b, j]]))
        free += 1
      else:
        assert j == 0
        conditional = row[token] - np.log1p(-np.exp(row[alt[b, j]]))
        # The same as the log-softmax over every token but the alt: the alt's logit, the share
        # of direct answers, does not enter it.
        others = np.delete(row, alt[b, j])
        np.testing.assert_allclose(
          conditional, row[token] - np.logaddexp.reduce(others), rtol=1e-4, atol=1e-5
        )
        nll["held"].append(-conditional)
        given += 1
  assert free == 2  # one bit in each direct answer
  assert given == 2  # the first token of each held chain
  np.testing.assert_allclose(float(m["sft/loss"]), np.mean(nll["mix"]), rtol=1e-5)
  np.testing.assert_allclose(float(m["sft/held_chain_loss"]), np.mean(nll["held"]), rtol=1e-5)
  # The plain SFT loss of the mix rows names the bit: it is larger.
  plain_batch = warmstart._batch(mix_rows, max_prompt_length=rc.data.max_prompt_length, **kw)
  sft = jax.jit(lambda p, o, b: steps_lib.sft_step(graphdef, p, o, b, cfg=cfg, tx=tx))
  _, _, plain = sft(params, tx.init(params), plain_batch)
  assert float(plain["sft/loss"]) > float(m["sft/loss"]) + 1e-3


def test_warm_start_lr_warms_up_then_anneals_over_the_mix(setup):
  sft = setup[0].sft
  first = [warmstart.stage_lr(sft, i, mix=False) for i in range(sft.warmup_steps + 5)]
  assert first[0] == 0.0 and first[sft.warmup_steps :] == [sft.lr] * 5
  assert all(np.diff(first[: sft.warmup_steps + 1]) > 0)
  mix = [warmstart.stage_lr(sft, i, mix=True) for i in range(sft.mix_steps)]
  assert mix[0] == sft.lr and all(np.diff(mix) < 0) and min(mix) > 0
  assert mix[-1] == pytest.approx(sft.lr / sft.mix_steps)
