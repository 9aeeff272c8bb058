"""Synthetic run directories and frames for the analysis tests (no torch, no training).

``write_run`` writes the four files of a run directory the way ``occ rl`` / ``occ probe`` /
``occ eval`` do; ``synthetic_metrics``, ``synthetic_probes`` and ``synthetic_eval`` fill them with
data shaped like the real thing (every key the figures read); ``make_study`` builds a small study
of every regime with MTP over two seeds. ``rows`` builds a frame directly for the claim tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

MODULES = ("embed", "block.0", "block.1", "final_norm")
SUITES = ("addition", "signed", "multiplication", "linear", "countdown", "length_gen")
LR = 1e-3
NAN = float("nan")

# per regime: C at step 1, decay time of C (steps; inf: none), Q, time per step, accuracy offset
REGIME_SHAPE = {
    "detach": dict(c0=0.0, tau=math.inf, q=0.0, train_s=0.010, acc=0.0),
    "ce": dict(c0=0.01, tau=math.inf, q=-400.0, train_s=0.010, acc=-0.05),
    "policy": dict(c0=0.4, tau=10.0, q=-400.0, train_s=0.010, acc=0.02),
    "occ": dict(c0=0.3, tau=10.0, q=-400.0, train_s=0.010, acc=0.03),
}


def write_run(root: Path, name: str, regime: str, seed: int, metrics: list[dict[str, Any]],
              probes: pd.DataFrame | None = None, evaluation: dict[str, Any] | None = None,
              proxy: str = "reference", mtp_coef: float = 0.1, init: str = "ck") -> Path:
    run = Path(root) / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "synthetic", "seed": seed, "task": {"suites": list(SUITES[:5])},
           "rl": {"init": init, "regime": regime, "proxy": proxy, "mtp_coef": mtp_coef, "steps": len(metrics),
                  "lr": LR}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(_null(r)) + "\n" for r in metrics))
    if probes is not None:
        probes.to_parquet(run / "probes.parquet", index=False)
    if evaluation is not None:
        (run / "eval.json").write_text(json.dumps(evaluation))
    return run


def _null(rec: dict[str, Any]) -> dict[str, Any]:
    """As ``MetricsWriter`` writes: non-finite floats become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}


def diag_steps(steps: int, every: int) -> list[int]:
    return sorted({1, *range(every, steps + 1, every)})


