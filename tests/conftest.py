"""Test setup: an 8-device CPU mesh, set once before jax is imported.

Different device counts in different files silently break each other, so this
is the only place that sets XLA_FLAGS for the test suite.
"""

import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

# Compile flags of the test bench. Most tests compile far more than they compute (tiny models,
# hundreds of programs): XLA:CPU's LLVM backend at -O0 and its classic fused-loop emitters (no
# MLIR fusion emitters) compile about 3x faster and run slower. They apply in this process and
# in the runs tests start with TEST_XLA_FLAGS; tests check what benchmark smoke runs print, never
# their speed (timings come from running a benchmark itself); AOT tests compile for TPU.
# Trainer runs that train a supervised warm start (hundreds of steps: tiny_cpu:runlocal's, the
# reasoning task's) or sample a 151k vocabulary compute more than they compile: they keep XLA's
# default level (WARM_START_XLA_FLAGS), as do test_damaged_checkpoints' runs (from a stored warm
# start, but measured quicker at the default too: 39 / 49 CPU-s for its fallback test).
# Measured 2026-12-06, CPU-s, fast flags / default: 26 / 77 (test_packing_step's fixed
# micro-batch tests), 14 / 43 (test_optimizer's trainer run); 58 / 34 (test_inspect's README
# run), 140 / 65 (the 7B :runlocal on a model dir).
# FIPO_TEST_XLA_FLAGS="" runs the whole suite at the default level.
TEST_XLA_FLAGS = os.environ.get(
  "FIPO_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
WARM_START_XLA_FLAGS = ""
os.environ["XLA_FLAGS"] = (
  f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def child_env(*, devices: int = 1, flags: str = TEST_XLA_FLAGS, **extra: str) -> dict[str, str]:
  """The environment of a process a test starts (a CLI run, a benchmark): this one's, with JAX
  on CPU, `devices` host devices (default one: runs that do not need the 8-device mesh compile
  fastest and reproduce bit for bit) and the compile `flags` (TEST_XLA_FLAGS, or
  WARM_START_XLA_FLAGS for runs that compute more than they compile); `extra` on top."""
  count = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flags} {count}".strip(), **extra}


def aot_env() -> dict[str, str]:
  """The environment of a process that compiles for a TPU topology through libtpu (no TPU
  needed): this one's without the CPU test bench's XLA_FLAGS and JAX_PLATFORMS."""
  return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def _compilation_cache_dir() -> pathlib.Path:
  """One persistent compilation cache per test run, shared by the xdist workers and by the runs
  they start as subprocesses (which inherit the environment): dozens of tests compile the same
  small programs (tiny_cpu's steps, the sampler). Caches of runs over a day old are removed."""
  root = pathlib.Path(tempfile.gettempdir()) / "fipo_jax_test_jax_cache"
  for old in root.glob("*") if root.is_dir() else ():
    if time.time() - old.stat().st_mtime > 86400:
      shutil.rmtree(old, ignore_errors=True)
  return root / os.environ.get("PYTEST_XDIST_TESTRUNUID", f"pid{os.getpid()}")


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_compilation_cache_dir())
# Every program, not only those over jax's default 1 s: the tiny recipe's runs compile many
# small ones (measured 2026-12-06, test_config_cli + test_grpo + test_reliability_inputs from a
# cold cache: 414 CPU-s against 453).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTDATA = ROOT / "tests" / "testdata"
# Golden files recorded from the official implementation (tests/testdata/golden/README.md);
# FIPO_GOLDEN_DIR points the tests at another copy, e.g. the full set with held-out cases.
GOLDEN_DIR = pathlib.Path(os.environ.get("FIPO_GOLDEN_DIR", TESTDATA / "golden"))
sys.path.insert(0, str(ROOT))


def hlo_op_sizes(hlo: str, ops) -> list[tuple[str, int]]:
  """(op, elements of its result) of each instruction of optimized HLO text whose op is one of
  `ops` (e.g. the collectives, to find one that moves a pool- or block-sized array)."""
  pattern = re.compile(rf"= \w+\[([\d,]*)\]\S* ({'|'.join(map(re.escape, ops))})\(")
  return [(m[2], int(np.prod([int(d) for d in m[1].split(",") if d])))
          for m in pattern.finditer(hlo)]  # fmt: skip


# Seconds per test file of a full run (tests/durations.json), to start the longest files
# first: `--dist loadfile` (pyproject.toml) hands each file whole to one xdist worker (so module
# fixtures run once), and two workers finish together only if no long file is left for the end.
# Rough numbers suffice (a file's sum of `pytest --durations=0` will do); a new file runs last.
DURATIONS = ROOT / "tests" / "durations.json"


def pytest_collection_modifyitems(config, items):
  """Orders the files longest first (files missing from tests/durations.json last), keeping the
  order of tests within a file. xdist workers collect alike, so the order is the same on each."""
  import json  # noqa: PLC0415

  seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
  first_seen = {}
  for i, item in enumerate(items):
    first_seen.setdefault(item.nodeid.split("::")[0], i)
  items.sort(key=lambda item: (-seconds.get(path := item.nodeid.split("::")[0], 0.0),
                               first_seen[path]))


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  if not GOLDEN_DIR.exists():
    pytest.fail(f"golden files not found at {GOLDEN_DIR} (see FIPO_GOLDEN_DIR)")
  return GOLDEN_DIR


@pytest.fixture(scope="session")
def testdata() -> pathlib.Path:
  return TESTDATA


