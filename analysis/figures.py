"""The figures, F1–F7: one function each, over the tidy frames of ``analysis.frames``.

Every function is declared with ``@figure(title, *REQUIRES)``: the columns it needs are checked
first (``require`` raises a ``ValueError`` naming the figure and the missing columns). A regime
without data is left out of a figure; a figure without any data raises ``ValueError`` saying so.
Each writes ``out`` as PNG (and PDF when ``pdf``) and returns the PNG path. One regime has one
colour everywhere (``style.REGIME_COLORS``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from .frames import (
    PROXIES,
    exact_lambda_star,
    numeric,
    pick_geometry,
    proxy_points,
    regimes_in,
    require,
    suites_in,
)
from .frames import cosine as cosine_of
from .stats import loglog_slope, spearman, spread
from .style import PROXY_COLORS, PROXY_MARKERS, figure, new_figure, regime_color, save, symlog_if_mixed

__all__ = ["eval_table", "f1_reward", "f2_decomposition", "f3_curves", "f4_proxies", "f5_eval",
           "f6_module_cosine", "f7_taylor", "held_out_accuracy", "require"]

BAND = "band: min–max over runs"


def _band(ax, sp: pd.DataFrame, x: str, color: str, label: str, marker: str | None = None) -> None:
    ax.plot(sp[x], sp["mean"], color=color, label=label, marker=marker, ms=3, lw=1.4)
    if (sp["n"] > 1).any():
        ax.fill_between(sp[x], sp["min"], sp["max"], color=color, alpha=0.18, lw=0)


def _runs(df: pd.DataFrame) -> str:
    n = int(df["run"].nunique())
    return f"{n} run" if n == 1 else f"{n} runs"


# ------------------------------------------------------------------ F1


def held_out_accuracy(metrics: pd.DataFrame) -> pd.Series:
    """``eval/mean_greedy_acc``, else the mean of the logged ``eval/<suite>/greedy_acc`` columns (NaN elsewhere)."""
    acc = numeric(metrics, "eval/mean_greedy_acc")
    cols = [c for c in metrics.columns if re.fullmatch(r"eval/[^/]+/greedy_acc", str(c))]
    if cols:
        acc = acc.where(np.isfinite(acc), metrics[cols].apply(pd.to_numeric, errors="coerce").mean(axis=1))
    return acc


@figure("F1 reward over training", "run", "regime", "step", "reward/mean")
def f1_reward(metrics: pd.DataFrame, out: Path, pdf: bool = False, smooth: int | None = None) -> Path:
    """Rolling-mean reward (window ``smooth``, default 1/20 of the run) per regime, mean and min–max
    band over runs; held-out greedy accuracy beside it when logged."""
    d = metrics[["run", "regime", "step"]].assign(_r=numeric(metrics, "reward/mean"), _acc=held_out_accuracy(metrics))
    d = d[np.isfinite(d["_r"])]
    if d.empty:
        raise ValueError("F1 reward over training: no finite reward/mean values")
    window = smooth or max(1, int(d.groupby("run")["step"].count().max()) // 20)
    d = d.assign(_rs=d.groupby("run")["_r"].transform(lambda s: s.rolling(window, min_periods=1).mean()))
    has_acc = bool(np.isfinite(d["_acc"]).any())
    fig = new_figure(11 if has_acc else 6, 3.8)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    for regime in regimes_in(d):
        r = d[d["regime"] == regime]
        _band(axes[0], spread(r, "step", "_rs"), "step", regime_color(regime), f"{regime} ({_runs(r)})")
        if has_acc and np.isfinite(r["_acc"]).any():
            _band(axes[1], spread(r, "step", "_acc"), "step", regime_color(regime), regime, marker="o")
    axes[0].set(xlabel="optimizer step", ylabel=f"reward (rolling mean, {window} steps)" if window > 1 else "reward",
                title=f"Training reward ({BAND})")
    axes[0].legend(fontsize=8)
    if has_acc:
        axes[1].set(xlabel="optimizer step", ylabel="held-out greedy accuracy (mean over suites)",
                    title="Held-out accuracy during training")
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F2


@figure("F2 C and Q over training", "run", "regime", "step", "diag/sgd/corr", "diag/sgd/curv")
def f2_decomposition(probes: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """C = gᵀPu, Q = (Pu)ᵀH(Pu) and cos(g, u) per regime over training (Adam P where logged)."""
    geom = pick_geometry(probes)
    pname = "Adam P" if geom == "adam" else "P = I (SGD)"
    panels = [(f"diag/{geom}/corr", f"C = gᵀPu ({pname})"), (f"diag/{geom}/curv", f"Q = (Pu)ᵀH(Pu) ({pname})"),
              ("_cos", "cos(g, u) (parameter space)")]
    d = probes.assign(_cos=cosine_of(probes))
    if not np.isfinite(numeric(d, panels[0][0])).any():
        raise ValueError(f"F2 C and Q over training: no finite {panels[0][0]} values")
    fig = new_figure(14, 3.8)
    axes = fig.subplots(1, 3)
    for ax, (col, label) in zip(axes, panels):
        values = []
        for regime in regimes_in(d):
            r = d[d["regime"] == regime]
            sp = spread(r.assign(_v=numeric(r, col)), "step", "_v")
            if sp.empty:
                continue
            _band(ax, sp, "step", regime_color(regime), f"{regime} ({_runs(r)})", marker="o")
            values += [*sp["min"], *sp["max"]]
        scale = " (symlog)" if symlog_if_mixed(ax, values) else ""
        ax.axhline(0, color="0.6", lw=0.6)
        ax.set(xlabel="optimizer step", ylabel=label + scale)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Decomposition over training: does C decay while Q persists? ({BAND})", fontsize=10)
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F3


def _as_array(v) -> np.ndarray | None:
    if v is None or (np.isscalar(v) and not isinstance(v, str) and pd.isna(v)):
        return None
    a = np.asarray(v, dtype=float).ravel()
    return a if a.size else None


def _markers(row: pd.Series, exact: float, color: str) -> list[tuple[str, float, str, str]]:
    marks = [("λ used", row.get("diag/lambda_used", np.nan), "0.5", ":"), ("λ*_exact", exact, "black", "--"),
             ("λ*_fit", row.get("diag/curve/lambda_star", np.nan), color, "-")]
    marks += [(f"proxy {p}", row.get(f"lambda/{p}", np.nan), PROXY_COLORS[p], "-.") for p in PROXIES]
    return [(n, float(v), c, ls) for n, v, c, ls in marks if v is not None and np.isfinite(float(v))]


@figure("F3 measured curves", "run", "regime", "step", "curve/lams", "curve/deltas", "diag/curve/alpha",
        "diag/curve/beta")
def f3_curves(probes: pd.DataFrame, out: Path, pdf: bool = False, regimes: tuple[str, ...] = ("policy", "occ")
              ) -> Path:
    """Measured Δ(λ) with the fitted parabola αλ + ½βλ² and markers for λ*_exact, λ*_fit, the λ used
    and each proxy, at an early, a middle and a late probe of one run per regime."""
    has = probes["curve/lams"].map(lambda v: _as_array(v) is not None) & probes["regime"].isin(regimes)
    if "diag/curve/flat" in probes:
        has &= ~probes["diag/curve/flat"].eq(True)
    d = probes[has].assign(_exact=exact_lambda_star(probes[has]))
    shown = [r for r in regimes_in(d)]
    if not shown:
        raise ValueError(f"F3 measured curves: no probe with a measured, non-flat curve in regimes {list(regimes)}")
    fig = new_figure(13, 3.6 * len(shown))
    axes = fig.subplots(len(shown), 3, squeeze=False)
    for row_axes, regime in zip(axes, shown):
        r = d[d["regime"] == regime].sort_values(["seed", "run", "step"])
        run = r[r["run"] == r["run"].iloc[0]]
        picks = sorted({0, len(run) // 2, len(run) - 1})
        for ax in row_axes[len(picks):]:
            ax.set_axis_off()
        for ax, i, when in zip(row_axes, picks, ["early", "middle", "late"] if len(picks) == 3 else
                               ["early", "late"] if len(picks) == 2 else ["only"]):
            _curve_panel(ax, run.iloc[i], regime, when)
    fig.suptitle("Measured Δ(λ) and the fitted parabola", fontsize=10)
    return save(fig, out, pdf)


def _curve_panel(ax, row: pd.Series, regime: str, when: str) -> None:
    color = regime_color(regime)
    lams, deltas = _as_array(row["curve/lams"]), _as_array(row["curve/deltas"])
    ax.scatter(lams, deltas, color=color, zorder=3, s=18, label="measured Δ(λ)")
    lo, hi = float(lams.min()), float(lams.max())
    pad = 0.05 * (hi - lo or 1.0)
    grid = np.linspace(lo - pad, hi + pad, 200)
    a, b = float(row["diag/curve/alpha"]), float(row["diag/curve/beta"])
    if np.isfinite(a) and np.isfinite(b):
        ax.plot(grid, a * grid + 0.5 * b * grid**2, color=color, lw=1.2, label=f"fit α={a:.3g}, β={b:.3g}")
    handles = []
    for name, v, c, ls in _markers(row, row["_exact"], color):
        inside = lo - pad <= v <= hi + pad
        if inside:
            ax.axvline(v, color=c, ls=ls, lw=1)
        handles.append(Line2D([], [], color=c, ls=ls, label=f"{name} = {v:.3g}" + ("" if inside else " (off axis)")))
    ax.set_xlim(lo - pad, hi + pad)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.set(xlabel="λ", ylabel="Δ(λ) = J(θ⁺(λ)) − J(θ⁺(0))",
           title=f"{regime} (seed {row['seed']}), step {int(row['step'])}, {when}")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=6)


# ------------------------------------------------------------------ F4

NO_PROXY_REGIMES = ("off", "detach")


@figure("F4 proxies vs λ*", "run", "regime", "step", "diag/curve/lambda_star", "lambda/reference")
def f4_proxies(probes: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Each proxy, λ*_fit and λ*_exact over training per regime with MTP, and a scatter of each proxy
    against λ*_fit (policy and occ probes when present) with Spearman ρ in the legend."""
    d = probes[~probes["regime"].isin(NO_PROXY_REGIMES)]
    d = d.assign(_exact=exact_lambda_star(d))
    series = [("λ*_fit", "diag/curve/lambda_star", "black", "-"), ("λ*_exact", "_exact", "black", "--")]
    series += [(p, f"lambda/{p}", PROXY_COLORS[p], "-") for p in PROXIES]
    shown = [r for r in regimes_in(d) if any(np.isfinite(numeric(d[d["regime"] == r], c)).any()
                                             for _, c, _, _ in series)]
    if not shown:
        raise ValueError("F4 proxies vs λ*: no finite λ* or proxy value in any regime with an MTP loss")
    fig = new_figure(13, 3.2 * len(shown) + 0.6)
    axes = fig.subplot_mosaic([[f"ts{i}", "scatter"] for i in range(len(shown))], width_ratios=[1.6, 1])
    for i, regime in enumerate(shown):
        ax, r, values = axes[f"ts{i}"], d[d["regime"] == regime], []
        for name, col, c, ls in series:
            sp = spread(r.assign(_v=numeric(r, col)), "step", "_v")
            if not sp.empty:
                ax.plot(sp["step"], sp["mean"], color=c, ls=ls, marker="o", ms=3, lw=1.2, label=name)
                values += list(sp["mean"])
        scale = " (symlog)" if symlog_if_mixed(ax, values) else ""
        ax.set(xlabel="optimizer step", ylabel="coefficient" + scale, title=f"{regime}: proxies and λ* over training")
        ax.title.set_color(regime_color(regime))
        ax.legend(fontsize=7, ncol=2)
    _proxy_scatter(axes["scatter"], d, shown)
    return save(fig, out, pdf)