def probe_record(regime: str, step: int, rng: np.random.Generator, minibatches: int = 2) -> dict[str, Any]:
    """Every scalar probe key of one diagnosed step, from the regime's shape: C = c0·exp(−(step−1)/τ),
    Q persistent, λ* = −C/(ηQ), curve Δ(λ) = ηCλ + ½η²Qλ², proxies ≈ λ* (reference 0 on the first
    minibatch after a rollout), Taylor residual ∝ η³."""
    s = REGIME_SHAPE[regime]
    c = s["c0"] * math.exp(-(step - 1) / s["tau"]) * (1 + 0.05 * rng.standard_normal()) if s["c0"] else 0.0
    q = s["q"] * (1 + 0.05 * rng.standard_normal()) if s["q"] else 0.0
    alpha, beta = LR * c, LR**2 * q
    flat = alpha == 0 and beta == 0
    lam_star = -alpha / beta if beta < 0 else NAN
    first = (step - 1) % minibatches == 0
    ref = 0.0 if first else lam_star * math.exp(0.2 * rng.standard_normal()) if not flat else 0.0
    adam = {f"diag/adam/{k}": NAN for k in ("corr", "curv", "lambda_star")} if step == 1 else {
        "diag/adam/corr": 1e3 * c, "diag/adam/curv": 1e6 * q, "diag/adam/lambda_star": lam_star}
    scale = max(abs(lam_star) if math.isfinite(lam_star) else 0.0, 1.0)
    lams = np.array([-1.0, -0.5, 0.0, 0.1, 0.5, 1.0, 2.0]) * scale
    deltas = alpha * lams + 0.5 * beta * lams**2 + (0 if flat else 1e-3 * abs(alpha) * rng.standard_normal(lams.size))
    lrs = LR / 2.0 ** np.arange(4)
    return real_step_record(alpha, beta, lam_star, step, rng) | {
        "stats/q_minus_old/mean": -2.0, "stats/q_minus_old/std": 1.0, "stats/q_minus_old/max_abs": 6.0,
        "stats/l_minus_old/mean": 0.0 if first else 0.01, "diag/curve/l_eff": NAN if flat else 2.0 / LR,
        **{f"diag/{g}/proj": NAN if g != "sgd" and step == 1 else 0.5 * lam_star for g in ("sgd", "adam_step")},
    } | {
        "step": step, "first_after_rollout": first, "diag/lr": LR, "lambda/used": 0.1,
        "diag/sgd/corr": c, "diag/sgd/curv": q, "diag/sgd/lambda_star": lam_star,
        "diag/sgd/cosine": NAN if flat else float(np.clip(c / 0.5, -1, 1)), **adam,
        "diag/curve/geometry": "sgd" if step == 1 else "adam", "diag/curve/flat": flat,
        "diag/curve/alpha": alpha, "diag/curve/beta": beta, "diag/curve/r2": NAN if flat else 0.99,
        "diag/curve/lambda_star": lam_star, "diag/curve/concave": beta < 0,
        "lambda/reference": ref, "lambda/least_squares": NAN if flat else 0.5 * lam_star,
        "lambda/fisher": NAN if flat else lam_star * math.exp(0.5 * rng.standard_normal()),
        "curve/lams": lams.tolist(), "curve/deltas": deltas.tolist(),
        "taylor/lrs": lrs.tolist(), "taylor/residuals": [] if flat else (5e3 * lrs**3).tolist(),
        "diag/taylor/slope": NAN if flat else 3.0,
    }


MODEL_ERRORS = {"sgd": (5.0, 0.5), "adam": (2.0, 0.2), "adam_step": (1.0, 0.05), "adam_stationary": (1.0, 0.3)}
"""Per geometry: the factor by which its model's α is off, and the noise of its β (adam_step is the best)."""


