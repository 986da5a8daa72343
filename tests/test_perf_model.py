"""fipo_jax.perf_model on small programs compiled for the CPU, and on hand-written HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from fipo_jax import perf_model as pm
from fipo_jax import sharding


def _hlo(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.as_text(), compiled.cost_analysis()


def _scan(w, x):
  return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]


def test_a_loop_free_program_costs_what_xla_says():
  text, xla = _hlo(lambda w, x: jnp.tanh(x @ w), jnp.ones((64, 32)), jnp.ones((8, 64)))
  cost = pm.program_cost(text)
  assert cost.flops == 2 * 8 * 64 * 32 <= xla["flops"]  # XLA adds the elementwise ops
  # The matmul reads both operands and writes its result, tanh reads and writes that again.
  assert cost.hbm_bytes == xla["bytes accessed"] == 4 * (64 * 32 + 8 * 64 + 3 * 8 * 32)
  assert cost.total_collective_bytes == 0


def test_scans_count_every_iteration():
  x = jnp.ones((8, 64))
  costs = {n: pm.program_cost(_hlo(_scan, jnp.ones((n, 64, 64)), x)[0]) for n in (2, 4, 8)}
  for n, c in costs.items():
    assert c.flops == n * 2 * 8 * 64 * 64
  # Bytes grow linearly with the length: each layer reads its weights (64 x 64 f32) once.
  per_layer = (costs[8].hbm_bytes - costs[4].hbm_bytes) / 4
  assert per_layer == pytest.approx((costs[4].hbm_bytes - costs[2].hbm_bytes) / 2)
  assert per_layer >= 64 * 64 * 4
  _, xla = _hlo(_scan, jnp.ones((8, 64, 64)), x)
  assert xla["flops"] < costs[8].flops  # XLA counts the body once


def test_loops_of_unknown_length_take_the_stated_trips():
  def fn(w, x, n):
    return jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)

  text, _ = _hlo(fn, jnp.ones((64, 64)), jnp.ones((8, 64)), jnp.int32(3))
  one, ten = pm.program_cost(text, (1,)), pm.program_cost(text, (10,))
  assert one.flops == 2 * 8 * 64 * 64 and ten.flops == 10 * one.flops
  assert ten.hbm_bytes > 9 * 64 * 64 * 4


def test_collectives_by_kind_and_weight_allgathers():
  mesh = sharding.make_mesh(1, 8, 1)
  w = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, PartitionSpec("fsdp")))
  x = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, PartitionSpec()))
  gather = jax.jit(lambda w, x: x @ w, out_shardings=NamedSharding(mesh, PartitionSpec()))
  cost = pm.program_cost(gather.lower(w, x).compile().as_text())
  got = cost.collective_bytes
  assert sum(got.values()) > 0 and set(k for k, v in got.items() if v) <= set(pm.COLLECTIVES)
  # Whichever way XLA partitions it, something crosses chips; a weight gather is recognised
  # by its result's shape.
  gathered = pm.weight_allgather_bytes(cost.all_gathers, [(64, 32)])
  assert gathered in (0, 64 * 32 * 4)
  ag = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, PartitionSpec()))
  cost = pm.program_cost(ag.lower(w).compile().as_text())
  assert cost.collective_bytes["all-gather"] == 64 * 32 * 4
  assert pm.weight_allgather_bytes(cost.all_gathers, [(64, 32)]) == 64 * 32 * 4
  assert pm.weight_allgather_bytes(cost.all_gathers, [(3, 5)]) == 0
  ids = [("s32[64,32]{1,0}", 8192.0), ("pred[64,32]{1,0}", 2048.0)]  # not weights
  assert pm.weight_allgather_bytes(ids, [(64, 32)]) == 0


_CUSTOM = """HloModule m

