"""Weights staged from the trainer's devices onto a disjoint sampler mesh (sampling/staging.py).

The 8 test devices split 4/4 (and 6/2): params in an FSDP layout on the trainer's devices land
in the sampler's layout and dtype on the others, bit for bit after the cast, without a copy
through host memory. One slow test runs 2 processes x 4 devices (2 + 2 each) under
jax.distributed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fipo_jax import models, sharding
from fipo_jax.sampling import staging

REPO = pathlib.Path(__file__).resolve().parents[1]


def _dev(process: int, i: int):
  return types.SimpleNamespace(process_index=process, id=process * 100 + i)


def test_split_devices_gives_each_process_last_k_to_the_sampler():
  devices = jax.devices()
  trainer, sampler = staging.split_devices(devices, 3)
  assert trainer == devices[:5] and sampler == devices[5:]
  procs = {p: [_dev(p, i) for i in range(4)] for p in (1, 0)}
  trainer, sampler = staging.split_devices(procs, 1)
  assert [d.id for d in trainer] == [0, 1, 2, 100, 101, 102]
  assert [d.id for d in sampler] == [3, 103]
  # A flat list in any process order is grouped by process_index, local order kept.
  flat = [procs[1][0], procs[0][0], procs[1][1], procs[0][1], procs[0][2], procs[1][2],
          procs[0][3], procs[1][3]]
  trainer, sampler = staging.split_devices(flat, 2)
  assert [d.id for d in trainer] == [0, 1, 100, 101]
  assert [d.id for d in sampler] == [2, 3, 102, 103]
  # Meshes reshaped from either list keep each process's devices in their own rows.
  rows = np.asarray([d.process_index for d in sampler]).reshape(2, 2)
  assert (rows == rows[:, :1]).all()


@pytest.mark.parametrize("k", [0, 4, -1, 5, 1.5, True, None])
def test_split_devices_refuses_a_split_that_leaves_a_side_empty(k):
  with pytest.raises(ValueError, match=r"between 1 and 3 \(each process has 4 local devices\)"):
    staging.split_devices({0: [_dev(0, i) for i in range(4)]}, k)


def test_split_devices_refuses_uneven_processes():
  with pytest.raises(ValueError, match="different local device counts"):
    staging.split_devices([_dev(0, 0), _dev(0, 1), _dev(1, 0)], 1)
  with pytest.raises(ValueError, match="at least one device"):
    staging.split_devices({}, 1)


def _meshes(k: int):
  """(trainer FSDP mesh, sampler data x tensor mesh) over the 8 devices, k for the sampler;
  the sampler's devices in reverse order, so no position matches the trainer's by accident."""
  trainer, sampler = staging.split_devices(jax.devices(), k)
  return (Mesh(np.asarray(trainer).reshape(1, -1), ("data", "fsdp")),
          Mesh(np.asarray(sampler[::-1]).reshape(-1, 2), ("data", "tensor")))


def _host_value(x) -> np.ndarray:
  """x's value assembled from its shards (np.asarray(x) would cache a host copy on x)."""
  out = np.zeros(x.shape, x.dtype)
  for s in x.addressable_shards:
    out[s.index] = np.asarray(s.data)
  return out


def _no_host_transfers():
  """Refuses every transfer to or from the host, explicit ones too, and allows device to device.

  jax.transfer_guard("disallow") would not do: it never checks an explicit jax.device_put, so a
  device_put that stages through the host passes it (seen on jax 0.10.2 CPU).
  """
  guards = contextlib.ExitStack()
  guards.enter_context(jax.transfer_guard_host_to_device("disallow_explicit"))
  guards.enter_context(jax.transfer_guard_device_to_host("disallow_explicit"))
  return guards


@pytest.mark.parametrize("k", [4, 2])  # 4/4, and 6 trainer devices per 2 sampler devices
def test_stage_is_bit_exact_on_the_sampler_devices_without_the_host(k):
  train_mesh, sampler_mesh = _meshes(k)
  rng = np.random.default_rng(0)
  ref = {"w": rng.normal(size=(48, 32)).astype(np.float32),
         "b": rng.normal(size=(24,)).astype(np.float32),
         "count": np.arange(12, dtype=np.int32)}
  specs = {"w": P("fsdp", None), "b": P("fsdp"), "count": P()}
  params = {n: jax.device_put(v, NamedSharding(train_mesh, specs[n])) for n, v in ref.items()}
  targets = {"w": NamedSharding(sampler_mesh, P("data", "tensor")),
             "b": NamedSharding(sampler_mesh, P("tensor")),
             "count": NamedSharding(sampler_mesh, P())}
  with _no_host_transfers():
    staged = jax.block_until_ready(staging.stage(params, targets, jnp.bfloat16))
  for name, want in ref.items():
    got = staged[name]
    want = want.astype(jnp.bfloat16) if want.dtype == np.float32 else want
    assert got.dtype == want.dtype and got.sharding == targets[name]
    assert {s.device for s in got.addressable_shards} == set(sampler_mesh.devices.flat)
    np.testing.assert_array_equal(_host_value(got).view(np.uint8), want.view(np.uint8))
    # jax.device_put across a layout change reads the source into a host copy that it caches on
    # the array (`_npy_value`; the device-to-host guard does not see that read on CPU, only the
    # host-to-device upload after it): the staged move must leave none.
    assert params[name]._npy_value is None, f"{name} was copied to the host"


