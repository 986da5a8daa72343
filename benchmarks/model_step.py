"""Forward+backward tokens/s of the NNX decoder vs the transformers torch model, same config.

Usage: python benchmarks/model_step.py [--layers 4 --hidden 512 --batch 8 --seq 256 --iters 5]
Both models get the same random weights (ours loaded from the torch model's save_pretrained) and
the same next-token cross-entropy loss; prints tokens/s for each and the ratio ours / torch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax import models  # noqa: E402


def torch_step_fn(model, ids):
  def step():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
      logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.item()

  return step


def jax_step_fn(model, ids):
  graphdef, state = nnx.split(model)

  @jax.jit
  def grad_step(state, ids):
    def loss_fn(state):
      logits = nnx.merge(graphdef, state)(ids)
      logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    return jax.value_and_grad(loss_fn)(state)

  def step():
    loss, grads = grad_step(state, ids)
    jax.block_until_ready(grads)
    return float(loss)

  return step


def timed(step, iters: int) -> tuple[float, float]:
  loss = step()  # compile / warm up
  step()
  start = time.perf_counter()
  for _ in range(iters):
    step()
  return (time.perf_counter() - start) / iters, loss


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--mlp", type=int, default=1536)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--impls", default="auto,plain")
  args = p.parse_args()

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(
    vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
    num_hidden_layers=args.layers, num_attention_heads=args.heads,
    num_key_value_heads=args.kv_heads, attn_implementation="sdpa")
  hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).train()
  ids_np = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
  tokens = args.batch * args.seq
  print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} "
        f"mlp={args.mlp} vocab={args.vocab} batch={args.batch}x{args.seq}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"threads={torch.get_num_threads()}")
  t_torch, loss_torch = timed(torch_step_fn(hf, torch.from_numpy(ids_np).long()), args.iters)
  print(f"torch (sdpa)          : {tokens / t_torch:10.0f} tok/s  ({t_torch * 1e3:.0f} ms/step, "
        f"loss {loss_torch:.4f})")
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    for impl in args.impls.split(","):
      model = models.from_pretrained(d, attention_impl=impl, attention_block_size=128)
      t_jax, loss_jax = timed(jax_step_fn(model, jnp.asarray(ids_np, jnp.int32)), args.iters)
      print(f"fipo_jax ({impl:9s})  : {tokens / t_jax:10.0f} tok/s  ({t_jax * 1e3:.0f} ms/step, "
            f"loss {loss_jax:.4f})  ratio vs torch = {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
  main()