def real_step_record(alpha: float, beta: float, lam_star: float, step: int, rng: np.random.Generator
                     ) -> dict[str, Any]:
    """The keys the real-step probe logs: each geometry's model and adam_real's against a real curve
    Δ = αλ + ½βλ² (the local grid and its fit, the fine grid and the real optimum at λ* with and without the clip);
    Adam geometries NaN at step 1 (no optimizer state), which is a control (a sign step), as detach's probes are."""
    flat = alpha == 0 and beta == 0
    out: dict[str, Any] = {"diag/control": "detach" if flat else "first_step" if step == 1 else "",
                           "diag/adam_t": step}
    opt = lam_star if math.isfinite(lam_star) else 0.0

    def real(lam: float) -> float:
        return alpha * lam + 0.5 * beta * lam * lam

    for g, (a_off, b_noise) in MODEL_ERRORS.items():
        if g != "sgd" and step == 1:
            out |= {f"diag/{g}/{k}": NAN for k in ("alpha_model", "beta_model", "lambda_star", "lambda_bal",
                                                   "alpha_rel_err", "beta_rel_err", "delta_at_lambda_star",
                                                   "optimum_ratio", "corr", "curv")}
            out[f"diag/{g}/concave"] = None
            continue
        am, bm = alpha * a_off, beta * (1 + b_noise * rng.standard_normal())
        ls = -am / bm if bm < 0 else NAN
        out |= {f"diag/{g}/alpha_model": am, f"diag/{g}/beta_model": bm, f"diag/{g}/lambda_star": ls,
                f"diag/{g}/lambda_bal": 1.0, f"diag/{g}/concave": bool(bm < 0),
                f"diag/{g}/alpha_rel_err": NAN if flat else abs(a_off - 1),
                f"diag/{g}/beta_rel_err": NAN if flat else abs(bm / beta - 1),
                f"diag/{g}/delta_at_lambda_star": real(ls) if math.isfinite(ls) else NAN,
                f"diag/{g}/delta_at_lambda_star_noclip": real(ls) if math.isfinite(ls) else NAN,
                f"diag/{g}/optimum_ratio": ls / opt if math.isfinite(ls) and opt else NAN,
                f"diag/{g}/corr": alpha / LR * 1e3, f"diag/{g}/curv": beta / LR**2 * 1e6}
    real_star = opt * (1 + 0.1 * rng.standard_normal()) if not flat else 0.0
    out |= {"diag/adam_real/alpha": alpha, "diag/adam_real/beta": beta if not flat else -1e-9,
            "diag/adam_real/lambda_star": real_star, "diag/adam_real/lambda_star_clamped": real_star,
            "diag/adam_real/clip_active": bool(step % 3 == 0), "diag/adam_real/clip_factor": 1.0,
            # detach's probes: the clip factor at the λ used differs from λ = 0's (θ_M's gradient in the norm) in most
            "diag/adam_real/clip_factor_at_used": 0.9 if flat and step % 5 else 1.0,
            "diag/adam_real/delta_at_lambda_star": real(real_star), "diag/adam_real_noclip/lambda_star": real_star,
            "diag/adam_real/delta_at_lambda_star_noclip": real(real_star), "diag/adam_real/alpha_rel_err": 0.01,
            "diag/adam_real/beta_rel_err": 0.02, "diag/real_beta/clip_share": 0.6, "diag/real_beta/vhat_share": 0.3,
            "diag/real_beta/rest_share": 0.1}
    scale = abs(lam_star) if math.isfinite(lam_star) else 1.0
    local = np.linspace(-0.5, 0.5, 7) * scale
    fine = np.unique(np.concatenate([-np.logspace(-3, 1, 9), [0.0], np.logspace(-3, 1, 9)]) * scale)
    out |= {"curve/real_local_lams": local.tolist(), "curve/real_local_deltas": [real(x) for x in local],
            "diag/curve_real_local/alpha": alpha, "diag/curve_real_local/beta": beta,
            "diag/curve_real_local/r2": NAN if flat else 0.99, "diag/curve_real_local/concave": bool(beta < 0),
            "curve/real_fine_lams": fine.tolist(), "curve/real_fine_deltas": [real(x) for x in fine],
            "curve/real_fine_clipped": (np.abs(fine) > 2 * scale).tolist(),
            "diag/real_optimum/lambda": opt, "diag/real_optimum/delta": real(opt), "diag/real_optimum/at_edge": False,
            "diag/real_optimum/delta_at_used": -1e-9 if flat else real(0.1),
            "diag/real_optimum_noclip/lambda": opt, "diag/real_optimum_noclip/delta": real(opt)}
    return out | {"diag/lambda_clip_lo": -2 * scale, "diag/lambda_clip_hi": 2 * scale}


