"""The main job (configs/reasoning_cpu.py) on seeds 0-4: does every seed learn?

  python benchmarks/reasoning_seeds.py [--seeds 0 1 2 3 4] [--workdir /tmp/fipo_reasoning_seeds]
      [--jobs 1]
  python benchmarks/reasoning_seeds.py --smoke   # tiny: 2 seeds, short warm start, 2 RL steps
  python benchmarks/reasoning_seeds.py --seeds 1 2 3 --config.rollout.mode=partial \
      --config.rollout.max_staleness=1   # any --config.* override is passed to every run

Runs `python -m fipo_jax.main --config configs/reasoning_cpu.py --config.seed=S` once per seed
(--jobs at a time; each in WORKDIR/seed_S, so a rerun resumes or reuses them) and reads each
run's metrics.jsonl. Per seed: held-out accuracy (eval/acc_mean) and mean response length
(eval/response_length/mean) at step 0 and at the last eval, wall and CPU time, the exit code, and
whether it met the main job's targets (issue 25): last-eval length >= 2x step 0's, accuracy up
by >= 0.25 to >= 0.85. Ends with one JSON line: {"seeds": [...], "all_learn": bool, ...}.
Exit status 0 whatever the outcome: the JSON says whether every seed learnt.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --smoke: the pipeline of the benchmark, not a result (a 10-step warm start cannot learn parity).
SMOKE = (
  "--config.sft.steps=10",
  "--config.sft.loss_threshold=0",
  "--config.sft.mix_steps=2",
  "--config.total_steps=2",
  "--config.eval_every=2",
  "--config.data.synthetic.num_val=8",
  "--config.eval.n=2",
  "--config.rl.max_empty_steps=0",
)
TARGET_LENGTH_RATIO = 2.0
TARGET_ACC_GAIN = 0.25
TARGET_ACC = 0.85


def run_seed(seed: int, workdir: str, extra: tuple[str, ...]) -> dict:
  """One run of the main job; returns its row (metrics read from WORKDIR/metrics.jsonl)."""
  cmd = [
    sys.executable,
    "-m",
    "fipo_jax.main",
    "--config",
    "configs/reasoning_cpu.py",
    "--workdir",
    workdir,
    f"--config.seed={seed}",
    *extra,
  ]
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "stderr.txt"), "w") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time (runs may overlap)
  wall = time.perf_counter() - t0
  code = os.waitstatus_to_exitcode(status)
  cpu = usage.ru_utime + usage.ru_stime
  row = {"seed": seed, "exit": code, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
  if code != 0:
    with open(os.path.join(workdir, "stderr.txt")) as f:
      row["error"] = (f.read().strip().splitlines() or [""])[-1]
  path = os.path.join(workdir, "metrics.jsonl")
  evals = []
  if os.path.exists(path):
    with open(path) as f:
      evals = [m for m in map(json.loads, f) if "eval/acc_mean" in m]
  if evals:
    first, last = evals[0], evals[-1]
    row.update(
      {
        "start_step": first["step"],
        "end_step": last["step"],
        "start_acc": first["eval/acc_mean"],
        "end_acc": last["eval/acc_mean"],
        "start_len": first["eval/response_length/mean"],
        "end_len": last["eval/response_length/mean"],
      }
    )
  row["learns"] = bool(
    code == 0
    and evals
    and row["start_step"] == 0
    and row["end_len"] >= TARGET_LENGTH_RATIO * row["start_len"]
    and row["end_acc"] - row["start_acc"] >= TARGET_ACC_GAIN
    and row["end_acc"] >= TARGET_ACC
  )
  return row


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--workdir", default="/tmp/fipo_reasoning_seeds")
  p.add_argument("--jobs", type=int, default=1, help="runs at a time (each takes ~2 cores)")
  p.add_argument("--smoke", action="store_true", help="2 seeds, tiny runs: checks the pipeline")
  args, overrides = p.parse_known_args()
  if any(not o.startswith("--config.") for o in overrides):
    p.error(f"unrecognized arguments (only --config.* overrides pass through): {overrides}")
  seeds, extra = args.seeds, tuple(overrides)
  if args.smoke:
    seeds, extra = args.seeds[:2], SMOKE + extra
  print(
    f"{'seed':>4} {'exit':>4} {'acc 0 -> end':>14} {'len 0 -> end':>14} {'wall s':>7} "
    f"{'cpu s':>7} learns",
    flush=True,
  )
  with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
    futures = [
      pool.submit(run_seed, s, os.path.join(args.workdir, f"seed_{s}"), extra) for s in seeds
    ]
    rows = [f.result() for f in futures]
  for r in rows:
    seed = r["seed"]
    acc = f"{r['start_acc']:.3f}->{r['end_acc']:.3f}" if "end_acc" in r else "-"
    length = f"{r['start_len']:.1f}->{r['end_len']:.1f}" if "end_len" in r else "-"
    print(
      f"{seed:>4} {r['exit']:>4} {acc:>14} {length:>14} {r['wall_s']:>7} {r['cpu_s']:>7} "
      f"{r['learns']}" + (f"  ({r['error']})" if "error" in r else ""),
      flush=True,
    )
  print(
    json.dumps(
      {
        "seeds": rows,
        "all_learn": all(r["learns"] for r in rows),
        "targets": {
          "length_ratio": TARGET_LENGTH_RATIO,
          "acc_gain": TARGET_ACC_GAIN,
          "acc": TARGET_ACC,
        },
        "smoke": args.smoke,
      }
    )
  )


if __name__ == "__main__":
  main()
