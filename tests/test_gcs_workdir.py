"""The trainer, eval/generate's policy loader and export with a gs:// workdir (fake bucket).

tiny_cpu:runlocal shrunk to one RL step with an eval and a checkpoint runs against the fake
bucket of tests/fake_gcs.py from an empty cwd: everything must land in the bucket and nothing in
a local `./gs:` directory (where `os.makedirs('gs://b/run')` would put it).
"""

import argparse
import json
import pathlib

import fake_gcs
import jax
import pytest

from configs import tiny_cpu
from fipo_jax import export, generate
from fipo_jax import policy as policy_lib
from fipo_jax.data import synthetic
from fipo_jax.rl import trainer


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  yield fake_gcs.install(tmp_path, monkeypatch)
  fake_gcs.clear_caches()


@pytest.mark.slow
def test_train_on_a_bucket(bucket, capsys):
  config = tiny_cpu.get_config("runlocal")
  config.total_steps, config.sft.steps = 1, 2
  # A plumbing check of the paths: no warm-start threshold, no stop on groups without a mix.
  config.sft.loss_threshold, config.rl.max_empty_steps = 0.0, 0
  trainer.run(config, "gs://b/run", devices=jax.devices()[:1])
  printed = capsys.readouterr().out
  run = bucket / "b" / "run"

  rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1] and "eval/acc_mean" in rows[1]
  assert json.loads((run / "config.json").read_text())["total_steps"] == 1
  assert {p.name for p in (run / "plots").glob("*.png")} >= {"accuracy.png", "overview.png"}
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert (run / "checkpoints" / "1" / "commit_success.txt").exists()  # orbax's GCS commit mark
  assert (run / "data" / synthetic.TRAIN_FILE).exists()
  assert (run / "tokenizer" / "tokenizer.json").exists()
  assert (run / "sft").is_dir()
  assert not pathlib.Path("gs:").exists(), sorted(map(str, pathlib.Path(".").rglob("*")))
  # The run ends by saying where everything went.
  for line in (
    "metrics      gs://b/run/metrics.jsonl",
    "plots        gs://b/run/plots/",
    "tensorboard  gs://b/run/tensorboard/",
    "checkpoints  gs://b/run/checkpoints/",
  ):
    assert line in printed, printed

  # eval and generate load the policy from the bucket; export writes to it.
  policy = policy_lib.load_policy(checkpoint_dir="gs://b/run")
  assert pathlib.Path(policy.tokenizer_dir, "tokenizer.json").exists()  # a local cached copy
  args = argparse.Namespace(checkpoint="gs://b/run", hf_dir=None, tokenizer_dir=None, dtype=None,
                            step=None)
  model, _ = generate.load_model(args)  # generate --checkpoint gs://b/run
  assert model.cfg == policy.model_cfg and args.tokenizer_dir == policy.tokenizer_dir
  export.main(["--checkpoint", "gs://b/run", "--out", "gs://b/export"])
  out = bucket / "b" / "export"
  assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
  assert list(out.glob("model-*.safetensors"))
  assert not pathlib.Path("gs:").exists()