def synthetic_metrics(regime: str, seed: int, steps: int = 24, diag_every: int = 4, eval_every: int = 8
                      ) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, len(regime)])
    s = REGIME_SHAPE[regime]
    diagnosed = set(diag_steps(steps, diag_every))
    out = []
    for step in range(1, steps + 1):
        rec: dict[str, Any] = {"step": step, "rollout": (step + 1) // 2, "first_after_rollout": step % 2 == 1,
                               "reward/mean": min(1.0, 0.2 + 0.02 * step + 0.05 * rng.standard_normal()),
                               "reward/std": 0.3, "rl/objective": 0.1, "lambda/used": 0.1,
                               "lambda/rule": {"occ": "reference", "detach": "fixed"}.get(regime, "fixed"),
                               "rl/clip_active": step % 3 == 0, "rl/grad_norm_mtp_share": 0.01,
                               "perf/train_s": s["train_s"] * (1 + 0.01 * rng.standard_normal()),
                               "perf/diag_s": 0.02, "perf/step_s": s["train_s"]}  # the recorder: every step
        if step in diagnosed:
            probe = probe_record(regime, step, rng)
            rec |= {k: v for k, v in probe.items() if not isinstance(v, list) and k not in rec}
            rec["perf/diag_s"], rec["perf/train_s"] = 0.5, 0.05  # diagnosed steps are slower: never compared
            cos = probe["diag/sgd/cosine"]
            rec["diag/grad/cos"] = cos
            rec |= {f"diag/module/{m}/cos": cos * (1 - 0.2 * i) for i, m in enumerate(MODULES)}
        if step % eval_every == 0:
            rec |= {f"eval/{suite}/greedy_acc": 0.3 + 0.01 * step for suite in SUITES[:2]}
        out.append(rec)
    return out


def synthetic_probes(regime: str, seed: int, run: str, steps: int = 24, diag_every: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng([seed, len(regime), 1])
    recs = [probe_record(regime, s, rng) for s in diag_steps(steps, diag_every)]
    return pd.DataFrame([{"run": run, "regime": regime, "seed": seed, "proxy": "reference", "mtp_coef": 0.1} | r
                         for r in recs])


def eval_result(acc: dict[str, float], greedy_offset: float = 0.0) -> dict[str, Any]:
    """An ``eval.json`` with sampled accuracy ``acc`` per suite and greedy ``acc + greedy_offset``."""
    suites = {s: {"n": 50, "greedy_acc": a + greedy_offset, "mean_at_k": a, "k": 4} for s, a in acc.items()}
    return {"suites": suites, "mean_greedy_acc": float(np.mean(list(acc.values()))) + greedy_offset,
            "mean_at_k": float(np.mean(list(acc.values())))}


def synthetic_eval(regime: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, len(regime), 2])
    return eval_result({s: float(np.clip(0.5 + REGIME_SHAPE[regime]["acc"] + 0.02 * rng.standard_normal(), 0, 1))
                        for s in SUITES})


SFT_ACCURACY = 0.3


def write_sft_eval(root: Path, acc: float = SFT_ACCURACY) -> str:
    """The SFT checkpoint's ``eval.json`` (as ``occ eval CHECKPOINT`` writes it) in ``root/ck``; returns its path."""
    ck = Path(root) / "ck"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "eval.json").write_text(json.dumps(eval_result({s: acc for s in SUITES})))
    return str(ck)


def make_study(root: Path, regimes: tuple[str, ...] = ("detach", "ce", "policy", "occ"),
               seeds: tuple[int, ...] = (0, 1, 2), steps: int = 24, with_probes: bool = True, with_eval: bool = True
               ) -> list[Path]:
    """One run directory per (regime, seed) under ``root/runs``, with probes.parquet and eval.json, all started
    from one SFT checkpoint ``root/ck`` with an ``eval.json`` (when ``with_eval``)."""
    init = write_sft_eval(root) if with_eval else "ck"
    runs = []
    for regime in regimes:
        for seed in seeds:
            name = f"synthetic__{regime}__{seed}"
            probes = synthetic_probes(regime, seed, name, steps) if with_probes else None
            ev = synthetic_eval(regime, seed) if with_eval else None
            runs.append(write_run(Path(root) / "runs", name, regime, seed, synthetic_metrics(regime, seed, steps),
                                  probes, ev, init=init))
    return runs


def rows(regime: str, steps: list[int] | None = None, seed: int = 0, run: str | None = None,
         **columns: Any) -> pd.DataFrame:
    """A tidy frame of ``len(steps)`` rows of one run; each column a scalar (broadcast) or a list."""
    steps = steps if steps is not None else [1, 2, 3]
    data = {"run": run or f"{regime}_{seed}", "regime": regime, "seed": seed, "step": steps}
    return pd.DataFrame(data | columns)
