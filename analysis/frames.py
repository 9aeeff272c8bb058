"""Tidy frames built from loaded runs, and the column check every figure and claim shares.

* ``metrics_frame``: every metrics row of every RL run, with ``run``, ``regime``, ``seed`` first.
* ``probes_frame``: one row per diagnosed step: ``probes.parquet`` where a run has one, else the
  ``diag/…`` rows of its metrics (no measured-curve lists then); ``source`` says which.
* ``eval_frame``: one row per (run, suite) of ``eval.json``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from occ_theory import names

from .load import Run

ID_COLUMNS = ("run", "regime", "seed")
SUITES, REGIME_ORDER, PROXIES = names.SUITES, names.REGIMES, names.PROXY_NAMES
"""The six evaluation suites, the regimes and the proxies, in display order (``occ_theory.names``)."""


def require(df: pd.DataFrame, cols: Iterable[str], figure: str) -> None:
    """Raise ``ValueError`` naming ``figure`` and every column of ``cols`` that ``df`` lacks.

    A column containing ``*`` is a pattern (``diag/module/*/cos``): some column must match it."""
    have = [str(c) for c in df.columns]
    missing = [c for c in cols if (not fnmatch.filter(have, c) if "*" in c else c not in have)]
    if missing:
        raise ValueError(f"{figure}: the data lacks the column(s) {missing}")


def _with_ids(df: pd.DataFrame, run: Run) -> pd.DataFrame:
    df = df.drop(columns=[c for c in ID_COLUMNS if c in df.columns])
    ids = pd.DataFrame({"run": run.name, "regime": run.regime, "seed": run.seed}, index=df.index)
    return pd.concat([ids, df], axis=1)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({"run": pd.Series(dtype=str), "regime": pd.Series(dtype=str),
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


def eval_frame(runs: Sequence[Run]) -> pd.DataFrame:
    rows = [{"run": r.name, "regime": r.regime, "seed": r.seed, "suite": suite, "n": e.get("n", np.nan),
             "greedy_acc": e.get("greedy_acc", np.nan), "mean_at_k": e.get("mean_at_k", np.nan)}
            for r in runs if r.eval is not None for suite, e in r.eval["suites"].items()]
    cols = ["run", "regime", "seed", "suite", "n", "greedy_acc", "mean_at_k"]
    return pd.DataFrame(rows, columns=cols).astype({"greedy_acc": float, "mean_at_k": float})


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


def pick_geometry(df: pd.DataFrame) -> str:
    """``adam`` when any Adam-geometry decomposition value is finite in ``df``, else ``sgd``."""
    return "adam" if np.isfinite(numeric(df, "diag/adam/corr")).any() else "sgd"


def exact_lambda_star(df: pd.DataFrame) -> pd.Series:
    """λ*_exact of each row in the geometry its curve used (``diag/curve/geometry``; Adam where finite)."""
    adam, sgd = numeric(df, "diag/adam/lambda_star"), numeric(df, "diag/sgd/lambda_star")
    geom = df["diag/curve/geometry"] if "diag/curve/geometry" in df else pd.Series(np.nan, index=df.index)
    use_adam = (geom == "adam") | (geom.isna() & np.isfinite(adam))
    return adam.where(use_adam, sgd)


def cosine(df: pd.DataFrame) -> pd.Series:
    """cos(g, u) in parameter space: ``diag/sgd/cosine`` (probes), else ``diag/grad/cos`` (metrics)."""
    c = numeric(df, "diag/sgd/cosine")
    return c.where(np.isfinite(c), numeric(df, "diag/grad/cos"))


def proxy_points(df: pd.DataFrame, proxy: str, regimes: Sequence[str] = ("policy", "occ")
                 ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of ``regimes`` with a finite ``lambda/<proxy>`` and λ*_fit (columns ``proxy``, ``fit``).

    The ``reference`` and ``least_squares`` proxies are 0 by construction on the first minibatch after
    each rollout (l = l_old): those rows are dropped (by ``first_after_rollout`` where recorded, else exact zeros).
    Returns the points and the counts dropped."""
    sel = df[df["regime"].isin(regimes)] if "regime" in df else df.iloc[0:0]
    pts = pd.DataFrame({"regime": sel.get("regime"), "step": numeric(sel, "step"),
                        "proxy": numeric(sel, f"lambda/{proxy}"), "fit": numeric(sel, "diag/curve/lambda_star")})
    finite = np.isfinite(pts["proxy"]) & np.isfinite(pts["fit"])
    if proxy not in ("reference", "least_squares"):  # both are ∝ (l − l_old): exactly 0 when l = l_old
        zero = pd.Series(False, index=pts.index)
    elif "first_after_rollout" in sel:
        zero = sel["first_after_rollout"].fillna(False).astype(bool)
    else:
        zero = pts["proxy"] == 0
    dropped = {"no_finite_fit": int((np.isfinite(pts["proxy"]) & ~np.isfinite(pts["fit"])).sum()),
               "proxy_not_finite": int((~np.isfinite(pts["proxy"])).sum()),
               "zero_by_construction": int((finite & zero).sum())}
    return pts[finite & ~zero].reset_index(drop=True), dropped
