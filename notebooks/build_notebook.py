"""Writes notebooks/loss_exploration.ipynb (no outputs) from the cell sources below.

Edit the cells here, then run `python notebooks/build_notebook.py`; tests/test_notebook.py
checks that the stored notebook matches this script and executes it headless.

Cell tags: "plot" cells must leave at least one image/png output when executed headless;
"trainer" cells need `fipo_jax.rl.trainer` (section 4) and print a labelled message without it.
"""

import pathlib
import textwrap

import nbformat
from nbformat import v4

NOTEBOOK = pathlib.Path(__file__).resolve().parent / "loss_exploration.ipynb"


def _md(src: str):
  return v4.new_markdown_cell(textwrap.dedent(src).strip())


def _code(src: str, *tags: str):
  cell = v4.new_code_cell(textwrap.dedent(src).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


CELLS = [
    _md("""
        # FIPO loss exploration

        FIPO ([arXiv 2603.19835](https://arxiv.org/abs/2603.19835)) keeps the DAPO surrogate
        (clip-higher plus dual clip) but multiplies each token's advantage by an **influence
        weight** `f = clip(exp(F))`, where `F` is the discounted sum of how far the policy has
        moved (`log pi_new - log pi_old`) on that token and the tokens after it.

        1. Future-KL of hand-made and random log-ratio traces, and what the decay rate means.
        2. Influence weights under the three clip modes and the safety threshold, and the
           resulting per-token advantage.
        3. The per-token surrogate and its gradient across ratios, for both advantage signs.
        4. Influence weights over real responses of the `tiny_cpu` policy, mini-batch by
           mini-batch.

        Everything is computed by `fipo_jax` itself (`fipo_jax.rl.future_kl`,
        `fipo_jax.rl.losses`); the notebook only draws. It runs on Colab CPU, GPU and TPU
        runtimes. Sliders appear where the frontend supports widgets; otherwise each
        interactive figure is drawn for a few fixed settings.
        """),
    _code("""
        # Colab install: clone the repository (section 4 runs its configs/) and install fipo_jax
        # with the jax build for this runtime. Skipped where fipo_jax is importable (CI, checkouts).
        import importlib.util
        import os
        import shutil

        REPO_URL = "https://github.com/<org>/fipo_jax"  # the fipo_jax repository or your fork
        if importlib.util.find_spec("fipo_jax") is None:
          on_tpu = os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ
          extra = "[cuda]" if shutil.which("nvidia-smi") else "[tpu]" if on_tpu else ""
          !git clone -q --depth 1 {REPO_URL} fipo_jax_repo
          !pip install -q "./fipo_jax_repo{extra}"
          os.chdir("fipo_jax_repo")
        """),
    _code("""
        %matplotlib inline
        import glob
        import pathlib
        import subprocess
        import sys
        import tempfile

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        from IPython import get_ipython

        import fipo_jax
        from fipo_jax.rl import losses

        future_kl_lib = importlib.import_module("fipo_jax.rl.future_kl")  # module, not function

        # Sliders need a frontend with a widget manager (Jupyter, Colab). Headless runs (the
        # notebook test sets FIPO_NOTEBOOK_STATIC=1) draw each figure for fixed settings instead.
        try:
          import ipywidgets as widgets
        except ImportError:
          widgets = None
        _shell = type(get_ipython()).__name__
        LIVE = (
            widgets is not None
            and os.environ.get("FIPO_NOTEBOOK_STATIC") != "1"
            and ("google.colab" in sys.modules or _shell == "ZMQInteractiveShell")
        )


        def interactive_or_static(draw, static_settings, **sliders):
          \"\"\"Sliders bound to `draw` on a live frontend; else `draw(**s)` for each fixed s.\"\"\"
          if LIVE:
            widgets.interact(draw, **sliders)
          else:
            for settings in static_settings:
              draw(**settings)


        OFFICIAL = losses.PolicyLossConfig()  # the official 32B values (FIPO_SPEC §5.1)
        print("fipo_jax", fipo_jax.__version__, "from", pathlib.Path(fipo_jax.__file__).parent)
        print("devices:", jax.devices(), "| sliders:", "on" if LIVE else "off (static figures)")
        print(OFFICIAL)
        """),
    _md("""
        ## 1. Future-KL and the decay rate

        With the log-ratio `d_k = log pi_new(o_k) - log pi_old(o_k)` on response token `k`,

        `F_t = sum_{k >= t} gamma^(k - t) * m_k * d_k`,  `gamma = 2^(-1/tau)`.

        The sum includes the current token and looks only forward. `tau` (`decay_rate`) is a
        **half-life in tokens**: a move on token `k` counts half as much for the token `tau`
        positions before it. The loss also drops tokens with ratio `> clip_ratio_c` from the sum
        (`m_k` here is the response mask times that filter).

        Left: a single unit move at token 300, so `F_t = gamma^(300 - t)`; the dashed lines mark
        the half-life `300 - tau`, where every curve crosses 0.5. Right: a random trace (small
        i.i.d. moves plus a drift block), padded after token 448.
        """),
    _code("""
        DECAYS = (8.0, 32.0, 128.0)
        T1 = 512
        SPIKE_AT = 300
        spike = np.zeros((1, 340), np.float32)
        spike[0, SPIKE_AT] = 1.0
        rng = np.random.default_rng(0)
        trace = rng.normal(0.0, 0.05, (1, T1)).astype(np.float32)
        trace[0, 300:340] += 0.08  # a block the policy reinforced
        trace_mask = (np.arange(T1) < 448)[None].astype(np.float32)

        fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(13, 4))
        for tau, color in zip(DECAYS, ("C0", "C1", "C2"), strict=True):
          f_spike = np.asarray(future_kl_lib.future_kl(spike, np.ones_like(spike), decay_rate=tau))
          ax_a.plot(f_spike[0], color=color, label=f"tau = {tau:g}")
          half = int(SPIKE_AT - tau)
          ax_a.axvline(half, color=color, ls="--", lw=1)
          ax_a.plot([half], [f_spike[0, half]], "o", color=color)
          f_trace = future_kl_lib.future_kl(trace, trace_mask, decay_rate=tau)
          ax_b.plot(np.asarray(f_trace)[0], color=color, label=f"F, tau = {tau:g}")
          ref = future_kl_lib.future_kl_reference(trace, trace_mask, tau)
          print(f"tau={tau:5g}: F({SPIKE_AT} - tau) = {f_spike[0, half]:.4f}; "
                f"random trace max |F - float64 recursion| = {np.abs(f_trace - ref).max():.1e}")
        ax_a.axhline(0.5, color="gray", ls=":", lw=1)
        ax_a.set(title=f"unit move at token {SPIKE_AT} (dashed: half-life)", xlabel="token t",
                 ylabel="F_t")
        ax_a.legend()
        ax_b.bar(np.arange(T1), trace[0] * trace_mask[0], color="gray", alpha=0.4,
                 label="d (masked)")
        ax_b.axvspan(448, T1, color="k", alpha=0.08, label="padding")
        ax_b.set(title="random log-ratio trace", xlabel="token t", ylabel="F_t")
        ax_b.legend(fontsize=8)
        plt.show()
        """, "plot"),
    _md("""
        ## 2. Influence weights, clip modes and the safety threshold

        `f = stop_gradient(clip(exp(F)))` with `eps_f = future_kl_clip_ratio`:

        | mode | config | range |
        |---|---|---|
        | high-only (official 32B) | `future_kl_clip_high_only=True` | `[1, 1 + eps_f]` |
        | symmetric (paper's 7B) | `future_kl_clip_high_only=False` | `[1 - eps_f, 1 + eps_f]` |
        | unclipped | `future_kl_clip_ratio=0` | `min(exp F, 10)` |

        Safety: a token with negative advantage and ratio `> safety_thresh` gets `f` clamped to
        `[0.8, 1]`. The loss then uses the weighted advantage `A * f`. The curves below come
        from `fipo_jax.rl.losses.fipo_terms`, the per-token intermediates of the FIPO loss.
        """),
    _code("""
        MODES = {  # name -> (future_kl_clip_ratio, future_kl_clip_high_only) for a given eps_f
            "high-only": lambda e: (e, True),
            "symmetric": lambda e: (e, False),
            "unclipped": lambda e: (0.0, True),
        }

        # f as a function of F: the three clip modes at eps_f = 0.2 (no safety, A > 0).
        # A one-token sequence whose log-ratio is F has Future-KL exactly F: one row per F value.
        F_grid = np.linspace(-1.0, 1.0, 201, dtype=np.float32)[:, None]
        ones = np.ones_like(F_grid)
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, mode in MODES.items():
          e, high_only = mode(0.2)
          cfg = losses.PolicyLossConfig(future_kl_clip_ratio=e, future_kl_clip_high_only=high_only)
          terms = losses.fipo_terms(F_grid, np.zeros_like(F_grid), ones, ones, cfg)
          ax.plot(F_grid[:, 0], np.asarray(terms["influence_weights"])[:, 0], label=name)
        ax.set(xlabel="Future-KL F", ylabel="influence weight f", ylim=(0.5, 2.0),
               title="f = clip(exp F) per mode (eps_f = 0.2)")
        ax.legend()
        plt.show()
        """, "plot"),
    _md("""
        Two hand-made responses of 64 tokens: a **positive**-advantage one whose policy moved up
        on a late block (tokens 40-55), and a **negative**-advantage one (padded after 56) that
        the update is pushing down, with a ratio of 4.5 at token 20 (above a 7B-style safety
        threshold of 3) and 12 at token 35 (above `clip_ratio_c = 10`, so it is filtered out
        of the Future-KL sum and dual-clipped). Red crosses mark safety-clamped tokens.
        """),
    _code("""
        T2 = 64
        rng = np.random.default_rng(1)
        old_lp = rng.uniform(-3.0, -0.1, (2, T2)).astype(np.float32)
        delta = rng.normal(0.0, 0.02, (2, T2)).astype(np.float32)
        delta[0, 40:56] += 0.04  # reinforced late block of the positive response
        delta[1, :56] -= 0.02  # the negative response is being pushed down
        delta[1, 20], delta[1, 35] = np.log(4.5), np.log(12.0)
        mask2 = np.ones((2, T2), np.float32)
        mask2[1, 56:] = 0.0
        adv2 = np.array([[1.0], [-1.0]], np.float32) * mask2  # per-sequence A, 0 on padding
        new_lp = old_lp + delta


        def weights(decay_rate, eps_f, safety_thresh):
          \"\"\"{mode: fipo_terms} for the two responses under each clip mode.\"\"\"
          out = {}
          for name, mode in MODES.items():
            e, high_only = mode(eps_f)
            cfg = losses.PolicyLossConfig(decay_rate=decay_rate, future_kl_clip_ratio=e,
                                          future_kl_clip_high_only=high_only,
                                          safety_thresh=safety_thresh)
            out[name] = losses.fipo_terms(new_lp, old_lp, adv2, mask2, cfg)
          return out


        STYLES = (dict(lw=4, alpha=0.5), dict(ls="--"), dict(lw=1))  # overlaps stay visible


        def draw_weights(decay_rate=32.0, eps_f=0.2, safety_thresh=3.0):
          terms = weights(decay_rate, eps_f, safety_thresh)
          fig, axes = plt.subplots(3, 2, figsize=(13, 8), sharex=True)
          t = np.arange(T2)
          for col, label in enumerate(("A = +1", "A = -1")):
            valid = mask2[col] > 0
            any_terms = terms["high-only"]
            axes[0, col].bar(t[valid], delta[col, valid], color="gray", alpha=0.5, label="d")
            axes[0, col].plot(t[valid], np.asarray(any_terms["future_kl"])[col, valid], "k",
                              label="F (filtered)")
            axes[0, col].set_title(f"{label}: log-ratio d and Future-KL F")
            for (name, tm), style in zip(terms.items(), STYLES, strict=True):
              f = np.asarray(tm["influence_weights"])[col]
              axes[1, col].step(t[valid], f[valid], where="mid", label=name, **style)
              axes[2, col].step(t[valid], np.asarray(tm["weighted_advantages"])[col, valid],
                                where="mid", label=name, **style)
              hit = np.asarray(tm["safety_mask"])[col] & valid
              axes[1, col].plot(t[hit], f[hit], "rx", ms=9)
            axes[1, col].set_title("influence weight f")
            axes[2, col].set_title("per-token advantage A * f")
            axes[2, col].set_xlabel("token t")
          for ax in axes.flat:
            ax.legend(fontsize=7, loc="upper left")
          fig.suptitle(f"decay_rate={decay_rate:g}, eps_f={eps_f:g}, "
                       f"safety_thresh={safety_thresh:g}")
          fig.tight_layout()
          plt.show()


        sliders = {}
        if LIVE:
          sliders = dict(
              decay_rate=widgets.FloatLogSlider(value=32, base=2, min=1, max=9, step=0.5,
                                                description="decay_rate"),
              eps_f=widgets.FloatSlider(value=0.2, min=0.0, max=0.5, step=0.05,
                                        description="clip eps_f"),
              safety_thresh=widgets.FloatSlider(value=3.0, min=1.0, max=12.0, step=0.5,
                                                description="safety S"),
          )
        interactive_or_static(
            draw_weights,
            [dict(decay_rate=32.0, eps_f=0.2, safety_thresh=10.0),  # official 32B
             dict(decay_rate=8.0, eps_f=0.2, safety_thresh=3.0)],  # short horizon, 7B safety
            **sliders,
        )
        """, "plot"),
    _md("""
        The same weights, seen through the loss: `compute_policy_loss("fipo", ...)` logs the
        official metrics, whose mean, min and max must agree with the per-token weights drawn
        above (over the response mask).
        """),
    _code("""
        rows = []
        for name, tm in weights(32.0, 0.2, 3.0).items():
          e, high_only = MODES[name](0.2)
          cfg = dict(decay_rate=32.0, future_kl_clip_ratio=e, future_kl_clip_high_only=high_only,
                     safety_thresh=3.0)
          loss, metrics = losses.compute_policy_loss("fipo", jnp.asarray(new_lp), old_lp, adv2,
                                                     mask2, cfg)
          f = np.asarray(tm["influence_weights"])[mask2 > 0]
          mine = (f.mean(), f.min(), f.max())
          logged = tuple(float(metrics[f"actor/influence_weights_{s}"])
                         for s in ("mean", "min", "max"))
          np.testing.assert_allclose(mine, logged, rtol=1e-5)
          iw_clip = [float(metrics[f"actor/IW_{s}_clip_ratio"]) for s in ("upper", "lower")]
          rows.append(f"{name:10s} loss {float(loss):+.4f}  f mean/min/max "
                      + " / ".join(f"{v:.4f}" for v in logged)
                      + "  IW clip upper/lower " + " / ".join(f"{v:.3f}" for v in iw_clip))
        print("\\n".join(rows))
        """),
    _md("""
        ## 3. Per-token surrogate and gradient

        For one token with ratio `r = pi_new / pi_old`, FIPO's loss is `-A f g(r)` with
        `g(r) = min(r, 1 + eps_high)` for `A > 0` and `g(r) = min(max(r, 1 - eps_low), c)` for
        `A < 0`. Below, each ratio is a one-token sequence fed to `compute_policy_loss`, and the
        gradient is `jax.grad` of that loss with respect to `log pi_new`. Shaded: where the
        gradient is zero, i.e. the clip-higher region (`A > 0`, `r > 1 + eps_high`), the
        clip-low region (`A < 0`, `r < 1 - eps_low`) and the dual-clip region (`A < 0`,
        `r > c`, loss capped at `c |A| f`). The DAPO curve (`f = 1`) is the bare surrogate; the
        FIPO curve differs only through `f`, which here is `clip(r)` because a one-token
        sequence's Future-KL is its own log-ratio.
        """),
    _code("""
        RATIOS = jnp.geomspace(0.3, 16.0, 400)


        def per_token(mode, ratio, adv, cfg):
          \"\"\"(loss, d loss / d log pi_new) of a one-token sequence with this ratio.\"\"\"
          def loss_fn(lp):
            loss, _ = losses.compute_policy_loss(mode, lp[None, None], jnp.zeros((1, 1)),
                                                 jnp.full((1, 1), adv), jnp.ones((1, 1)), cfg)
            return loss
          return jax.value_and_grad(loss_fn)(jnp.log(ratio))


        def draw_surrogate(eps_low=0.2, eps_high=0.28, clip_c=10.0):
          cfg = dict(clip_ratio_low=eps_low, clip_ratio_high=eps_high, clip_ratio_c=clip_c,
                     safety_thresh=10.0)
          fig, axes = plt.subplots(2, 2, figsize=(13, 7), sharex=True)
          for col, adv in enumerate((1.0, -1.0)):
            for mode, style in (("dapo", "-"), ("fipo", "--")):
              loss, grad = jax.vmap(lambda r, m=mode, a=adv: per_token(m, r, a, cfg))(RATIOS)
              axes[0, col].plot(RATIOS, loss, style, label=f"{mode} loss")
              axes[1, col].plot(RATIOS, grad, style, label=f"{mode} d loss / d log pi")
            for ax in axes[:, col]:
              if adv > 0:
                ax.axvspan(1 + eps_high, RATIOS[-1], color="C3", alpha=0.12, label="clip-higher")
              else:
                ax.axvspan(RATIOS[0], 1 - eps_low, color="C2", alpha=0.12, label="clip-low")
                ax.axvspan(clip_c, RATIOS[-1], color="C4", alpha=0.15, label="dual clip")
                ax.axvline(10.0, color="C3", ls=":", label="safety S = 10")
              ax.axvline(1.0, color="gray", lw=0.8)
              ax.set_xscale("log")
              ax.legend(fontsize=7)
            axes[0, col].set_title(f"A = {adv:+g}: per-token loss")
            axes[1, col].set_title(f"A = {adv:+g}: gradient w.r.t. log pi_new")
            axes[1, col].set_xlabel("ratio r")
          fig.suptitle(f"eps_low={eps_low:g}, eps_high={eps_high:g}, c={clip_c:g}")
          fig.tight_layout()
          plt.show()


        sliders = {}
        if LIVE:
          sliders = dict(
              eps_low=widgets.FloatSlider(value=0.2, min=0.0, max=0.6, step=0.02),
              eps_high=widgets.FloatSlider(value=0.28, min=0.0, max=0.6, step=0.02),
              clip_c=widgets.FloatSlider(value=10.0, min=1.5, max=15.0, step=0.5),
          )
        interactive_or_static(
            draw_surrogate,
            [dict(eps_low=0.2, eps_high=0.28, clip_c=10.0),  # official
             dict(eps_low=0.2, eps_high=0.2, clip_c=3.0)],  # symmetric PPO, verl's default c
            **sliders,
        )
        """, "plot"),
    _md("""
        ## 4. Influence weights over real responses (`tiny_cpu`)

        FIPO only acts after the policy has moved: on the first mini-batch of an RL step
        `log pi_new == log pi_old`, so `F = 0` and `f = 1` (FIPO equals DAPO); the later
        mini-batches of the same rollout batch see the updates already made. This trains the
        tiny CPU policy (`configs/tiny_cpu.py`) for two RL steps with
        `--config.dump_influence=True`, which saves each step's per-token weights, and draws the
        last step's weights mini-batch by mini-batch (rows: responses, columns: tokens, gray:
        padding), then the tokens of a few responses.

        `QUICK` (the default) shrinks the run to a few minutes on 2 CPU cores, mostly compile
        time: a 40-step supervised warm start instead of 150, 4 prompts x 8 responses per step
        split into 4 mini-batches, no dynamic-sampling filter (a barely warm model rarely gets a
        group with mixed accuracy; the overlong penalty still separates scores), no eval. The
        loss and its FIPO settings are the recipe's. `QUICK = False` runs the recipe's batch
        sizes (about 10 minutes on 2 cores).

        Set `WORKDIR` (or the environment variable `FIPO_INFLUENCE_WORKDIR`) to a finished run's
        workdir to load it instead of training.
        """),
    _code("""
        WORKDIR = os.environ.get("FIPO_INFLUENCE_WORKDIR", "")  # "" = train tiny_cpu here
        STEPS = 2
        QUICK = True
        QUICK_OVERRIDES = [
            "--config.sft.steps=40", "--config.eval_every=0", "--config.checkpoint_every=1000",
            "--config.rl.train_batch_size=4", "--config.rl.gen_batch_size=4",
            "--config.rl.ppo_mini_batch_size=1", "--config.rl.ppo_micro_batch_size_per_device=8",
            "--config.rl.filter_groups_enable=False",
        ]

        repo_candidates = [pathlib.Path.cwd(), pathlib.Path(fipo_jax.__file__).resolve().parents[1]]
        REPO_ROOT = next((p for p in repo_candidates if (p / "configs" / "tiny_cpu.py").exists()),
                         None)
        HAVE_TRAINER = importlib.util.find_spec("fipo_jax.rl.trainer") is not None
        dumps = sorted(glob.glob(os.path.join(WORKDIR or ".", "influence", "step_*.npz")))
        dumps = dumps if WORKDIR else []
        if not dumps and not (HAVE_TRAINER and REPO_ROOT is not None):
          print("SECTION 4 SKIPPED: trainer not available: this fipo_jax has no "
                "fipo_jax.rl.trainer or no configs/tiny_cpu.py, and no WORKDIR with "
                "influence dumps.")
        elif not dumps:
          WORKDIR = tempfile.mkdtemp(prefix="fipo_tiny_")
          cmd = [sys.executable, "-m", "fipo_jax.main", "--config", "configs/tiny_cpu.py",
                 "--workdir", WORKDIR, f"--config.total_steps={STEPS}",
                 "--config.dump_influence=True"] + (QUICK_OVERRIDES if QUICK else [])
          print("running:", " ".join(cmd[1:]))
          run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
          if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-5000:])
            raise RuntimeError(f"tiny_cpu training failed with exit code {run.returncode}")
          dumps = sorted(glob.glob(os.path.join(WORKDIR, "influence", "step_*.npz")))
          if not dumps:
            raise RuntimeError(f"the trainer wrote no influence dumps under {WORKDIR}/influence")
        if dumps:
          print(f"{len(dumps)} dump(s) in {WORKDIR}:", [os.path.basename(d) for d in dumps])
        """, "trainer"),
    _code("""
        from matplotlib import colors


        def draw_influence(path):
          \"\"\"Raw exp(F) and clipped f of one RL step, one row of panels per mini-batch.\"\"\"
          z = np.load(path)
          mask = z["response_mask"] > 0  # [num_mini_batches, M, T]
          n_mb = mask.shape[0]
          raw = np.where(mask, z["raw_influence_weights"], np.nan)
          clipped = np.where(mask, z["influence_weights"], np.nan)
          span = max(float(np.nanmax(np.abs(raw - 1.0))), 1e-6)
          norm = colors.TwoSlopeNorm(vcenter=1.0, vmin=1.0 - span, vmax=1.0 + span)
          cmap = plt.get_cmap("RdBu_r").copy()
          cmap.set_bad("0.85")
          fig, axes = plt.subplots(n_mb, 2, figsize=(14, 1.2 + 1.7 * n_mb), squeeze=False,
                                   sharex=True, layout="constrained")
          for j in range(n_mb):
            for col, (name, w) in enumerate((("raw exp(F)", raw), ("clipped f", clipped))):
              im = axes[j, col].imshow(w[j], aspect="auto", cmap=cmap, norm=norm,
                                       interpolation="nearest")
              axes[j, col].set_title(f"mini-batch {j}: {name}, max |w - 1| = "
                                     f"{np.nanmax(np.abs(w[j] - 1.0)):.2e}", fontsize=9)
            signs = np.sign(np.where(mask[j], z["advantages"][j], 0.0).sum(-1))
            if len(signs) <= 16:  # label rows with their advantage sign while it stays legible
              axes[j, 0].set_yticks(range(len(signs)), [f"{s:+.0f}" for s in signs], fontsize=6)
              axes[j, 0].set_ylabel("sign(A)")
            else:
              axes[j, 0].set_ylabel("response")
          for ax in axes[-1]:
            ax.set_xlabel("response token t")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
          fig.colorbar(im, ax=axes, shrink=0.6, label="influence weight")
          fig.suptitle(f"{os.path.basename(path)}: weights are 1 on mini-batch 0, move after")
          plt.show()
          dev = [float(np.nanmax(np.abs(raw[j] - 1.0))) for j in range(n_mb)]
          print("max |exp(F) - 1| per mini-batch:", ", ".join(f"{d:.2e}" for d in dev))
          return dev


        if dumps:
          deviation = draw_influence(dumps[-1])
          # The first mini-batch runs on the rollout policy itself: lp_new == lp_old up to
          # float32 noise, so F ~ 0 there.
          assert deviation[0] < 1e-3, f"mini-batch 0 should have f = 1, got {deviation[0]}"
        else:
          print("SECTION 4 SKIPPED: trainer not available (see the cell above).")
        """, "plot", "trainer"),
    _code("""
        def draw_tokens(path, rows=8):
          \"\"\"The first responses of the last mini-batch, tokens coloured by raw weight.\"\"\"
          z = np.load(path)
          mask = z["response_mask"][-1, :rows] > 0
          raw = np.where(mask, z["raw_influence_weights"][-1, :rows], np.nan)
          ids = z["response_ids"][-1, :rows]
          tok_file = pathlib.Path(WORKDIR) / "tokenizer" / "tokenizer.json"
          if tok_file.exists():  # tiny_cpu writes its character tokenizer into the workdir
            import tokenizers
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
            text = lambda i: (tok.id_to_token(int(i)) or "?").replace("<|im_end|>", "EOS")
          else:
            text = str
          span = max(float(np.nanmax(np.abs(raw - 1.0))), 1e-6)
          cmap = plt.get_cmap("RdBu_r").copy()
          cmap.set_bad("0.85")
          fig, ax = plt.subplots(figsize=(14, 0.5 + 0.45 * len(raw)))
          ax.imshow(raw, aspect="auto", cmap=cmap, vmin=1.0 - span, vmax=1.0 + span,
                    interpolation="nearest")
          for (r, c), m in np.ndenumerate(mask):
            if m:
              ax.text(c, r, text(ids[r, c]), ha="center", va="center", fontsize=7)
          adv = np.where(mask, z["advantages"][-1, :rows], 0.0).sum(-1)
          adv = adv / np.maximum(mask.sum(-1), 1)  # per-sequence A
          ax.set_yticks(range(len(raw)), [f"A={a:+.2f}" for a in adv], fontsize=7)
          ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
          ax.set(xlabel="response token t",
                 title=f"last mini-batch of {os.path.basename(path)}: tokens coloured by exp(F) "
                       f"(max |exp(F) - 1| = {span:.1e})")
          plt.show()


        if dumps:
          draw_tokens(dumps[-1])
        else:
          print("SECTION 4 SKIPPED: trainer not available (see above).")
        """, "plot", "trainer"),
    _md("""
        ## Takeaways

        - `tau` is a half-life in tokens: 32 means a move 32 tokens later counts half.
        - High-only clipping (`[1, 1 + eps_f]`) never down-weights a token; it amplifies
          tokens whose future the update is reinforcing. Symmetric clipping also damps tokens
          whose future is being suppressed.
        - The safety threshold only changes gradients when `S < c`: at `S = c` every token it
          touches is already dual-clipped, where the gradient is zero.
        - FIPO does nothing on the first mini-batch after a rollout; its strength grows with the
          number of optimizer steps per rollout batch.
        """),
]


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=CELLS)
  nb.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  # Stable cell ids keep the stored file byte-identical between builds.
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i:02d}"
  return nb


def main() -> None:
  nb = build()
  nbformat.validate(nb)
  nbformat.write(nb, NOTEBOOK)
  print(f"wrote {NOTEBOOK} ({len(nb.cells)} cells)")


if __name__ == "__main__":
  main()
