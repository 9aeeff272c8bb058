"""Tidy frames built from loaded runs, and the column check every figure and claim shares.

* ``metrics_frame``: every metrics row of every RL run, with ``run``, ``regime``, ``seed`` first.
* ``probes_frame``: one row per diagnosed step: ``probes.parquet`` where a run has one, else the
  ``diag/…`` rows of its metrics (no measured-curve lists then); ``source`` says which.
* ``eval_frame``: one row per (run, suite) of ``eval.json``; ``sft_eval_frame`` the same for the SFT
  checkpoint each run started from.

Every row carries ``ID_COLUMNS``. Quantities in a geometry are never pooled across geometries:
``run_geometry`` names the one the claims read, and rows without it are left out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from occ_theory import names

from .load import Run

ID_COLUMNS = ("run", "regime", "arm", "seed", "mtp_coef", "base_coef")
"""Columns every frame row carries: the run, its regime and arm (``load.arm_name``), seed, ``rl.mtp_coef``
and the proxies' base coefficient ``c`` (``Run.base_coef``)."""
SUITES, REGIME_ORDER, PROXIES = names.SUITES, names.REGIMES, names.PROXY_NAMES
"""The six evaluation suites, the regimes and the proxies, in display order (``occ_theory.names``)."""
GEOMETRIES = ("sgd", "adam", "adam_step", "adam_stationary")
"""The probe's affine geometries θ + s + λa (docs/theory.md section 2, "The optimizer's real step"); keys
``diag/<G>/…`` with ``alpha_model``, ``beta_model``, ``lambda_star``."""
REAL_GEOMETRY = "adam_real"
"""The real, clipped AdamW step's own second-order model (keys ``diag/adam_real/alpha``, ``beta``,
``lambda_star``, ``lambda_star_clamped``): judged by its clamped λ*."""
ALL_GEOMETRIES = (*GEOMETRIES, REAL_GEOMETRY)
RUN_GEOMETRY_ORDER = ("adam_step", "adam", "sgd")
"""The affine geometry of the step a run takes, most faithful first: ``adam_step`` (the AdamW step itself), the
fixed-P ``adam`` model (probes without ``adam_step``), ``sgd``."""
REAL_LOCAL = "diag/curve_real_local/"
"""Key prefix of the quadratic fitted to the real-step curve on the local λ grid (|λ| ≤ λ_bal): a local descriptor."""
REAL_OPT, REAL_OPT_NOCLIP = "diag/real_optimum/", "diag/real_optimum_noclip/"
"""Key prefixes of the real optimum (docs/theory.md section 5): the maximum of the real Δ found on a fine grid,
with the run's clip and without it (the counterfactual at the same state)."""
CONTROLS = ("detach", "first_step")
"""Probes that are controls, not evidence about the model of J (``diag/control``): detach (u = 0 on θ_S: its
real curve is the clip alone) and AdamW's first step (a sign step)."""


def require(df: pd.DataFrame, cols: Iterable[str], figure: str) -> None:
    """Raise ``ValueError`` naming ``figure`` and every column of ``cols`` that ``df`` lacks.

    A column containing ``*`` is a pattern (``diag/module/*/cos``): some column must match it."""
    have = [str(c) for c in df.columns]
    missing = [c for c in cols if (not fnmatch.filter(have, c) if "*" in c else c not in have)]
    if missing:
        raise ValueError(f"{figure}: the data lacks the column(s) {missing}")


def _with_ids(df: pd.DataFrame, run: Run) -> pd.DataFrame:
    df = df.drop(columns=[c for c in ID_COLUMNS if c in df.columns])
    ids = pd.DataFrame({"run": run.name, "regime": run.regime, "arm": run.arm, "seed": run.seed,
                        "mtp_coef": run.rl.get("mtp_coef", np.nan), "base_coef": run.base_coef}, index=df.index)
    return pd.concat([ids, df], axis=1)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"run": pd.Series(dtype=str), "regime": pd.Series(dtype=str), "arm": pd.Series(dtype=str),
                             "seed": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64")})
    return pd.concat(frames, ignore_index=True, sort=False).copy()  # one block per dtype, not per column


def metrics_frame(runs: Sequence[Run]) -> pd.DataFrame:
    return _concat([_with_ids(r.metrics, r) for r in runs])


def diag_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """The diagnosed steps of one run's metrics (rows with any non-null ``diag/…`` value)."""
    cols = [c for c in metrics.columns if str(c).startswith("diag/")]
    if not cols:
        return metrics.iloc[0:0]
    return metrics[metrics[cols].notna().any(axis=1)]


