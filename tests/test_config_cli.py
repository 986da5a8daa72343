"""The config surface on the command line: data files, the README's and every recipe's documented
commands, one-line errors (exit 2, no traceback), and what `:runlocal` builds."""

import importlib
import json
import pathlib
import re
import shlex
import subprocess
import sys

import conftest
import pytest

from fipo_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("fipo_qwen2_5_32b", "dapo_qwen2_5_32b", "fipo_qwen2_5_7b_math",
           "dapo_qwen2_5_7b_math", "grpo_qwen2_5_7b_math", "tiny_cpu")


def _recipe(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _commands(text: str) -> list[list[str]]:
  """The `python -m fipo_jax.main ...` commands of a README or docstring, as argv lists."""
  joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
  return [shlex.split(line.strip())[3:] for line in joined.splitlines()
          if line.strip().startswith("python -m fipo_jax.main ")]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
  """A cwd for the documented commands: configs/, their data files (empty: validation only
  checks they exist) and stub model directories; `/models/X` in a command becomes models/X here.
  """
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  (tmp_path / "data").mkdir()
  for name in ("dapo-math-17k.parquet", "aime-2024.parquet", "data/dapo-math-17k.parquet",
               "data/aime-2024.parquet"):
    (tmp_path / name).touch()
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _local(argv: list[str], run_dir: pathlib.Path) -> list[str]:
  out = []
  for a in argv:
    if "/models/" in a:
      name, path = a.split("=", 1)
      model = run_dir / path.lstrip("/")
      model.mkdir(parents=True, exist_ok=True)
      (model / "config.json").write_text("{}")
      a = f"{name}={model}"
    out.append(a)
  return out


def _parse(argv: list[str]) -> config_lib.RunConfig:
  """argv parsed as fipo_jax.main parses it (its --config flag, on fresh flag values) and
  validated; the CLI's error lines are tested through subprocesses below."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["fipo_jax.main", *argv]
  values = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(argv)
  return config_lib.validate(config.value, num_devices=8)


def _documented_commands():
  docs = {"README.md": (ROOT / "README.md").read_text()}
  docs.update({f"configs/{n}.py": importlib.import_module(f"configs.{n}").__doc__ for n in RECIPES})
  cmds = [(where, argv) for where, text in docs.items() for argv in _commands(text)]
  assert len(cmds) >= 2 * len(RECIPES) + 1  # each recipe's two, the README's
  return cmds


@pytest.mark.parametrize("where, argv", _documented_commands(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_documented_commands_parse_and_validate(where, argv, run_dir):
  rc = _parse(_local(argv, run_dir))
  if "--config.data.train_files" in " ".join(argv):
    assert rc.data.task == "verl" and rc.data.train_files[0].endswith("dapo-math-17k.parquet")


@pytest.mark.parametrize("value, files", [
  ("a.parquet", ("a.parquet",)),
  ("a.parquet,b.parquet", ("a.parquet", "b.parquet")),
  ('["a.parquet", "b.parquet"]', ("a.parquet", "b.parquet")),
  ("('a.parquet',)", ("a.parquet",)),
])
def test_data_files_from_the_command_line(value, files, run_dir):
  for name in ("a.parquet", "b.parquet"):
    (run_dir / name).touch()
  rc = _parse(_local(["--config", "configs/fipo_qwen2_5_7b_math.py", "--workdir", "w",
                      "--config.model.hf_dir=/models/Qwen2.5-Math-7B",
                      f"--config.data.train_files={value}", f"--config.data.val_files={value}"],
                     run_dir))
  assert rc.data.train_files == rc.data.val_files == files


def _env() -> dict[str, str]:
  return conftest.child_env(flags=conftest.WARM_START_XLA_FLAGS)  # one CPU device, as on a laptop


def _main(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
  """A fresh `python -m fipo_jax.main` (the README's commands, verbatim)."""
  return subprocess.run([sys.executable, "-m", "fipo_jax.main", *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def warm(warm_server):
  """Runs of the CLIs forked from one process that has imported what they import
  (tests/warm_python.py): the other commands' runs, without ~10 CPU-s of imports each."""
  return warm_server.with_env(_env())


def _warm_main(warm, *args: str, cwd=ROOT) -> subprocess.CompletedProcess:
  return warm.run("-m", "fipo_jax.main", *args, cwd=cwd)


def test_readme_data_command_through_the_cli(run_dir):
  """The README's command verbatim (its /models/ directory stubbed), up to validation."""
  (argv,) = [a for where, a in _documented_commands()
             if where == "README.md" and "--config.data.train_files" in " ".join(a)]
  res = _main(*_local(argv, run_dir), "--validate_only", cwd=run_dir)
  assert res.returncode == 0, res.stderr
  data = json.loads(res.stdout)["data"]
  assert data["train_files"] == ["dapo-math-17k.parquet"] and data["task"] == "verl"
  assert data["val_files"] == ["aime-2024.parquet"]


def _one_line_error(res: subprocess.CompletedProcess) -> str:
  assert res.returncode == 2, res.stderr[-2000:]
  assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
  return res.stderr.strip()


TINY = ("--config", "configs/tiny_cpu.py", "--workdir")


@pytest.mark.parametrize("override, line", [
  ("--config.rl.nope=1", "config error: rl.nope: unknown key (not in the schema)"),
  ("--config.rl.decay_rat=1",
   "config error: rl.decay_rat: unknown key (not in the schema); did you mean rl.decay_rate?"),
  ("--config.mesh.tensor=3", "config error: mesh.tensor: fixed mesh axes (mesh.data=1, "
   "mesh.fsdp=-1, mesh.tensor=3, product 3) do not divide the 1 devices"),
  ("--config.rollout.overlap_calls=2", "config error: rollout.overlap_calls: needs "
   "rollout.mode='disaggregated' (a sampler on devices of its own), got mode 'sync'; leave it 0"),
  ("--config.rl.reward_workers=-1", "config error: rl.reward_workers: must be >= 0 (verifier "
   "processes; 0 scores in the trainer's process), got -1"),
])
@pytest.mark.slow
def test_config_errors_through_the_cli(override, line, tmp_path, warm):
  assert _one_line_error(_warm_main(warm, *TINY, str(tmp_path / "w"), override)) == line
  assert not (tmp_path / "w").exists()


def test_tiny_architecture_onto_a_model_dir_is_refused(run_dir, warm):
  """tiny_cpu's model.overrides define a tiny architecture: not onto an HF directory's weights."""
  args = _local([*TINY, "w", "--config.model.hf_dir=/models/Qwen2.5-0.5B"], run_dir)
  line = _one_line_error(_warm_main(warm, *args, cwd=run_dir))
  assert re.match(r"config error: model.overrides: \w+=\d+ would change the architecture of "
                  r"model.hf_dir \S+/models/Qwen2.5-0.5B \(its config.json defines it\)", line)


def test_a_list_in_a_users_config_file_is_named(run_dir, warm):
  """config_flags cannot override a list field: the line says which, and the fix."""
  (run_dir / "mine.py").write_text(  # written from scratch (a recipe's tuple would take a list)
    "import ml_collections\n\n\ndef get_config():\n"
    "  return ml_collections.ConfigDict({'data': {'train_files': ['a.parquet']}})\n")
  line = _one_line_error(_warm_main(warm, "--config", "mine.py", "--workdir", "w",
                                    "--config.data.train_files=b.parquet", cwd=run_dir))
  assert line == ("config error: data.train_files: the config file sets a list, which a --config "
                  "override cannot replace; make it a tuple there, e.g. ('a.parquet',)")


@pytest.mark.parametrize("empty", ["", "[]"])
@pytest.mark.slow
def test_no_val_files_with_evals_is_refused(empty, run_dir, warm):
  args = _local(["--config", "configs/fipo_qwen2_5_7b_math.py", "--workdir", "w",
                 "--config.model.hf_dir=/models/Qwen2.5-Math-7B",
                 "--config.data.train_files=data/dapo-math-17k.parquet",
                 f"--config.data.val_files={empty}"], run_dir)
  assert _one_line_error(_warm_main(warm, *args, cwd=run_dir)).startswith(
    "config error: data.val_files: is empty but eval_every=5 evaluates on it")
  res = _warm_main(warm, *args, "--config.eval_every=0", "--validate_only", cwd=run_dir)  # fine
  assert res.returncode == 0 and json.loads(res.stdout)["data"]["val_files"] == [], res.stderr


# --- :runlocal --------------------------------------------------------------------------------


def test_runlocal_keeps_a_model_dirs_architecture(qwen_model_dir):
  from fipo_jax import models
  from fipo_jax import policy as policy_lib

  cfg = _recipe("fipo_qwen2_5_7b_math", "runlocal")
  cfg.model.hf_dir = str(qwen_model_dir)  # as --config.model.hf_dir does: after get_config
  rc = config_lib.validate(cfg, num_devices=8)
  hf = models.ModelConfig.from_hf_config(json.loads((qwen_model_dir / "config.json").read_text()))
  got = policy_lib.model_config(rc)
  assert {k: getattr(got, k) for k in config_lib.ARCH_FIELDS} == {
    k: getattr(hf, k) for k in config_lib.ARCH_FIELDS}
  assert got.vocab_size == 151936 and rc.model.preset_overrides["vocab_size"] == 128  # unused
  # The recipe's own context extension keeps the architecture and still applies.
  assert rc.model.overrides == {"max_position_embeddings": 32768}
  cfg.model.overrides.vocab_size = 128
  with pytest.raises(config_lib.ConfigError, match=r"^model.overrides: vocab_size=128 would "
                     r"change the architecture of model.hf_dir"):
    config_lib.validate(cfg)


def _metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_runlocal_on_a_model_dir_and_dapo_files(qwen_model_dir, dapo_parquet, tmp_path, warm):
  """A recipe's :runlocal on an HF directory and DAPO-schema files trains on that model, and
  export reads the workdir (its checkpoint has the directory's shapes). eval and generate load
  a checkpoint through the same `policy.load_policy` (tests/test_export.py runs them on one)."""
  w = tmp_path / "w"
  train, val = dapo_parquet("train", n=16), dapo_parquet("val", n=2)
  # One step of one sampling round of 8 prompts (a random model scores 0: the update is
  # skipped either way), and eval without top-p: top-p sorts the 151936-token vocabulary at
  # every decode step, about a second per step on a CPU.
  res = _warm_main(warm, "--config", "configs/fipo_qwen2_5_7b_math.py:runlocal", "--workdir",
                   str(w), f"--config.model.hf_dir={qwen_model_dir}",
                   f"--config.data.train_files={train}", f"--config.data.val_files={val}",
                   "--config.total_steps=1", "--config.rl.gen_batch_size=8",
                   "--config.rl.max_num_gen_batches=1", "--config.eval.top_p=1.0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert [m["step"] for m in _metrics(w)] == [0, 1]
  assert all(m["eval/num_prompts"] == 2 for m in _metrics(w))
  res = warm.run("-m", "fipo_jax.export", "--checkpoint", w, "--out", tmp_path / "hf", cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  exported = json.loads((tmp_path / "hf" / "config.json").read_text())
  source = json.loads((qwen_model_dir / "config.json").read_text())
  for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
    assert exported[key] == source[key], key