def _proxy_scatter(ax, d: pd.DataFrame, shown: list[str]) -> None:
    regimes = [r for r in ("policy", "occ") if r in shown] or shown
    handles, xs, ys = [], [], []
    for p in PROXIES:
        pts, dropped = proxy_points(d, p, regimes)
        if pts.empty:
            continue
        ax.scatter(pts["fit"], pts["proxy"], c=[regime_color(r) for r in pts["regime"]], marker=PROXY_MARKERS[p],
                   s=22, alpha=0.8, edgecolors="none")
        rho, pval = spearman(pts["fit"], pts["proxy"])
        txt = f"ρ = {rho:.2f} (p = {pval:.2g})" if np.isfinite(rho) else "ρ n/a"
        zeros = f", {dropped['zero_by_construction']} first-minibatch zeros dropped" if dropped["zero_by_construction"] else ""
        handles.append(Line2D([], [], ls="", marker=PROXY_MARKERS[p], color="0.3",
                              label=f"{p}: {txt}, n = {len(pts)}{zeros}"))
        xs += list(pts["fit"])
        ys += list(pts["proxy"])
    handles += [Line2D([], [], ls="", marker="o", color=regime_color(r), label=r) for r in regimes]
    if xs:
        lim = [min(min(xs), min(ys)), max(max(xs), max(ys))]
        ax.plot(lim, lim, color="0.6", ls=":", lw=1)
        symlog_if_mixed(ax, xs, "x")
        symlog_if_mixed(ax, ys, "y")
    ax.set(xlabel="λ*_fit (measured curve)", ylabel="proxy coefficient", title=f"proxy vs λ*_fit ({' + '.join(regimes)})")
    ax.legend(handles=handles, fontsize=7)