def probes_frame(runs: Sequence[Run]) -> pd.DataFrame:
    frames = []
    for r in runs:
        if r.probes is not None:
            frames.append(_with_ids(r.probes, r).assign(source=names.PROBES_FILE))
        else:
            frames.append(_with_ids(diag_rows(r.metrics), r).assign(source=names.METRICS_FILE))
    return _concat(frames)


EVAL_COLUMNS = ["run", "regime", "arm", "seed", "mtp_coef", "init", "suite", "trained", "n", "greedy_acc", "mean_at_k"]


def _eval_rows(run: Run, result: dict, **ids) -> list[dict]:
    trained = run.rl_suites
    return [{"run": run.name, "regime": run.regime, "arm": run.arm, "seed": run.seed,
             "mtp_coef": run.rl.get("mtp_coef", np.nan), "init": str(run.rl.get("init")), "suite": suite,
             "trained": trained is None or suite in trained, "n": e.get("n", np.nan),
             "greedy_acc": e.get("greedy_acc", np.nan), "mean_at_k": e.get("mean_at_k", np.nan)} | ids
            for suite, e in result["suites"].items()]


def _eval_df(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=EVAL_COLUMNS).astype({"greedy_acc": float, "mean_at_k": float})


def eval_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (run, suite) of each run's ``eval.json``; ``trained``: the suite is one RL trained on."""
    return _eval_df([row for r in runs if r.eval is not None for row in _eval_rows(r, r.eval)])


def sft_eval_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (run, suite) of the ``eval.json`` of the SFT checkpoint each run started from
    (``rl.init``), labelled with the run (its arm ``sft``), so a run's gain pairs with its own start."""
    return _eval_df([row for r in runs if r.sft_eval is not None for row in _eval_rows(r, r.sft_eval, arm="sft")])


def held_out_frame(evals: pd.DataFrame, sft_evals: pd.DataFrame) -> pd.DataFrame:
    """``evals`` and, as the arm ``sft``, each SFT checkpoint the runs started from (once per checkpoint)."""
    sft = sft_evals.drop_duplicates(["init", "suite"]).assign(run=lambda d: d["init"], arm="sft")
    return pd.concat([evals, sft], ignore_index=True) if len(sft) else evals


# ------------------------------------------------------------------ shared selections


def regimes_in(df: pd.DataFrame) -> list[str]:
    """Regimes present in ``df``, in the canonical order (unknown ones last, sorted)."""
    present = set(df["regime"].dropna().astype(str)) if "regime" in df else set()
    return [r for r in REGIME_ORDER if r in present] + sorted(present - set(REGIME_ORDER))


def suites_in(names: Iterable[str]) -> list[str]:
    names = set(names)
    return [s for s in SUITES if s in names] + sorted(names - set(SUITES))


def numeric(df: pd.DataFrame, col: str) -> pd.Series:
    """``df[col]`` as floats (NaN where absent or not a number)."""
    if col not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float)


def geo_key(geometry: str, key: str) -> str:
    return f"diag/{geometry}/{key}"


def run_geometry(df: pd.DataFrame, key: str = "lambda_star") -> str:
    """The geometry of the runs' own optimizer step in which ``diag/<G>/<key>`` is logged: the first of
    ``RUN_GEOMETRY_ORDER`` with a finite value, else ``sgd``. Rows where that geometry has no value (step 1
    has no Adam state: its geometry is sgd) are left out by the caller, never filled from another."""
    for g in RUN_GEOMETRY_ORDER:
        if np.isfinite(numeric(df, geo_key(g, key))).any():
            return g
    return "sgd"


def at_edge(df: pd.DataFrame) -> pd.Series:
    """Whether a probe's real optimum lies at the edge of its fine grid: then it is a bound, not the optimum."""
    if REAL_OPT + "at_edge" not in df:
        return pd.Series(False, index=df.index)
    return df[REAL_OPT + "at_edge"].map(lambda v: bool(v) if isinstance(v, bool | np.bool_) else False)


def lambda_star_fit(df: pd.DataFrame) -> tuple[pd.Series, str]:
    """The ground truth λ per row and the column it came from: the real optimum (``diag/real_optimum/lambda``, the
    maximum of the real step's Δ, docs/theory.md section 5) when any row has it, NaN where it lies at the edge of
    its grid (a bound only; ``at_edge`` counts them); else the vertex of the quadratic fitted to the model-step
    curve (``diag/curve/lambda_star``, probes without ``diag.curve_real_step``; NaN where that curve is not
    concave), named as such."""
    col = REAL_OPT + "lambda"
    if np.isfinite(numeric(df, col)).any():
        return numeric(df, col).where(~at_edge(df)), col
    if np.isfinite(numeric(df, "diag/curve/lambda_star")).any():
        return numeric(df, "diag/curve/lambda_star"), "diag/curve/lambda_star"
    return numeric(df, col), col


