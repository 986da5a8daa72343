"""The per-platform kernel table (models/kernels.py) and the one-line refusal of a kernel the
backend cannot run."""

import jax
import jax.numpy as jnp
import pytest

from fipo_jax import config as config_lib
from fipo_jax import models, recipes
from fipo_jax.models import attention, kernels


def test_train_kernel_table():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert kernels.train_kernel("tpu", "auto", f32, packed=True) == "splash"
  assert kernels.train_kernel("gpu", "auto", bf16) == "cudnn"
  assert kernels.train_kernel("gpu", "auto", bf16, packed=True) == "pallas_flash"
  assert kernels.train_kernel("gpu", "cudnn", bf16, packed=True) == "pallas_flash"
  assert kernels.train_kernel("gpu", "auto", f32, packed=True) == "blockwise"
  assert kernels.train_kernel("cpu", "auto", bf16, packed=True) == "blockwise"
  assert kernels.train_kernel("tpu", "plain", bf16) == "plain"
  assert attention.resolve_impl("auto", bf16, packed=True) == "blockwise"  # CPU test backend


def test_decode_kernel_table():
  def cfg(head_dim, dtype="float32"):
    return models.ModelConfig(head_dim=head_dim, dtype=dtype)

  assert kernels.decode_kernel("cpu") == "gather_per_head"
  assert kernels.decode_kernel("gpu") == "gather_grouped"
  assert kernels.decode_kernel("tpu") == "gather_grouped"  # cfg unknown
  assert kernels.decode_kernel("tpu", cfg(128)) == "ragged_paged_attention"
  assert kernels.decode_kernel("tpu", cfg(64)) == "gather_grouped"  # the kernel needs 128 lanes
  assert kernels.decode_kernel("gpu", cfg(128)) == "gather_grouped"  # float32: no TF32 dots
  bf16 = lambda h: cfg(h, "bfloat16")
  assert kernels.decode_kernel("gpu", bf16(128), 128) == "pallas_paged_attention"
  assert kernels.decode_kernel("gpu", bf16(64), 16) == "pallas_paged_attention"
  assert kernels.decode_kernel("gpu", bf16(128)) == "gather_grouped"  # page size unknown
  assert kernels.decode_kernel("gpu", bf16(128), 48) == "gather_grouped"  # Triton: powers of 2
  assert kernels.decode_kernel("gpu", bf16(96), 128) == "gather_grouped"
  assert kernels.decode_kernel("gpu", bf16(8), 128) == "gather_grouped"  # dots of >= 16
  assert kernels.decode_kernel("tpu", bf16(128), 48) == "ragged_paged_attention"
  assert kernels.platform_of() == "cpu"
  mesh = jax.sharding.Mesh(jax.devices()[:2], ("data",))
  assert kernels.platform_of(mesh) == "cpu"


def test_splash_off_tpu_is_a_one_line_config_error():
  assert kernels.unsupported("splash", "tpu") is None
  assert kernels.unsupported("blockwise", "cpu") is None
  c = recipes.base()
  c.model.preset = "qwen2.5-0.5b"
  c.model.attention_impl = "splash"
  config_lib.validate(c, check_paths=False)  # no devices named: nothing to check against
  with pytest.raises(config_lib.ConfigError, match=r"model.attention_impl: 'splash' is a TPU") as e:
    config_lib.validate(c, num_devices=8, check_paths=False)
  assert "\n" not in str(e.value)


def test_sampler_mismatch_names_the_gpu_decode_kernels_scaling(monkeypatch):
  """In 16-bit on GPU the Pallas paged decode kernel scales q before its dot (it takes no
  scale): validation says so even where the trainer's kernel alone would compute alike."""
  assert attention.sampler_mismatch("bfloat16", None, "plain") is None  # CPU: gather decode
  monkeypatch.setattr(kernels, "platform_of", lambda mesh=None: "gpu")
  why = attention.sampler_mismatch("bfloat16", None, "plain")
  assert why and "pallas_paged_attention" in why and "scales q" in why, why
  assert attention.sampler_mismatch("float32", None, "plain") is None  # gather_grouped in f32
