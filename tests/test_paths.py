"""fipo_jax.paths and the writers on it, against a fake gs:// bucket (tests/fake_gcs.py).

The bucket is a local directory behind fsspec's gs protocol and orbax's TensorStore spec, and
every test runs in an empty cwd, so a write that mistakes `gs://b/run` for a local path (it
would create `./gs:/b/run`) is caught.
"""

import json
import os
import pathlib

import fake_gcs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fipo_jax import checkpoints as ckpt_lib
from fipo_jax import metrics as metrics_lib
from fipo_jax import paths
from fipo_jax.data import verl


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  yield fake_gcs.install(tmp_path, monkeypatch)
  fake_gcs.clear_caches()


def _no_local_gs() -> None:
  assert not pathlib.Path("gs:").exists(), sorted(str(p) for p in pathlib.Path(".").rglob("*"))


def test_join_and_absolute_keep_urls():
  assert paths.join("gs://b/run", "plots", "a.png") == "gs://b/run/plots/a.png"
  assert paths.join("runs/x", "metrics.jsonl") == os.path.join("runs/x", "metrics.jsonl")
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("rel") == os.path.abspath("rel")
  assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs")


def test_local_writes_are_atomic_and_create_parents(tmp_path):
  target = tmp_path / "a" / "b" / "x.txt"
  paths.write_text(str(target), "one")
  paths.write_text(str(target), "two")
  assert target.read_text() == "two"
  assert sorted(p.name for p in target.parent.iterdir()) == ["x.txt"]  # no temporary left


def test_bucket_files_and_local_copy(bucket):
  paths.write_text("gs://b/run/sub/x.txt", "hello")
  paths.write_bytes("gs://b/run/y.bin", b"\x00\x01")
  assert (bucket / "b/run/sub/x.txt").read_text() == "hello"
  assert paths.isdir("gs://b/run/sub") and paths.isfile("gs://b/run/y.bin")
  assert not paths.isfile("gs://b/run/sub") and not paths.exists("gs://b/run/nope")
  local = pathlib.Path(paths.local_copy("gs://b/run"))
  assert (local / "sub" / "x.txt").read_text() == "hello"
  assert (local / "y.bin").read_bytes() == b"\x00\x01"
  assert not str(local).startswith(str(bucket))
  # A changed object is downloaded again; an unchanged one is not.
  stat = os.stat(local / "y.bin")
  os.utime(bucket / "b/run/sub/x.txt", (1, 1))
  (bucket / "b/run/sub/x.txt").write_text("changed")
  local_again = pathlib.Path(paths.local_copy("gs://b/run"))
  assert local_again == local and (local / "sub" / "x.txt").read_text() == "changed"
  assert os.stat(local / "y.bin").st_mtime_ns == stat.st_mtime_ns
  with pytest.raises(FileNotFoundError):
    paths.local_copy("gs://b/missing")
  _no_local_gs()


def test_upload_copies_a_tree(bucket, tmp_path):
  src = tmp_path / "tb"
  (src / "inner").mkdir(parents=True)
  (src / "events.1").write_bytes(b"abc")
  (src / "inner" / "events.2").write_bytes(b"de")
  written = paths.upload(str(src), "gs://b/run/tensorboard")
  assert sorted(written) == [
    "gs://b/run/tensorboard/events.1",
    "gs://b/run/tensorboard/inner/events.2",
  ]
  assert (bucket / "b/run/tensorboard/inner/events.2").read_bytes() == b"de"


def test_data_files_on_a_bucket(bucket):
  rows = [verl.make_row(f"Q{i}", str(i), data_source="t", index=i, split="train") for i in range(3)]
  verl.write_jsonl("gs://b/data/train.jsonl", rows)
  verl.write_parquet("gs://b/data/train.parquet", rows)
  for name in ("train.jsonl", "train.parquet"):
    src = verl.RowSource([f"gs://b/data/{name}"])
    assert len(src) == 3
    assert src[2]["reward_model"]["ground_truth"] == "2"
  _no_local_gs()


