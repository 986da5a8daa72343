"""metrics.backends with 'wandb', offline: the trainer's W&B run read back from its .wandb file.

An offline run (WANDB_MODE=offline) is one `run-<id>.wandb` file: W&B's 7-byte header, then
LevelDB-log records (32 KiB blocks; chunk = crc32 u32, length u16, type u8) holding
`wandb_internal_pb2.Record` protobufs. wandb ships no public reader for it any more, so
`_records` below is one (about 20 lines); wandb's own protos decode the payloads.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct

import fake_gcs
import jax
import pytest

pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2  # noqa: E402

from fipo_jax import config as config_lib  # noqa: E402
from fipo_jax import config_schema, metrics, wandb_backend  # noqa: E402

BLOCK = 32 * 1024


def _records(path: pathlib.Path) -> list:
  """Every Record of an offline .wandb file, in order."""
  data = path.read_bytes()
  assert data[:4] == b":W&B", data[:7]
  pos, buf, out = 7, b"", []
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    buf += data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL, LAST (FIRST=2 and MIDDLE=3 continue a record)
      out.append(wandb_internal_pb2.Record.FromString(buf))
      buf = b""
  return out


def _offline_runs(workdir: pathlib.Path) -> list[dict]:
  """Each offline run in WORKDIR/wandb, in start order: its run record, config, history."""
  runs = []
  for run_dir in sorted((workdir / "wandb").glob("offline-run-*")):
    (path,) = run_dir.glob("run-*.wandb")
    info = {"run": None, "config": {}, "history": []}
    for r in _records(path):
      kind = r.WhichOneof("record_type")
      if kind == "run":
        info["run"] = r.run
        info["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
      elif kind == "config":
        info["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
      elif kind == "history":
        row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        info["history"].append(
          {k: v for k, v in row.items() if not k.startswith("_")} | {"step": r.history.step.num}
        )
    runs.append(info)
  return runs


@pytest.fixture
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # never the user's ~/.config/wandb


def _config(total_steps):
  from configs import tiny_cpu  # noqa: PLC0415

  c = tiny_cpu.get_config("runlocal")
  c.sft.steps, c.eval_every, c.checkpoint_every = 0, 1, 2
  c.rl.max_empty_steps = 0  # a random policy has no mixed group: logging, not learning, is tested
  c.total_steps = total_steps
  c.metrics.backends = ("jsonl", "wandb")
  c.metrics.wandb_project = "fipo-tests"
  c.metrics.wandb_name = "tiny-wandb"
  c.metrics.wandb_group = "fipo-vs-dapo"
  c.metrics.wandb_tags = ("fipo", "tiny")
  return c


def _jsonl(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def _finite(row):
  return {
    k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
  }


@pytest.mark.slow  # 50-80 s: two short trainer runs (model, sampler, evals, checkpoints)
def test_trainer_logs_to_wandb_offline_and_resumes_the_same_run(tmp_path, offline):
  """The real loop (runlocal's model untrained: its steps sample, score and evaluate, then
  find no mixed group to update on), evaluating every step, then resumed for one more."""
  from fipo_jax.rl import trainer  # noqa: PLC0415

  workdir = tmp_path / "run"
  trainer.run(_config(2), str(workdir), devices=jax.devices()[:1])
  run_id = (workdir / wandb_backend.RUN_ID_FILE).read_text().strip()
  (first,) = _offline_runs(workdir)
  assert first["run"].run_id == run_id and first["run"].project == "fipo-tests"
  assert first["run"].display_name == "tiny-wandb" and first["run"].run_group == "fipo-vs-dapo"
  assert list(first["run"].tags) == ["fipo", "tiny"]
  # The full validated config, once.
  want_cfg = json.loads(json.dumps(config_schema.as_dict(config_lib.validate(_config(2)))))
  assert {k: first["config"][k] for k in want_cfg} == want_cfg
  # Every scalar of metrics.jsonl (eval at step 0, then each RL step) at its step.
  rows = _jsonl(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert {"eval/acc_mean", "train/num_gen_batches", "timing_s/gen"} <= set(rows[1])
  assert [h["step"] for h in first["history"]] == [0, 1, 2]
  for row, hist in zip(rows, first["history"], strict=True):
    assert hist == pytest.approx(_finite(row)), row["step"]

  # Resumes from the step-2 checkpoint.
  trainer.run(_config(3), str(workdir), devices=jax.devices()[:1])
  assert (workdir / wandb_backend.RUN_ID_FILE).read_text().strip() == run_id
  first_again, second = _offline_runs(workdir)
  assert first_again["history"] == first["history"]
  assert second["run"].run_id == run_id  # the same W&B run, continued
  rows = _jsonl(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  assert [h["step"] for h in second["history"]] == [3]
  assert second["history"][0] == pytest.approx(_finite(rows[3]))


def test_only_the_primary_process_starts_a_run(tmp_path, offline):
  rc = config_lib.validate(_config(2), check_paths=False)
  w = metrics.writer_for(rc, str(tmp_path / "w"), is_primary=False)
  w.write(1, {"train/acc_mean": 1.0})
  w.close()
  assert not (tmp_path / "w").exists()
  w = metrics.writer_for(rc, str(tmp_path / "p"), is_primary=True)
  w.write(1, {"train/acc_mean": 1.0, "actor/influence_weights_mean_raw/mb2": 1.5})
  w.write(2, {"train/acc_mean": 0.5, "actor/grad_norm": math.nan, "histogram": [1, 2]})
  assert "wandb" in w.outputs(str(tmp_path / "ck"))
  w.close()
  (run,) = _offline_runs(tmp_path / "p")
  assert run["history"] == [  # the NaN (null in metrics.jsonl) and the non-scalar left out
    {"step": 1, "train/acc_mean": 1.0, "actor/influence_weights_mean_raw/mb2": 1.5},
    {"step": 2, "train/acc_mean": 0.5},
  ]
  assert [_finite(r) for r in _jsonl(tmp_path / "p")] == run["history"]
  assert run["run"].display_name == "tiny-wandb"


def test_redone_steps_are_not_sent_twice(tmp_path, offline):
  rc = config_lib.validate(_config(2), check_paths=False)
  logger = wandb_backend.WandbLogger(str(tmp_path), rc.metrics, config={})
  logger.log(3, {"step": 3, "a": 1.0})
  logger.log(1, {"step": 1, "a": 2.0})  # before the run's step: W&B would drop it anyway
  logger.log(4, {"step": 4, "a": 3.0, "note": "text", "b": math.inf})
  logger.close()
  (run,) = _offline_runs(tmp_path)
  assert run["history"] == [{"step": 3, "a": 1.0}, {"step": 4, "a": 3.0}]


def test_a_gs_workdir_keeps_the_run_id_and_files_in_the_bucket(tmp_path, offline, monkeypatch):
  bucket = fake_gcs.install(tmp_path, monkeypatch)
  try:
    rc = config_lib.validate(_config(2), check_paths=False)
    logger = wandb_backend.WandbLogger("gs://b/run", rc.metrics, config={"seed": 0})
    logger.log(1, {"step": 1, "a": 0.5})
    assert logger.location.startswith("gs://b/run/wandb/offline-run-")
    logger.close()
    run_dir = bucket / "b" / "run"
    assert (run_dir / wandb_backend.RUN_ID_FILE).read_text() == logger.run_id
    (run,) = _offline_runs(run_dir)
    assert run["history"] == [{"step": 1, "a": 0.5}] and run["run"].run_id == logger.run_id
    assert not (tmp_path / "cwd" / "gs:").exists()
  finally:
    fake_gcs.clear_caches()


@pytest.mark.parametrize(
  "backends, error",
  [
    (("jsonl", "mlflow"), "metrics.backends: must all be in ('jsonl', 'tensorboard', 'wandb')"),
    ((), "metrics.backends: must name >= 1"),
    (("jsonl", "jsonl"), "metrics.backends: has a duplicate"),
  ],
)
def test_bad_backends_are_one_line_errors(backends, error):
  c = _config(2)
  c.metrics.backends = backends
  with pytest.raises(config_lib.ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(c, check_paths=False)


def test_a_failed_wandb_init_is_one_line(tmp_path, offline, monkeypatch):
  import wandb  # noqa: PLC0415

  def refuse(**kwargs):
    raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login(key=...)")

  monkeypatch.setattr(wandb, "init", refuse)
  rc = config_lib.validate(_config(2), check_paths=False)
  with pytest.raises(wandb_backend.WandbError) as err:
    wandb_backend.WandbLogger(str(tmp_path), rc.metrics, config={})
  assert len(str(err.value).splitlines()) == 1
  assert "UsageError: api_key not configured (no-tty)." in str(err.value)
  assert "WANDB_MODE=offline" in str(err.value)
  assert not (tmp_path / wandb_backend.RUN_ID_FILE).exists()  # the next try starts afresh