# ------------------------------------------------------------------ F5


def _eval_long(evals: pd.DataFrame) -> pd.DataFrame:
    """Per (run, suite) accuracy plus a ``mean`` pseudo-suite (mean over each run's suites)."""
    mean = evals.groupby(["run", "regime", "seed"], as_index=False)["greedy_acc"].mean().assign(suite="mean")
    return pd.concat([evals[["run", "regime", "seed", "suite", "greedy_acc"]], mean], ignore_index=True)


@figure("F5 evaluation suites", "run", "regime", "suite", "greedy_acc")
def f5_eval(evals: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Greedy accuracy per suite (and the mean over suites) per regime: bars at the mean over runs,
    whiskers min–max."""
    d = evals[np.isfinite(numeric(evals, "greedy_acc"))]
    if d.empty:
        raise ValueError("F5 evaluation suites: no eval.json results")
    d = _eval_long(d)
    suites = [*suites_in(set(d["suite"]) - {"mean"}), "mean"]
    regimes = regimes_in(d)
    width = 0.8 / len(regimes)
    fig = new_figure(max(6, 1.3 * len(suites) + 2), 4)
    ax = fig.subplots()
    for k, regime in enumerate(regimes):
        g = d[d["regime"] == regime].groupby("suite")["greedy_acc"].agg(["mean", "min", "max"]).reindex(suites)
        x = np.arange(len(suites)) + (k - (len(regimes) - 1) / 2) * width
        ax.bar(x, g["mean"], width, color=regime_color(regime), label=f"{regime} ({_runs(d[d['regime'] == regime])})")
        ax.errorbar(x, g["mean"], yerr=[g["mean"] - g["min"], g["max"] - g["mean"]], fmt="none", ecolor="0.2",
                    capsize=2, lw=0.8)
    ax.set_xticks(np.arange(len(suites)), suites, rotation=20)
    ax.set(ylabel="greedy accuracy (pass@1)", ylim=(0, 1.05), title="Held-out suites (bars: mean; whiskers: min–max)")
    ax.legend(fontsize=8)
    return save(fig, out, pdf)


def eval_table(evals: pd.DataFrame) -> str:
    """F5 as markdown: one row per regime, ``mean ± sd (n)`` per suite and for the mean over suites."""
    require(evals, ("run", "regime", "suite", "greedy_acc"), "F5 table")
    d = evals[np.isfinite(numeric(evals, "greedy_acc"))]
    if d.empty:
        return "_no eval.json results_"
    d = _eval_long(d)
    suites = [*suites_in(set(d["suite"]) - {"mean"}), "mean"]
    lines = ["| regime | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
    for regime in regimes_in(d):
        g = d[d["regime"] == regime].groupby("suite")["greedy_acc"].agg(["mean", "std", "count"])
        cells = []
        for s in suites:
            if s not in g.index:
                cells.append("–")
            elif g.loc[s, "count"] > 1:
                cells.append(f"{g.loc[s, 'mean']:.3f} ± {g.loc[s, 'std']:.3f} ({int(g.loc[s, 'count'])})")
            else:
                cells.append(f"{g.loc[s, 'mean']:.3f} (1)")
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ F6

MODULE_COS = re.compile(r"diag/module/(.+)/cos")


def _module_key(group: str) -> tuple:
    m = re.fullmatch(r"block\.(\d+)", group)
    rank = {"embed": 0, "final_norm": 2, "head": 3}.get(group, 1 if m else 4)
    return (rank, int(m.group(1)) if m else 0, group)


@figure("F6 per-module cos(g, u)", "run", "regime", "step", "diag/module/*/cos")
def f6_module_cosine(metrics: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Heatmap of cos(g, u) per module group × diagnosed step, one panel per regime (mean over runs)."""
    groups = sorted((m.group(1) for c in metrics.columns if (m := MODULE_COS.fullmatch(str(c)))), key=_module_key)
    cols = [f"diag/module/{g}/cos" for g in groups]
    vals = metrics[cols].apply(pd.to_numeric, errors="coerce")
    d = metrics[["regime", "step"]].join(vals)[np.isfinite(vals).any(axis=1)]
    shown = regimes_in(d)
    if not shown:
        raise ValueError("F6 per-module cos(g, u): no finite per-module cosine (regimes without an MTP gradient)")
    fig = new_figure(10, 0.5 + (0.9 + 0.28 * len(groups)) * len(shown))
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    for ax, regime in zip(axes, shown):
        mat = d[d["regime"] == regime].groupby("step")[cols].mean()
        im = ax.imshow(mat.T.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ticks = np.arange(0, len(mat), -(-len(mat) // 10))  # a regular stride, at most 10 labels
        ax.set_xticks(ticks, [str(int(s)) for s in mat.index[ticks]])
        ax.set_yticks(np.arange(len(groups)), groups, fontsize=7)
        ax.set_title(f"{regime}: cos(g, u) per module", fontsize=9, color=regime_color(regime))
        ax.set_xlabel("optimizer step")
    fig.colorbar(im, ax=list(axes), label="cos(g, u)", shrink=0.8)
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F7


@figure("F7 Taylor residual", "run", "regime", "taylor/lrs", "taylor/residuals")
def f7_taylor(probes: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """max_λ |Δ_measured − Δ_model| against η on log-log axes, one line per probe, with the fitted
    common slope per regime (expected 3: the model is exact to second order)."""
    fig = new_figure(6.5, 4.5)
    ax = fig.subplots()
    allx, ally, handles = [], [], []
    for regime in regimes_in(probes):
        r = probes[probes["regime"] == regime]
        pairs = [(x, y) for x, y in zip(r["taylor/lrs"].map(_as_array), r["taylor/residuals"].map(_as_array))
                 if x is not None and y is not None and ((x > 0) & (y > 0)).sum() >= 2]
        if not pairs:
            continue
        color = regime_color(regime)
        for x, y in pairs:
            ok = (x > 0) & (y > 0)
            ax.plot(x[ok], y[ok], color=color, alpha=0.35, marker="o", ms=3, lw=1)
            allx += list(x[ok])
            ally += list(y[ok])
        slope = loglog_slope([x for x, _ in pairs], [y for _, y in pairs])
        handles.append(Line2D([], [], color=color, marker="o", label=f"{regime}: slope {slope:.2f} ({len(pairs)} probes)"))
    if not handles:
        raise ValueError("F7 Taylor residual: no probe with at least two positive residuals")
    x0, y0 = np.exp(np.mean(np.log(allx))), np.exp(np.mean(np.log(ally)))
    grid = np.array([min(allx), max(allx)])
    ax.plot(grid, y0 * (grid / x0) ** 3, color="black", ls="--", lw=1)
    handles.append(Line2D([], [], color="black", ls="--", label="slope 3 (expected: O(η³))"))
    ax.set(xscale="log", yscale="log", xlabel="step size η", ylabel="max_λ |Δ_measured − Δ_model|",
           title="Taylor residual of the quadratic model")
    ax.legend(handles=handles, fontsize=8)
    return save(fig, out, pdf)