def test_stager_is_async_and_compiles_once():
  train_mesh, sampler_mesh = _meshes(4)
  model_cfg = models.ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32,
                                 intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                                 head_dim=8)
  masters = sharding.shard_params(nnx.split(models.init_model(model_cfg, seed=0))[1],
                                  train_mesh)
  stager = staging.WeightStager(sharding.state_shardings(masters, sampler_mesh), jnp.bfloat16)
  assert not stager.ready() and stager.take() is None  # nothing started
  programs = []
  for step in range(2):
    params = jax.tree.map(lambda x, s=step: x + s, masters)
    stager.start(params)
    programs.append(stager._hop1)
    jax.block_until_ready(jax.tree.leaves(stager._staged))
    assert stager.ready()
    staged = stager.take()
    assert stager.take() is None and not stager.ready()  # handed over once
    for got, want in zip(jax.tree.leaves(staged), jax.tree.leaves(params), strict=True):
      assert got.dtype == jnp.bfloat16 and got.sharding.mesh == sampler_mesh
      np.testing.assert_array_equal(_host_value(got).view(np.uint16),
                                    _host_value(want).astype(jnp.bfloat16).view(np.uint16))
  # The second step reused the first's program: no compile after step 1.
  assert programs[0] is programs[1] and programs[0]._cache_size() == 1


def test_stager_refuses_overlapping_or_uneven_device_sets():
  devices = jax.devices()
  src = jax.device_put(np.zeros((8, 4), np.float32),
                       NamedSharding(Mesh(np.asarray(devices[:4]), ("fsdp",)), P("fsdp")))
  overlap = Mesh(np.asarray(devices[2:6]).reshape(2, 2), ("data", "tensor"))
  with pytest.raises(ValueError, match="overlap"):
    staging.stage({"w": src}, {"w": NamedSharding(overlap, P())})
  uneven = Mesh(np.asarray(devices[5:8]), ("data",))  # 4 trainer devices per 3 sampler devices
  with pytest.raises(ValueError, match="same whole multiple"):
    staging.stage({"w": src}, {"w": NamedSharding(uneven, P())})
  with pytest.raises(ValueError, match="one sampler mesh"):
    staging.WeightStager({"a": NamedSharding(overlap, P()), "b": NamedSharding(uneven, P())})


# One process of the 2 x 4 run: trainer = its first 2 devices, sampler = its last 2; prints the
# staged bf16 values of its sampler shards as JSON (compared with numpy by the test).
CHILD = """
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fipo_jax import distributed
from fipo_jax.sampling import staging
distributed.initialize()
trainer, sampler = staging.split_devices(jax.devices(), 2)
train_mesh = Mesh(np.asarray(trainer).reshape(1, 4), ("data", "fsdp"))
sampler_mesh = Mesh(np.asarray(sampler).reshape(2, 2), ("data", "tensor"))
ref = (np.arange(16 * 8, dtype=np.float32).reshape(16, 8) - 50.0) / 7.0
w = jax.make_array_from_callback(ref.shape, NamedSharding(train_mesh, P("fsdp", None)),
                                 lambda index: ref[index])
stager = staging.WeightStager({"w": NamedSharding(sampler_mesh, P(None, "tensor"))}, jnp.bfloat16)
with (jax.transfer_guard_host_to_device("disallow_explicit"),
      jax.transfer_guard_device_to_host("disallow_explicit")):
  stager.start({"w": w})
  got = jax.block_until_ready(stager.take()["w"])
shards = [{"local": jax.local_devices().index(s.device), "process": s.device.process_index,
           "index": [[i.start, i.stop] for i in s.index],
           "bits": np.asarray(s.data).view(np.uint16).tolist()} for s in got.addressable_shards]
print("STAGED " + json.dumps({"process": jax.process_index(), "dtype": str(got.dtype),
                              "host_copy": w._npy_value is not None, "shards": shards}))
"""


@pytest.mark.slow
def test_stage_two_processes_four_devices_each():
  import conftest  # noqa: PLC0415 (tests/ is on sys.path under pytest)

  port = portpicker.pick_unused_port()
  procs = []
  for pid in range(2):
    env = conftest.child_env(
      devices=4, FIPO_COORDINATOR=f"localhost:{port}", FIPO_NUM_PROCESSES="2",
      FIPO_PROCESS_ID=str(pid), JAX_ENABLE_COMPILATION_CACHE="false",
      PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=300)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the 2-process staging run hung (killed after 300 s)")
  ref = ((np.arange(16 * 8, dtype=np.float32).reshape(16, 8) - 50.0) / 7.0).astype(jnp.bfloat16)
  for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{out[-4000:]}"
    line = next(x for x in out.splitlines() if x.startswith("STAGED "))
    got = json.loads(line.removeprefix("STAGED "))
    assert got["process"] == pid and got["dtype"] == "bfloat16" and not got["host_copy"]
    # Each process's sampler devices are its last 2 local ones, each with a column half.
    assert sorted(s["local"] for s in got["shards"]) == [2, 3]
    assert {s["process"] for s in got["shards"]} == {pid}
    for s in got["shards"]:
      (r0, r1), (c0, c1) = ((a if a is not None else 0, b if b is not None else n)
                            for (a, b), n in zip(s["index"], ref.shape, strict=True))
      np.testing.assert_array_equal(np.asarray(s["bits"], np.uint16),
                                    ref[r0:r1, c0:c1].view(np.uint16))
    assert sorted(s["index"][1][0] or 0 for s in got["shards"]) == [0, 4]
