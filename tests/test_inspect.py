"""python -m fipo_jax.inspect: the token heat map, the Sparse-but-Critical shares, Fig. 3f.

The statistics are pinned on hand-made dump rows; the README's dump and inspect commands run
verbatim (their /tmp paths moved under tmp_path) on a real tiny_cpu:runlocal run (slow).
"""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess
import sys

import conftest
import numpy as np
import pytest

from configs import tiny_cpu
from fipo_jax import inspect as inspect_lib
from fipo_jax import token_plots

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _row(index, adv, tokens, delta, weight, mini_batch=1):
  return {
    "index": index,
    "mini_batch": mini_batch,
    "advantage": adv,
    "score": np.sign(adv),
    "tokens": tokens,
    "updates": [mini_batch + 1],
    "log_ratio_after": delta,
    "influence_weights": [weight],
    "raw_influence_weights": [weight],
  }


ROWS = [
  _row(0, 1.0, ["a", "b", "c", "d"], [0.0, 0.005, 0.5, -0.02], [1.0, 1.1, 1.2, 1.0]),
  _row(1, -1.0, ["x", " y", "\n"], [-0.9, 0.001, 0.0], [0.8, 1.0, 1.0], mini_batch=0),
]


def test_shares_and_top_moved_tokens():
  tab = inspect_lib.token_table(ROWS)
  s = inspect_lib.sparsity(tab, threshold=0.01)
  assert s["tokens"] == 7
  assert s["barely_moved"] == pytest.approx(4 / 7)  # 0, .005, .001, 0
  assert s["barely_moved_pos"] == pytest.approx(2 / 4)
  assert s["barely_moved_neg"] == pytest.approx(2 / 3)
  assert s["weight_above_1"] == pytest.approx(2 / 7) and s["weight_below_1"] == pytest.approx(1 / 7)
  top = inspect_lib.top_moved(ROWS, tab, 2)
  assert [(t["token"], t["row"], t["position"]) for t in top] == [("x", 1, 0), ("c", 0, 2)]
  assert top[1]["context"] == "ab" and top[1]["weight"] == 1.2


def test_length_fit_recovers_a_line_per_stage():
  hist = [
    {
      "step": s,
      "eval/acc_mean": 0.2 + 0.01 * (10 * s + 5),
      "eval/response_length/mean": 10.0 * s + 5,
    }
    for s in range(6)
  ]
  hist += [{"step": 6}]  # a row without eval
  (fit,) = inspect_lib.length_fit(hist, stages=1)
  assert fit["w"] == pytest.approx(10.0) and fit["r2"] == pytest.approx(1.0)
  assert fit["steps"] == (0, 5) and fit["points"] == 6
  assert len(inspect_lib.length_fit(hist, stages=2)) == 2
  assert inspect_lib.length_fit(hist[:2], stages=1) == []


def test_heatmap_draws_every_token_of_the_picked_rows(tmp_path):
  path, drawn, tokens = token_plots.token_heatmap(ROWS, str(tmp_path / "t.png"), rows=1)
  assert (drawn, tokens) == (2, 7)
  assert _nonblank(pathlib.Path(path))


def _png(path: pathlib.Path) -> np.ndarray:
  import matplotlib.image  # noqa: PLC0415

  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
  return (matplotlib.image.imread(path)[..., :3] * 255).round().astype(np.int32)


def _nonblank(path: pathlib.Path) -> bool:
  """Red (weight/delta up) and blue (down) cells both drawn, and dark text on them."""
  img = _png(path)
  red = ((img[..., 0] > 150) & (img[..., 2] < 120)).sum()
  blue = ((img[..., 2] > 150) & (img[..., 0] < 120)).sum()
  ink = (img.max(axis=-1) < 60).sum()
  return bool(red > 100 and blue > 100 and ink > 100)