ENTRY %main (p0: f32[128,256], p1: bf16[64]) -> f32[16] {
  %p0 = f32[128,256]{1,0} parameter(0)
  %p1 = bf16[64]{0} parameter(1)
  %k = f32[16]{0} custom-call(%p0, %p1), custom_call_target="tpu_custom_call"%s
  ROOT %n = f32[16]{0} negate(%k)
}
"""


def test_custom_calls_count_their_operands_or_their_estimate():
  cost = pm.program_cost(_CUSTOM.replace("%s", ""))
  kernel = 128 * 256 * 4 + 64 * 2 + 16 * 4
  assert cost.hbm_bytes == kernel + 2 * 16 * 4 and cost.custom_calls == 1 and cost.flops == 0
  est = ', backend_config={"cost_estimate":{"flops":"1000","bytes_accessed":"777"}}'
  cost = pm.program_cost(_CUSTOM.replace("%s", est))
  assert cost.hbm_bytes == 777 + 2 * 16 * 4 and cost.flops == 1000


_WHILE = """HloModule w

%cond (p: (s32[], f32[32])) -> pred[] {
  %p = (s32[], f32[32]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (q: (s32[], f32[32])) -> (s32[], f32[32]) {
  %q = (s32[], f32[32]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %x = f32[32]{0} get-tuple-element(%q), index=1
  %y = f32[32]{0} exponential(%x)
  %one = s32[] constant(1)
  %k = s32[] add(%j, %one)
  ROOT %t = (s32[], f32[32]{0}) tuple(%k, %y)
}

ENTRY %main (a: f32[32]) -> f32[32] {
  %a = f32[32]{0} parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[32]{0}) tuple(%z, %a)
  %w = (s32[], f32[32]{0}) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[32]{0} get-tuple-element(%w), index=1
}
"""


def test_a_constant_loop_bound_is_its_trip_count():
  cost = pm.program_cost(_WHILE, (99,), top=3)
  # 5 x (exp: 256 bytes, add: 12 bytes), the compare runs 5 times (12 bytes each)
  assert cost.hbm_bytes == 5 * (32 * 4 * 2 + 12) + 5 * 9
  assert cost.top[0][1] == "y" and cost.top[0][3] == 5


def test_roofline_and_the_rl_step():
  chip = pm.CHIPS["v5p"]
  assert pm.roofline_seconds(chip.bf16_flops, 0, 0, chip) == 1.0
  assert pm.roofline_seconds(0, 2 * chip.hbm_bandwidth, 0, chip) == 2.0
  assert pm.roofline_seconds(1, 1, 3 * chip.ici_bandwidth, chip) == 3.0
  step = pm.RLStep(prompts=4, responses=16, mean_prompt=10, mean_response=100, num_slots=8,
                   prefill_rows=4, insert_rows=8, updates=2, log_prob_passes=1)
  secs = dict(decode=0.01, handover=1.0, prefill=0.5, insert=0.25, old_log_prob=2.0,
              train_step=3.0)
  out = pm.rl_step_seconds(step, secs, chips=2)
  gen = 200 * 0.01 + 1.0 + 1 * 0.5 + 2 * 0.25
  assert out["rl_step_seconds_by_phase"] == {"generate": gen, "old_log_prob": 2.0, "update": 6.0}
  assert out["rl_step_seconds"] == gen + 8.0
  assert sum(out["rl_step_split"].values()) == pytest.approx(1.0)
  np.testing.assert_allclose(out["rl_tokens_per_s_per_chip"], 16 * 110 / (gen + 8.0) / 2)


_CONV = """HloModule c

ENTRY %main (a: bf16[12288,2,224,1], b: bf16[2,224,28,128]) -> bf16[12288,28,128,1] {
  %a = bf16[12288,2,224,1]{0,2,1,3} parameter(0)
  %b = bf16[2,224,28,128]{3,1,0,2} parameter(1)
  ROOT %c = bf16[12288,28,128,1]{2,0,3,1} convolution(%a, %b), WINDOW
}
""".replace("WINDOW",
           "window={size=28x2 pad=27_27x0_0 rhs_reversal=1x0}, dim_labels=b1f0_1i0o->b0f1")


def test_a_dot_written_as_a_convolution_counts_its_real_macs():
  # The TPU compiler's form of [12288, 448] x [448, 28 x 128]: the window of 28 lies over
  # padding but for one position, so each output sums 2 x 224 products.
  assert pm.program_cost(_CONV).flops == 2 * 12288 * 28 * 128 * 2 * 224


# A layer scan's matmul as the TPU compiler fuses it: the stacked weights of all 8 layers go in
# whole, a nested fusion slices out the current layer (dynamic-slice, bitcast), a convert reads
# it as f32.
_NESTED = """HloModule n

%slice_layer (w0: bf16[8,64,32], i0: s32[]) -> bf16[64,32] {
  %w0 = bf16[8,64,32]{2,1,0} parameter(0)
  %i0 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = bf16[1,64,32]{2,1,0} dynamic-slice(%w0, %i0, %zero, %zero), dynamic_slice_sizes={1,64,32}
  ROOT %bc = bf16[64,32]{1,0} bitcast(%ds)
}

%matmul (w1: bf16[8,64,32], i1: s32[], x1: f32[4,64]) -> f32[4,32] {
  %w1 = bf16[8,64,32]{2,1,0} parameter(0)
  %i1 = s32[] parameter(1)
  %x1 = f32[4,64]{1,0} parameter(2)
  %cv = f32[8,64,32]{2,1,0} convert(%w1)
  %layer = f32[64,32]{1,0} fusion(%cv, %i1), kind=kLoop, calls=%slice_layer_f32
  ROOT %d = f32[4,32]{1,0} dot(%x1, %layer), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%slice_layer_f32 (w2: f32[8,64,32], i2: s32[]) -> f32[64,32] {
  %w2 = f32[8,64,32]{2,1,0} parameter(0)
  %i2 = s32[] parameter(1)
  %zero2 = s32[] constant(0)
  %ds2 = f32[1,64,32]{2,1,0} dynamic-slice(%w2, %i2, %zero2, %zero2), dynamic_slice_sizes={1,64,32}
  ROOT %bc2 = f32[64,32]{1,0} bitcast(%ds2)
}

%matmul2 (w3: bf16[8,64,32], i3: s32[], x3: bf16[4,64]) -> bf16[4,32] {
  %w3 = bf16[8,64,32]{2,1,0} parameter(0)
  %i3 = s32[] parameter(1)
  %x3 = bf16[4,64]{1,0} parameter(2)
  %layer3 = bf16[64,32]{1,0} fusion(%w3, %i3), kind=kLoop, calls=%slice_layer
  ROOT %d3 = bf16[4,32]{1,0} convolution(%x3, %layer3), dim_labels=bf_io->bf
}

ENTRY %main (w: bf16[8,64,32], i: s32[], x: f32[4,64], y: bf16[4,64]) -> (f32[4,32], bf16[4,32]) {
  %w = bf16[8,64,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[4,64]{1,0} parameter(2)
  %y = bf16[4,64]{1,0} parameter(3)
  %f = f32[4,32]{1,0} fusion(%w, %i, %x), kind=kOutput, calls=%matmul
  %g = bf16[4,32]{1,0} fusion(%w, %i, %y), kind=kOutput, calls=%matmul2
  ROOT %t = (f32[4,32]{1,0}, bf16[4,32]{1,0}) tuple(%f, %g)
}
"""


def test_stacked_weights_read_through_a_nested_slice_count_one_layer():
  cost = pm.program_cost(_NESTED, top=2)
  layer = 64 * 32 * 2  # one layer of the bf16 weights, not all 8
  f = layer + 4 + 4 * 64 * 4 + 4 * 32 * 4  # via the convert: its bf16 source bytes
  g = layer + 4 + 4 * 64 * 2 + 4 * 32 * 2
  assert {t[1]: t[0] for t in cost.top} == {"f": f, "g": g}
  # Another use of the stacked weights than a slice reads them whole.
  whole = pm.program_cost(_NESTED.replace("%d3 = bf16[4,32]{1,0} convolution(%x3, %layer3)",
                                          "%d3 = bf16[4,32]{1,0} convolution(%x3, %w3)"), top=2)
  assert {t[1]: t[0] for t in whole.top}["g"] == 8 * layer + 4 + 4 * 64 * 2 + 4 * 32 * 2


def test_a_named_kernel_counts_the_bytes_stated_for_it():
  meta = ', metadata={op_name="jit(f)/ragged_paged_attention_kernel/pallas_call"}'
  est = ', backend_config={"cost_estimate":{"flops":"1000","bytes_accessed":"777"}}'
  for attrs in (meta, meta + est):
    text = _CUSTOM.replace("%s", attrs)
    cost = pm.program_cost(text, kernel_bytes={"ragged_paged_attention": 5000.0})
    assert cost.hbm_bytes == 5000 + 2 * 16 * 4
    other = pm.program_cost(text, kernel_bytes={"flash_attention": 5000.0})
    assert other.hbm_bytes != cost.hbm_bytes  # a key the call does not carry changes nothing
  with pytest.raises(ValueError, match="> 0"):
    pm.program_cost(text, kernel_bytes={"ragged_paged_attention": 0})


def test_aot_states_the_ragged_kernel_at_its_fill(monkeypatch):
  from types import SimpleNamespace as NS  # noqa: PLC0415

  from fipo_jax import aot, aot_phases  # noqa: PLC0415

  monkeypatch.setattr(aot_phases, "kv_bytes_per_chip", lambda p, live: 1000.0 * live)
  layout = NS(decode_kernel="ragged_paged_attention")
  eng = NS(paged=True, layout=layout, mesh=NS(shape={"data": 2, "fsdp": 1, "tensor": 2}),
           model_cfg=NS(num_layers=4, num_heads=8, head_dim=128), cfg=NS(num_slots=32),
           param_dtype=jnp.dtype(jnp.bfloat16))
  p = NS(engine=eng)
  # One layer's live K/V, plus q in and out: 16 local slots x 4 local heads x 128 x bf16.
  want = 1000.0 * 100 / 4 + 2 * 16 * 4 * 128 * 2
  assert aot.decode_kernel_bytes(p, 100) == {"ragged_paged_attention": want}
  layout.decode_kernel = "gather_grouped"  # its reads show in its HLO: no stated bytes
  assert aot.decode_kernel_bytes(p, 100) is None


# A counted loop as the TPU compiler writes it: `i = INIT; while i < BOUND: i += STEP` (the
# windowed einsums of an FSDP matmul step by 2), nested in an outer loop of 3.
_LOOPS = """HloModule l

%icond (p: (s32[], f32[32])) -> pred[] {
  %p = (s32[], f32[32]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(BOUND)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%ibody (q: (s32[], f32[32])) -> (s32[], f32[32]) {
  %q = (s32[], f32[32]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %x = f32[32]{0} get-tuple-element(%q), index=1
  %y = f32[32]{0} exponential(%x)
  %step = s32[] constant(STEP)
  %k = s32[] add(%j, %step)
  ROOT %t = (s32[], f32[32]{0}) tuple(%k, %y)
}

%ocond (op: (s32[], f32[32])) -> pred[] {
  %op = (s32[], f32[32]{0}) parameter(0)
  %oi = s32[] get-tuple-element(%op), index=0
  %three = s32[] constant(3)
  ROOT %olt = pred[] compare(%oi, %three), direction=LT
}

%obody (oq: (s32[], f32[32])) -> (s32[], f32[32]) {
  %oq = (s32[], f32[32]{0}) parameter(0)
  %oj = s32[] get-tuple-element(%oq), index=0
  %ox = f32[32]{0} get-tuple-element(%oq), index=1
  %init = s32[] constant(INIT)
  %i0 = s32[] copy(%init)
  %it = (s32[], f32[32]{0}) tuple(%i0, %ox)
  %w = (s32[], f32[32]{0}) while(%it), condition=%icond, body=%ibody
  %oy = f32[32]{0} get-tuple-element(%w), index=1
  %one = s32[] constant(1)
  %ok = s32[] add(%oj, %one)
  ROOT %ot = (s32[], f32[32]{0}) tuple(%ok, %oy)
}

ENTRY %main (a: f32[32]) -> f32[32] {
  %a = f32[32]{0} parameter(0)
  %z = s32[] constant(0)
  %t0 = (s32[], f32[32]{0}) tuple(%z, %a)
  %ow = (s32[], f32[32]{0}) while(%t0), condition=%ocond, body=%obody
  ROOT %r = f32[32]{0} get-tuple-element(%ow), index=1
}
"""


def _loops(bound, step, init=0):
  """(bytes, name, op, times) of the inner body's exponential."""
  text = _LOOPS.replace("BOUND", str(bound)).replace("STEP", str(step))
  top = pm.program_cost(text.replace("INIT", str(init)), (7,), top=99).top
  return next((t for t in top if t[1] == "y"), (0.0, "y", "exponential", 0))


def test_a_counted_loop_runs_bound_minus_init_over_step_times_per_outer_trip():
  exp = 32 * 4 * 2  # the exponential reads and writes f32[32]
  assert _loops(8, 1)[3] == 3 * 8
  assert _loops(8, 2) == (3 * 4 * exp, "y", "exponential", 12)  # was 24: the step was taken as 1
  assert _loops(8, 3, init=2)[3] == 3 * 2
  assert _loops(2, 1, init=5)[3] == 0
  # A counter moved by something else than a constant: the loop's length is unknown.
  text = _LOOPS.replace("BOUND", "8").replace("INIT", "0")
  text = text.replace("%step = s32[] constant(STEP)", "%step = s32[] multiply(%j, %j)")
  assert next(t for t in pm.program_cost(text, (7,), top=99).top if t[1] == "y")[3] == 3 * 7


# A micro-batch guard: a conditional whose cheap branch skips the work of the other.
_COND = """HloModule c

%skip (s: f32[1024]) -> f32[1024] {
  ROOT %s = f32[1024]{0} parameter(0)
}

%work (x: f32[1024]) -> f32[1024] {
  %x = f32[1024]{0} parameter(0)
  %e = f32[1024]{0} exponential(%x)
  ROOT %l = f32[1024]{0} log(%e)
}

ENTRY %main (p: pred[], a: f32[1024]) -> f32[1024] {
  %p = pred[] parameter(0)
  %a = f32[1024]{0} parameter(1)
  %n = f32[1024]{0} negate(%a)
  ROOT %c = f32[1024]{0} conditional(%p, %n, %n), true_computation=%work, false_computation=%skip
}
"""


def test_a_conditional_costs_its_costliest_branch_once():
  arr = 1024 * 4
  work = 2 * 2 * arr  # exp and log each read and write f32[1024]
  assert pm.program_cost(_COND).hbm_bytes == 2 * arr + work
  both = _COND.replace("ROOT %s = f32[1024]{0} parameter(0)", "%s0 = f32[1024]{0} parameter(0)\n"
                       "  ROOT %s = f32[1024]{0} sine(%s0)")
  assert pm.program_cost(both).hbm_bytes == 2 * arr + work  # not work + the sine's 2 x arr
  swapped = both.replace("true_computation=%work, false_computation=%skip",
                         "branch_computations={%skip, %work}")
  assert pm.program_cost(swapped).hbm_bytes == 2 * arr + work


# A Pallas kernel as the TPU compiler prints it: its metadata string carries a newline, and its
# backend config (here with a cost estimate) follows on the next lines.
_PALLAS = """HloModule p

ENTRY %main (q: bf16[4,256,128]) -> bf16[4,256,128] {
  %q = bf16[4,256,128]{2,1,0} parameter(0)
  %k = bf16[4,256,128]{2,1,0} custom-call(%q), TARGET, frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="jit(f)/splash_mha_fwd_segmented/pallas_call"}, backend_config=ESTIMATE
  ROOT %n = bf16[4,256,128]{2,1,0} negate(%k)
}
""".replace("TARGET", 'custom_call_target="tpu_custom_call"')


def test_a_kernel_on_several_lines_keeps_its_estimate_or_states_its_flops():
  est = '{"cost_estimate":{"flops":"4000","bytes_accessed":"900"}}'
  cost = pm.program_cost(_PALLAS.replace("ESTIMATE", est))
  arr = 4 * 256 * 128 * 2
  assert cost.flops == 4000 and cost.hbm_bytes == 900 + 2 * arr and not cost.flopless_kernels
  bare = _PALLAS.replace("ESTIMATE", '{"custom_call_config":{}}')
  cost = pm.program_cost(bare)
  assert cost.flops == 0 and cost.flopless_kernels == ["k"] and cost.hbm_bytes == 4 * arr
  stated = pm.program_cost(bare, kernel_flops={"splash_mha_fwd": 1e9, "splash_mha_dq": 5.0})
  assert stated.flops == 1e9 and not stated.flopless_kernels
  with pytest.raises(ValueError, match="kernel_flops must be > 0"):
    pm.program_cost(bare, kernel_flops={"splash_mha_fwd": 0.0})


def test_splash_states_the_flops_of_its_live_causal_blocks():
  from types import SimpleNamespace as NS  # noqa: PLC0415

  from fipo_jax import aot_phases  # noqa: PLC0415

  mcfg = NS(num_heads=8, num_kv_heads=2, head_dim=64, attention_block_size=512)
  # 1000 tokens pad to 1024 = 2 blocks of 512: 3 live blocks of 512 x 512 per head.
  per_matmul = 2.0 * 3 * 8 * 3 * 512 * 512 * 64  # 3 rows, 8 heads
  got = aot_phases.splash_kernel_flops(mcfg, sharding.make_mesh(1, 8, 1), 3, 1000)
  assert got == {"splash_mha_fwd": 2 * per_matmul, "splash_mha_dq": 3 * per_matmul,
                 "splash_mha_dkv": 4 * per_matmul}
  # Heads split over the tensor axis with the KV heads.
  tp = aot_phases.splash_kernel_flops(mcfg, sharding.make_mesh(1, 4, 2), 3, 1000)
  assert tp["splash_mha_fwd"] == per_matmul


def test_the_cli_recounts_saved_hlo(tmp_path):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  # As the README shows: `python -m fipo_jax.perf_model DIR v5p 64 34`, here with TOP = 1.
  (tmp_path / "train_step.hlo.txt").write_text(_LOOPS.replace("BOUND", "8").replace(
    "STEP", "2").replace("INIT", "0"))
  (tmp_path / "decode.hlo.txt").write_text(_WHILE)
  out = subprocess.run([sys.executable, "-m", "fipo_jax.perf_model", str(tmp_path), "v5p", "5",
                        "34", "1"], capture_output=True, text=True, check=True).stdout.splitlines()
  assert out[0].startswith("decode ") and out[2].startswith("train_step ")
  # decode: the loop of 5 trips per call of 5 steps is one step; per step, the exponential.
  assert out[1].split()[:4] == [f"{32 * 4 * 2 / 1e9:.3f}", "GB", "exponential", "y"]
  assert out[1].split()[4] == "x1"
  assert out[3].split()[2:5] == ["exponential", "y", "x12"]
  assert "kernels without FLOPs 0" in out[2]