def control(df: pd.DataFrame) -> pd.Series:
    """Each probe's control kind (``CONTROLS``) or ''. From ``diag/control`` where logged; else a detach run's
    probes, and step-1 probes (no Adam state yet), are the controls."""
    regime = df["regime"] if "regime" in df else pd.Series("", index=df.index)
    step = numeric(df, "step")
    inferred = pd.Series(np.where(regime == "detach", "detach", np.where(step == 1, "first_step", "")), index=df.index)
    if "diag/control" not in df:
        return inferred
    logged = df["diag/control"].map(lambda v: v if isinstance(v, str) else None)
    return logged.where(logged.notna(), inferred)  # row by row: probes written before the key are inferred


def minibatch_index(df: pd.DataFrame) -> tuple[pd.Series, str]:
    """The minibatch index k after a rollout (0: first) and its source: ``minibatch_index`` when logged, else
    ``first_after_rollout`` (k = 0 when true, 1 standing for "a later minibatch"), else NaN."""
    if "minibatch_index" in df and np.isfinite(numeric(df, "minibatch_index")).any():
        return numeric(df, "minibatch_index"), "minibatch_index"
    if "first_after_rollout" in df:
        first = df["first_after_rollout"].map(lambda v: np.nan if v is None or v != v else float(not bool(v)))
        return first.astype(float), "first_after_rollout"
    return pd.Series(np.nan, index=df.index, dtype=float), "none"


def cosine(df: pd.DataFrame, geometry: str) -> tuple[pd.Series, str]:
    """cos(g, u) in ``geometry`` (``diag/<G>/cosine``) and the geometry it is in: the parameter-space
    cosine (``diag/sgd/cosine``, else the trainer's ``diag/grad/cos``) when ``geometry`` has none logged."""
    c = numeric(df, geo_key(geometry, "cosine"))
    if np.isfinite(c).any():
        return c, geometry
    c = numeric(df, "diag/sgd/cosine")
    return c.where(np.isfinite(c), numeric(df, "diag/grad/cos")), "sgd"


def proxy_points(df: pd.DataFrame, proxy: str, regimes: Sequence[str] = ("policy", "occ"),
                 truth: pd.Series | None = None, keep_nan: bool = False) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of ``regimes`` with a finite ``lambda/<proxy>`` (a column name with a ``/`` is read as it is, e.g.
    ``lambda/used``) and ground truth (``lambda_star_fit``, or ``truth`` aligned with ``df``) (columns ``run``,
    ``regime``, ``step``, ``k`` (minibatch index), ``proxy``, ``fit``); ``keep_nan``: the rows where either is NaN
    too (they are counted, never silently dropped: ``stats.impute_discordant`` bounds what they could do).

    The ``reference`` and ``least_squares`` proxies are 0 by construction on the first minibatch after
    each rollout (l = l_old): those rows are dropped (k = 0 where recorded, else exact zeros).
    Returns the points and the counts dropped."""
    sel = df[df["regime"].isin(regimes)] if "regime" in df else df.iloc[0:0]
    k, _ = minibatch_index(sel)
    pts = pd.DataFrame({"run": sel.get("run"), "regime": sel.get("regime"), "step": numeric(sel, "step"), "k": k,
                        "proxy": numeric(sel, proxy if "/" in proxy else f"lambda/{proxy}"),
                        "fit": lambda_star_fit(sel)[0] if truth is None else truth.reindex(sel.index)})
    finite = np.isfinite(pts["proxy"]) & np.isfinite(pts["fit"])
    if proxy not in ("reference", "least_squares"):  # both are ∝ (l − l_old): exactly 0 when l = l_old
        zero = pd.Series(False, index=pts.index)
    elif np.isfinite(k).any():
        zero = k == 0
    else:
        zero = pts["proxy"] == 0
    dropped = {"no_finite_fit": int((np.isfinite(pts["proxy"]) & ~np.isfinite(pts["fit"])).sum()),
               "proxy_not_finite": int((~np.isfinite(pts["proxy"])).sum()),
               "zero_by_construction": int((finite & zero).sum())}
    return pts[(finite | keep_nan) & ~zero].reset_index(drop=True), dropped


def arm_order(arms: Iterable[str]) -> list[str]:
    """Arms in display order: by regime (``REGIME_ORDER``), then by λ (``ce@0.03`` before ``ce@0.1``), then name."""
    def key(arm: str) -> tuple:
        base = arm.split("+")[0]
        regime, _, coef = base.partition("@")
        regime = regime.split("/")[0]
        rank = REGIME_ORDER.index(regime) if regime in REGIME_ORDER else len(REGIME_ORDER)
        try:
            lam = float(coef) if coef else 0.0
        except ValueError:
            lam = 0.0
        return (rank, regime, lam, arm)
    return sorted(set(arms), key=key)