def _readme_commands() -> list[list[str]]:
  text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())
  lines = [ln.strip() for ln in text.splitlines()]
  (insp,) = [ln for ln in lines if ln.startswith("python -m fipo_jax.inspect ")]
  (train,) = [
    ln for ln in lines if ln.startswith("python -m fipo_jax.main ") and "dump_influence=True" in ln
  ]
  return [shlex.split(train), shlex.split(insp)]


def _smoke_command() -> list[str]:
  """configs/tiny_cpu.py's smoke command (`:runlocal`), from its docstring."""
  (line,) = [ln.strip() for ln in tiny_cpu.__doc__.splitlines() if "tiny_cpu.py:runlocal" in ln
             and ln.strip().startswith("python -m fipo_jax.main ")]  # fmt: skip
  return shlex.split(line)


def _assert_the_smoke_run_updates(workdir: pathlib.Path) -> None:
  """The smoke run's warm start gives groups of mixed accuracy, so its 2 RL steps update."""
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [m for m in rows if m["step"] > 0]
  assert [m["step"] for m in steps] == [1, 2]
  updated = [m for m in steps if m["train/empty_steps"] == 0]
  assert updated, "no RL step updated the policy (every group had equal accuracy)"
  for m in updated:
    assert m["train/num_prompts_kept"] >= 4 and "actor/pg_loss" in m
    assert 0.0 < m["train/acc_mean"] < 1.0


@pytest.mark.slow
def test_readme_dump_and_inspect_commands_on_a_real_run(tmp_path):
  """The dump command is tiny_cpu's smoke command (its docstring's) with the dump on, so this
  run is also that smoke test: its 2 RL steps update, and every step is dumped."""
  local = lambda argv: [str(tmp_path / a[5:]) if a.startswith("/tmp/") else a for a in argv]
  train, insp = (local(c) for c in _readme_commands())
  smoke = local(_smoke_command())
  smoke[smoke.index("--workdir") + 1] = train[train.index("--workdir") + 1]
  assert train == [*smoke, "--config.dump_influence=True"], (train, smoke)
  env = conftest.child_env(flags=conftest.WARM_START_XLA_FLAGS)  # one CPU device, as on a laptop
  proc = subprocess.run(
    [sys.executable, *train[1:]], cwd=ROOT, env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = pathlib.Path(train[train.index("--workdir") + 1])
  _assert_the_smoke_run_updates(workdir)
  step = int(insp[insp.index("--step") + 1])
  rows = [json.loads(x) for x in (workdir / "rollout_data" / f"{step}.jsonl").open()]
  assert rows and len(rows) <= 64
  for r in rows:
    t = len(r["tokens"])
    assert "".join(r["tokens"]) == r["response"]
    assert all(len(x) == t for k in ("log_ratio", "influence_weights") for x in r[k])
    assert len(r["log_ratio_after"]) == t
    if r["mini_batch"] == 0:  # the first update runs on the rollout policy: f = 1, d = 0
      assert np.allclose(r["influence_weights"][0], 1.0, atol=1e-6)
      assert np.abs(r["log_ratio"][0]).max() < 1e-4
  later = [w for r in rows if r["mini_batch"] > 0 for w in r["influence_weights"][-1]]
  assert later and np.abs(np.asarray(later) - 1.0).max() > 1e-4, "FIPO never acted"
  proc = subprocess.run(
    [sys.executable, *insp[1:]], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  total = sum(len(r["tokens"]) for r in rows)
  assert f"RL step {step}: {total} response tokens dumped" in proc.stdout
  assert re.search(r"barely moved \(\|delta log p\| <= 0.01\): \d+\.\d% of tokens", proc.stdout)
  picked = token_plots._pick(rows, 1, 6) + token_plots._pick(rows, -1, 6)  # noqa: SLF001
  assert f"heat map: {sum(len(r['tokens']) for r in picked)} tokens of {len(picked)} " in (
    proc.stdout
  )
  out = pathlib.Path(insp[insp.index("--out") + 1])
  assert _nonblank(out / f"tokens_step{step}.png")
  assert (out / "acc_vs_length.png").stat().st_size > 5000