def test_metrics_writer_on_a_bucket(bucket):
  run = bucket / "b" / "run"
  w = metrics_lib.MetricsWriter("gs://b/run", plot_every=2)
  w.write(1, {"train/acc_mean": 0.5, "eval/acc_mean": float("nan")})
  w.write(2, {"train/acc_mean": 0.75, "eval/acc_mean": 0.4})  # 2nd write: plots + TB copied
  assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
  assert (run / "plots" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  w.write(3, {"train/acc_mean": 0.8})
  w.close()
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["eval/acc_mean"] is None
  # Resuming reads the bucket's history back and drops steps after the checkpoint.
  w = metrics_lib.MetricsWriter("gs://b/run", tensorboard=False, plots=False)
  assert [r["step"] for r in w.history] == [1, 2, 3]
  w.truncate_after(2)
  w.write(3, {"train/acc_mean": 0.9})
  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/acc_mean"]) for r in rows] == [(1, 0.5), (2, 0.75), (3, 0.9)]
  _no_local_gs()


def test_checkpoints_on_a_bucket(bucket):
  params, opt = {"w": jnp.arange(4.0)}, {"m": jnp.ones(2)}
  with ckpt_lib.CheckpointManager("gs://b/run/checkpoints", keep=1) as mgr:
    mgr.save(1, params=params, opt_state=opt, extra={"k": 1})
    mgr.wait()
    mgr.save(2, params={"w": params["w"] + 1}, opt_state=opt, extra={"k": 2})
  assert sorted(p.name for p in (bucket / "b/run/checkpoints").iterdir()) == ["2"]
  with ckpt_lib.CheckpointManager("gs://b/run/checkpoints", keep=1) as mgr:
    restored = mgr.restore_latest(params=params, opt_state=opt)
  assert restored.step == 2 and restored.extra == {"k": 2}
  np.testing.assert_array_equal(restored.params["w"], np.arange(4.0) + 1)
  _no_local_gs()


def test_cli_outputs_on_a_bucket(bucket, tmp_path):
  from fipo_jax.eval import cli  # noqa: PLC0415

  cli.write_json("gs://b/eval/results.json", {"metrics": {"acc": float("nan")}})
  assert json.loads((bucket / "b/eval/results.json").read_text()) == {"metrics": {"acc": None}}
  with paths.open_file("gs://b/gen/out.jsonl", "w") as f:  # what generate --output writes with
    f.write('{"a": 1}\n')
  assert (bucket / "b/gen/out.jsonl").read_text() == '{"a": 1}\n'
  local = tmp_path / "deep" / "results.json"
  cli.write_json(str(local), {"x": 1})
  assert sorted(p.name for p in local.parent.iterdir()) == ["results.json"]
  _no_local_gs()


def test_hf_directory_on_a_bucket(bucket, tmp_path):
  from flax import nnx  # noqa: PLC0415

  from fipo_jax import generate, models  # noqa: PLC0415
  from fipo_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  from fipo_jax.models import hf_io  # noqa: PLC0415

  cfg = models.get_preset(
    "qwen2.5-0.5b",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
  )
  local = tmp_path / "hf"
  models.save_pretrained(models.init_model(cfg), local, max_shard_bytes=20_000)
  tokenizer_lib.build_tokenizer(str(local / "tok"))
  for f in (local / "tok").iterdir():
    f.rename(local / f.name)
  paths.upload(str(local), "gs://b/models/tiny")
  assert hf_io.read_config("gs://b/models/tiny") == json.loads((local / "config.json").read_text())
  with pytest.raises(FileNotFoundError, match="not found"):
    hf_io.read_config("gs://b/models/none")
  got = nnx.to_pure_dict(nnx.split(models.from_pretrained("gs://b/models/tiny"))[1])
  want = nnx.to_pure_dict(nnx.split(models.from_pretrained(str(local)))[1])
  same = jax.tree.map(np.array_equal, got, want)
  assert jax.tree.leaves(same) and all(jax.tree.leaves(same))
  tok = generate.load_tokenizer("gs://b/models/tiny")  # generate --hf_dir gs://...
  assert tok is not None and tok("Q: 1")["input_ids"]
  assert generate.load_tokenizer("gs://b/models/none") is None
  _no_local_gs()