# The real Qwen2.5 tokenizer (tests/testdata/qwen2_5_tokenizer/README.md), tokenizer.json xz-packed.
QWEN_TOKENIZER = TESTDATA / "qwen2_5_tokenizer"
QWEN_TOKENIZER_FILES = ("tokenizer_config.json", "chat_template.jinja")
# Special-token ids of the real Qwen2.5 vocabulary (base models: eos = pad = <|endoftext|>).
QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = 151643, 151644, 151645
QWEN_VOCAB_SIZE = 151936  # the embedding rows of every Qwen2.5 model (151665 tokens, padded)


def write_qwen_tokenizer(out_dir) -> pathlib.Path:
  """Writes the Qwen2.5 tokenizer files (tokenizer.json unpacked) into `out_dir`; returns it."""
  import lzma  # noqa: PLC0415
  import shutil  # noqa: PLC0415

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with lzma.open(QWEN_TOKENIZER / "tokenizer.json.xz") as src:
    (out / "tokenizer.json").write_bytes(src.read())
  for name in QWEN_TOKENIZER_FILES:
    shutil.copyfile(QWEN_TOKENIZER / name, out / name)
  return out


def write_tiny_qwen_model(out_dir, seed: int = 0, **config_overrides) -> pathlib.Path:
  """Writes a tiny random Qwen2.5-shaped HF model (safetensors) plus the Qwen2.5 tokenizer.

  Architecture: Qwen2, vocab 151936, hidden 32, 2 layers, 4 heads / 2 kv heads (head_dim 8),
  intermediate 64, tied embeddings, rope_theta 1e6, 32768 positions; bos = eos = pad = 151643
  (<|endoftext|>, as in the Qwen2.5 base configs). Weights: transformers' default init under
  `torch.manual_seed(seed)`, so the same call writes the same files. `config_overrides` go to
  `transformers.Qwen2Config`.
  """
  import torch  # noqa: PLC0415 (slow imports, only for tests that need a model)
  import transformers  # noqa: PLC0415

  kw = dict(
    vocab_size=QWEN_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    bos_token_id=QWEN_ENDOFTEXT,
    eos_token_id=QWEN_ENDOFTEXT,
    pad_token_id=QWEN_ENDOFTEXT,
  )
  kw.update(config_overrides)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).to(torch.float32)
  out = write_qwen_tokenizer(out_dir)
  model.save_pretrained(out, safe_serialization=True)
  return out


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  """A directory holding the real Qwen2.5 tokenizer, as an HF download has it.

  Files: tokenizer.json, tokenizer_config.json (eos = pad = <|endoftext|> 151643, no bos) and the
  Qwen2.5 chat_template.jinja (default system prompt "You are Qwen, ..."; <|im_start|> 151644,
  <|im_end|> 151645). `transformers.AutoTokenizer.from_pretrained(dir)` loads it (~4 s).
  Session-scoped and shared: do not write into it.
  """
  return write_qwen_tokenizer(tmp_path_factory.mktemp("qwen2_5_tokenizer"))


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny random Qwen2.5-shaped HF model directory with the real Qwen2.5 tokenizer.

  What `--config.model.hf_dir` expects: config.json (model_type qwen2, vocab 151936, hidden 32,
  2 layers, 4 heads, 2 kv heads, intermediate 64, tied embeddings, 32768 positions,
  bos = eos = pad = 151643), generation_config.json, model.safetensors (float32, ~20 MB, seeded)
  and the tokenizer files of `qwen_tokenizer_dir`. The weights are random: greedy outputs are
  arbitrary tokens, so tests should bound response lengths and not expect EOS. Session-scoped and
  shared: do not write into it (call `conftest.write_tiny_qwen_model(path, ...)` for a private
  or differently shaped copy).
  """
  return write_tiny_qwen_model(tmp_path_factory.mktemp("qwen2_5_tiny"))


@pytest.fixture
def dapo_parquet(tmp_path):
  """A factory: `dapo_parquet(name="train", n=8, n_long=0, long_words=400)` writes DAPO-Math-17k
  rows (tests/dapo_rows.py: verl schema, rule-lighteval/MATH_v2, uuid index) to
  `tmp_path/<name>.parquet` and returns the path."""
  import dapo_rows  # noqa: PLC0415 (tests/ is on sys.path under pytest)

  def write(name: str = "train", n: int = 8, **kw) -> pathlib.Path:
    return dapo_rows.write_parquet(tmp_path / f"{name}.parquet", dapo_rows.rows(n, **kw))

  return write


def write_tiny_cpu_sft_cache(workdir) -> None:
  """tests/testdata/tiny_cpu_sft.npz (tiny_cpu's warm start) as the run's WORKDIR/sft cache,

  so a tiny_cpu run in `workdir` skips its supervised warm start.
  """
  import numpy as np  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415

  tree: dict = {}
  for key, value in np.load(TESTDATA / "tiny_cpu_sft.npz").items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(str(pathlib.Path(workdir) / "sft"), tree)
  ckptr.wait_until_finished()


@pytest.fixture(scope="session")
def warm_server():
  """The server that test files' CLI runs fork from (tests/warm_python.py), one per xdist
  worker: it imports what the CLIs import once, and each run skips ~10 CPU-s of imports. A file
  takes its runs' environment with `warm_server.with_env(env)`."""
  import warm_python  # noqa: PLC0415

  server = warm_python.WarmPython(child_env())
  yield server
  server.close()


@pytest.fixture(scope="session")
def aot_warm(warm_server):
  """The warm server's runs in `aot_env()`: children that compile for a TPU topology through
  libtpu (`python -m fipo_jax.aot`, probes started with `-c`). The probe modules need not
  import conftest, whose CPU settings a probe child importing them would pick up."""
  return warm_server.with_env(aot_env())
