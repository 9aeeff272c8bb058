"""The figures, F1–F9: one function each, over the tidy frames of ``analysis.frames``.

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
    GEOMETRIES,
    PROXIES,
    REAL_GEOMETRY,
    REAL_LOCAL,
    REAL_OPT,
    arm_order,
    control,
    geo_key,
    lambda_star_fit,
    numeric,
    proxy_points,
    regimes_in,
    require,
    run_geometry,
    suites_in,
)
from .frames import cosine as cosine_of
from .outcome import BASELINE_ARMS, BESIDE, LAMBDA_LOSSES, lambda_points, primary_metric, run_accuracy
from .stats import loglog_slope, spearman, spread
from .style import (
    PROXY_COLORS,
    PROXY_MARKERS,
    figure,
    new_figure,
    regime_color,
    save,
    symlog_decades,
    symlog_if_mixed,
)

__all__ = ["f1_reward", "f2_decomposition", "f3_curves", "f4_proxies", "f5_eval", "f6_module_cosine", "f7_taylor",
           "f8_geometries", "f9_accuracy_vs_lambda", "f10_rules_lambda", "held_out_accuracy", "require"]

BAND = "band: min–max over runs"


DASHES = ((), (6, 2), (2, 2), (6, 2, 2, 2), (10, 3), (1, 1))
"""Line dashes cycled over regimes where curves may coincide (off and detach train the policy alike)."""


def _band(ax, sp: pd.DataFrame, x: str, color: str, label: str, marker: str | None = None,
          dashes: tuple = ()) -> None:
    ax.plot(sp[x], sp["mean"], color=color, label=label, marker=marker, ms=3, lw=1.4, dashes=dashes)
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



def _mean_series(ax, frame: pd.DataFrame, lines: list[tuple[str, str, str, str]]) -> bool:
    """Each ``(label, column, colour, linestyle)`` as its mean over runs against the step (linestyle ``"ring"``: open
    rings drawn on top, for the ground truth); a symlog axis when the values span signs and decades (returns whether
    it was used)."""
    values: list[float] = []
    for name, col, c, ls in lines:
        sp = spread(frame.assign(_v=numeric(frame, col)), "step", "_v")
        if sp.empty:
            continue
        if ls == "ring":  # the ground truth: open rings on top, so a model's line that lands on it stays visible
            ax.plot(sp["step"], sp["mean"], color=c, ls="none", marker="o", ms=8, mfc="none", mew=1.4, zorder=5,
                    label=name)
        else:
            ax.plot(sp["step"], sp["mean"], color=c, ls=ls, marker="o", ms=3, lw=1.2, label=name)
        values += list(sp["mean"])
    return symlog_if_mixed(ax, values)

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
    for i, regime in enumerate(regimes_in(d)):  # each regime its own dash: identical curves stay visible
        r = d[d["regime"] == regime]
        _band(axes[0], spread(r, "step", "_rs"), "step", regime_color(regime), f"{regime} ({_runs(r)})",
              dashes=DASHES[i % len(DASHES)])
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
    """C, Q and cos(g, u) per regime over training, in the runs' geometry (``run_geometry``; probes without
    it, e.g. step 1 without Adam state, are left out rather than drawn in another geometry)."""
    probes = probes[control(probes) != "first_step"]  # the first step (a sign step) is a control, as in claim 3
    geom = run_geometry(probes, "corr")
    cos, cos_geom = cosine_of(probes, geom)
    panels = [(geo_key(geom, "corr"), f"C ({geom} geometry)"), (geo_key(geom, "curv"), f"Q ({geom} geometry)"),
              ("_cos", f"cos(g, u) ({cos_geom} geometry)")]
    d = probes.assign(_cos=cos.where(np.isfinite(numeric(probes, panels[0][0]))))
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
    fig.suptitle(f"Decomposition over training in the {geom} geometry, as claim 3 reads it: does C decay while Q "
                 f"persists? ({BAND})", fontsize=10)
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F3


def _as_array(v) -> np.ndarray | None:
    if v is None or (np.isscalar(v) and not isinstance(v, str) and pd.isna(v)):
        return None
    a = np.asarray(v, dtype=float).ravel()
    return a if a.size else None


def _num(row: pd.Series, key: str) -> float:
    v = pd.to_numeric(pd.Series([row.get(key)]), errors="coerce").iloc[0]
    return float(v) if v is not None and np.isfinite(v) else np.nan


CURVES = (  # (label, λ list, Δ list, fit prefix or None, clip-marks list, marker): real step where logged, else model
    ("real step, fine grid", "curve/real_fine_lams", "curve/real_fine_deltas", None, "curve/real_fine_clipped", "s"),
    ("real step, local grid", "curve/real_local_lams", "curve/real_local_deltas", REAL_LOCAL, "curve/real_local_clipped",
     "o"),
    ("model step", "curve/lams", "curve/deltas", "diag/curve/", None, "o"),
)


def _curves_of(row: pd.Series) -> list[tuple[str, np.ndarray, np.ndarray, str | None, np.ndarray, str]]:
    """The curves a probe row holds, each with its clip-active marks: the real-step grids when logged, else the
    model-step curve."""
    out = []
    for label, lc, dc, prefix, cc, m in CURVES:
        lams, deltas = _as_array(row.get(lc)), _as_array(row.get(dc))
        if lams is None or deltas is None or lams.size != deltas.size:
            continue
        clip = _as_array(row.get(cc)) if cc else None
        out.append((label, lams, deltas, prefix, clip.astype(bool) if clip is not None and clip.size == lams.size
                    else np.zeros(lams.size, bool), m))
    real = [c for c in out if c[0].startswith("real")]
    return real or out


def _markers(row: pd.Series, real: bool, color: str) -> list[tuple[str, float, str, str]]:
    """The λ values marked on a panel, each with its own source: on the real-step curves the real optimum,
    adam_real's clamped λ* and adam_step's λ*_m; on the model-step curve its own geometry's λ*_m and the vertex of
    its fit; the λ used and each proxy on both."""
    marks = [("λ used", _num(row, "lambda/used"), "0.5", ":")]
    if real:
        marks += [("λ_opt (real optimum)", _num(row, REAL_OPT + "lambda"), color, "-"),
                  ("λ*_real (adam_real, clamped)", _num(row, "diag/adam_real/lambda_star_clamped"), "black", "--"),
                  ("λ*_m (adam_step)", _num(row, "diag/adam_step/lambda_star"), GEOMETRY_COLORS["adam_step"], "--")]
    else:
        geom = row.get("diag/curve/geometry") if isinstance(row.get("diag/curve/geometry"), str) else "sgd"
        marks += [(f"λ*_m ({geom}, this curve's model)", _num(row, geo_key(geom, "lambda_star")), "black", "--"),
                  ("vertex of the fit", _num(row, "diag/curve/lambda_star"), color, "-")]
    marks += [(f"proxy {p}", _num(row, f"lambda/{p}"), PROXY_COLORS[p], "-.") for p in PROXIES]
    return [(n, v, c, ls) for n, v, c, ls in marks if np.isfinite(v)]


@figure("F3 measured curves", "run", "regime", "step", "curve/*lams", "curve/*deltas")
def f3_curves(probes: pd.DataFrame, out: Path, pdf: bool = False, regimes: tuple[str, ...] = ("policy", "occ")
              ) -> Path:
    """Measured Δ(λ) at an early, a middle and a late probe of one run per regime: the real optimizer step on the
    fine grid (symlog λ axis) and on the local grid with the parabola fitted there, drawn over that grid only,
    where logged; else the model step and its fit. Points where the clip acts are hollow. Each curve is marked
    with its own model's λ*: on the real step the real optimum, adam_real's clamped λ* and adam_step's λ*_m; on
    the model step its own geometry's λ*_m and the vertex of its fit; the λ used and each proxy on both."""
    has = probes.apply(lambda r: bool(_curves_of(r)), axis=1) if len(probes) else pd.Series(dtype=bool)
    has &= probes["regime"].isin(regimes)
    if "diag/curve/flat" in probes:
        has &= ~probes["diag/curve/flat"].eq(True)
    d = probes[has]
    shown = regimes_in(d)
    if not shown:
        raise ValueError(f"F3 measured curves: no probe with a measured, non-flat curve in regimes {list(regimes)}")
    evidence = control(d) == ""
    d = d[evidence] if evidence.any() else d  # the first step (a sign step) only when nothing else was probed
    picks = {}
    for regime in shown:
        r = d[d["regime"] == regime].sort_values(["seed", "run", "step"])
        run = r[r["run"] == r["run"].iloc[0]]
        picks[regime] = (run, sorted({0, len(run) // 2, len(run) - 1}))
    ncol = max(len(p) for _, p in picks.values())
    fig = new_figure(4.8 * ncol, 5.6 * len(shown))
    axes = fig.subplots(len(shown), ncol, squeeze=False)
    for row_axes, regime in zip(axes, shown):
        run, idx = picks[regime]
        names = {3: ["early", "middle", "late"], 2: ["early", "late"], 1: ["only"]}[len(idx)]
        for ax in row_axes[len(idx):]:
            ax.set_axis_off()
        for ax, i, when in zip(row_axes, idx, names):
            _curve_panel(ax, run.iloc[i], regime, when)
    fig.suptitle("Measured Δ(λ): the real step's curve and its optimum, and the local parabolas", fontsize=10)
    return save(fig, out, pdf)


def _curve_panel(ax, row: pd.Series, regime: str, when: str) -> None:
    color = regime_color(regime)
    curves = _curves_of(row)
    lo = min(float(lams.min()) for _, lams, *_ in curves)
    hi = max(float(lams.max()) for _, lams, *_ in curves)
    pad = 0.05 * (hi - lo or 1.0)
    real = curves[0][0].startswith("real")
    for n, (label, lams, deltas, prefix, clipped, marker) in enumerate(curves):
        shade = color if n == len(curves) - 1 else "0.45"
        order = np.argsort(lams)
        ax.plot(lams[order], deltas[order], color=shade, lw=0.6, alpha=0.6)
        ax.scatter(lams[~clipped], deltas[~clipped], color=shade, marker=marker, zorder=3, s=16, label=label)
        if clipped.any():
            ax.scatter(lams[clipped], deltas[clipped], facecolors="none", edgecolors=shade, marker=marker, zorder=3,
                       s=16, label=f"{label}, clip active")
        a, b = (_num(row, prefix + "alpha"), _num(row, prefix + "beta")) if prefix else (np.nan, np.nan)
        if np.isfinite(a) and np.isfinite(b):  # the parabola over the grid it was fitted on, nowhere else
            grid = np.linspace(float(lams.min()), float(lams.max()), 100)
            ax.plot(grid, a * grid + 0.5 * b * grid**2, color=shade, lw=1.4, label=f"fit there: α={a:.3g}, β={b:.3g}")
    for v in (_num(row, "diag/lambda_clip_lo"), _num(row, "diag/lambda_clip_hi")):  # the clip interval's ends
        if lo - pad <= v <= hi + pad:
            ax.axvline(v, color="0.3", ls=(0, (1, 3)), lw=0.8)
    handles = []
    for name, v, c, ls in _markers(row, real, color):
        inside = lo - pad <= v <= hi + pad
        if inside:
            ax.axvline(v, color=c, ls=ls, lw=1)
        handles.append(Line2D([], [], color=c, ls=ls, label=f"{name} = {v:.3g}" + ("" if inside else " (off axis)")))
    ax.set_xlim(lo - pad, hi + pad)
    if real and curves[0][0] == "real step, fine grid":  # log-spaced |λ| over decades: a symlog axis
        local = [c for c in curves if c[3] == REAL_LOCAL]
        width = float(np.max(np.abs(local[0][1]))) if local else (hi - lo) / 100
        symlog_decades(ax, max(width / 10, 1e-12), max(abs(lo), abs(hi)), "x")
    ax.axhline(0, color="0.7", lw=0.5)
    ax.set(xlabel="λ" + (" (symlog)" if ax.get_xscale() == "symlog" else ""), ylabel="Δ(λ) = J(θ⁺(λ)) − J(θ⁺(0))",
           title=f"{regime} (seed {row['seed']}), step {int(row['step'])}, {when}")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=6, ncol=2, loc="upper center",
              bbox_to_anchor=(0.5, -0.16))


# ------------------------------------------------------------------ F4

NO_PROXY_REGIMES = ("off", "detach")


@figure("F4 proxies vs λ*", "run", "regime", "step", "lambda/reference")
def f4_proxies(probes: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Each proxy, the ground truth (the real optimum where logged, else the model curve's fit vertex) and λ*_m
    of the run's geometry over training per regime with MTP, and a scatter of each proxy against the ground truth
    (policy and occ probes when present) with Spearman ρ in the legend; controls (the first step) left out."""
    d = probes[~probes["regime"].isin(NO_PROXY_REGIMES) & (control(probes) == "")]
    geom = run_geometry(d)
    truth, source = lambda_star_fit(d)
    label = "λ_opt (real optimum)" if source.startswith(REAL_OPT) else "λ*_fit (model curve)"
    d = d.assign(_exact=numeric(d, geo_key(geom, "lambda_star")), _fit=truth)
    series = [(label, "_fit", "black", "-"), (f"λ*_m ({geom})", "_exact", "black", "--")]
    series += [(p, f"lambda/{p}", PROXY_COLORS[p], "-") for p in PROXIES]
    shown = [r for r in regimes_in(d) if any(np.isfinite(numeric(d[d["regime"] == r], c)).any()
                                             for _, c, _, _ in series)]
    if not shown:
        raise ValueError("F4 proxies vs λ*: no finite λ* or proxy value in any regime with an MTP loss")
    fig = new_figure(13, 3.2 * len(shown) + 0.6)
    axes = fig.subplot_mosaic([[f"ts{i}", "scatter"] for i in range(len(shown))], width_ratios=[1.6, 1])
    for i, regime in enumerate(shown):
        ax, r = axes[f"ts{i}"], d[d["regime"] == regime]
        scale = " (symlog)" if _mean_series(ax, r, series) else ""
        ax.set(xlabel="optimizer step", ylabel="coefficient" + scale, title=f"{regime}: proxies and λ* over training")
        ax.title.set_color(regime_color(regime))
        ax.legend(fontsize=7, ncol=2)
    _proxy_scatter(axes["scatter"], d, shown, label)
    return save(fig, out, pdf)


def _proxy_scatter(ax, d: pd.DataFrame, shown: list[str], truth: str) -> None:
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
    ax.set(xlabel=truth, ylabel="proxy coefficient", title=f"proxy vs {truth.split(' ')[0]} ({' + '.join(regimes)})")
    ax.legend(handles=handles, fontsize=7)


# ------------------------------------------------------------------ F5


def _arm_colors(arms: list[str]) -> dict[str, tuple]:
    """Each arm in its regime's colour, arms of one regime from dark to light."""
    from matplotlib.colors import to_rgb

    out, by_regime = {}, {}
    for arm in arms:
        by_regime.setdefault(arm.split("@")[0].split("/")[0].split("+")[0], []).append(arm)
    for regime, group in by_regime.items():
        base = np.array(to_rgb(regime_color(regime)))
        for i, arm in enumerate(group):
            out[arm] = tuple(base + (1 - base) * 0.55 * i / max(len(group) - 1, 1))
    return out


@figure("F5 evaluation suites", "run", "arm", "suite", "greedy_acc")
def f5_eval(evals: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Held-out sampled accuracy (mean@k; greedy where no sampled value) per suite and for the mean over
    suites, per arm: bars at the mean over runs, whiskers min–max; greedy pass@1 as a black tick beside."""
    metric = primary_metric(evals)
    d = evals[np.isfinite(numeric(evals, metric))]
    if d.empty:
        raise ValueError("F5 evaluation suites: no eval.json results")
    mean = d.groupby(["run", "arm"], as_index=False)[[metric, BESIDE]].mean().assign(suite="mean")
    d = pd.concat([d[["run", "arm", "suite", metric, BESIDE]], mean], ignore_index=True)
    suites = [*suites_in(set(d["suite"]) - {"mean"}), "mean"]
    arms = arm_order(d["arm"])
    colors = _arm_colors(arms)
    width = 0.8 / len(arms)
    fig = new_figure(max(6, 0.25 * len(arms) * len(suites) + 3), 4)
    ax = fig.subplots()
    for k, arm in enumerate(arms):
        g = d[d["arm"] == arm].groupby("suite")[[metric, BESIDE]]
        m, lo, hi = (getattr(g, f)().reindex(suites) for f in ("mean", "min", "max"))
        x = np.arange(len(suites)) + (k - (len(arms) - 1) / 2) * width
        ax.bar(x, m[metric], width, color=colors[arm], label=f"{arm} ({_runs(d[d['arm'] == arm])})")
        ax.errorbar(x, m[metric], yerr=[m[metric] - lo[metric], hi[metric] - m[metric]], fmt="none", ecolor="0.2",
                    capsize=2, lw=0.8)
        if metric != BESIDE:
            ax.scatter(x, m[BESIDE], marker="_", color="black", s=40, zorder=3, label="greedy" if k == 0 else None)
    ax.set_xticks(np.arange(len(suites)), suites, rotation=20)
    label = "sampled accuracy (mean@k)" if metric != BESIDE else "greedy accuracy (pass@1)"
    ax.set(ylabel=label, ylim=(0, 1.05), title="Held-out suites (bars: mean; whiskers: min–max over runs)")
    ax.legend(fontsize=7, ncol=2)
    return save(fig, out, pdf)


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
        handles.append(Line2D([], [], color=color, marker="o", label=f"{regime}: slope {slope:.2f} ({len(pairs)} probe{'s' if len(pairs) != 1 else ''})"))
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


# ------------------------------------------------------------------ F8

GEOMETRY_COLORS = {"sgd": "#7f7f7f", "adam": "#1f77b4", "adam_step": "#d62728", "adam_stationary": "#2ca02c",
                   "adam_real": "#000000"}


def _model_key(geometry: str, what: str) -> str:
    """The column of a geometry's α, β or λ*: ``alpha_model``/``beta_model``/``lambda_star`` of the affine ones,
    ``alpha``/``beta``/``lambda_star_clamped`` of adam_real."""
    if geometry == REAL_GEOMETRY:
        return geo_key(geometry, {"alpha": "alpha", "beta": "beta", "lambda": "lambda_star_clamped"}[what])
    return geo_key(geometry, {"alpha": "alpha_model", "beta": "beta_model", "lambda": "lambda_star"}[what])


@figure("F8 model vs real step", "run", "regime", "step", REAL_LOCAL + "alpha", REAL_LOCAL + "beta")
def f8_geometries(probes: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Per regime, over training (mean over runs; the first step, a sign step, left out): each geometry's α and β
    (adam_real's exact Taylor coefficients of the real step among them) against the real step's α and β fitted on
    the local grid, and each geometry's λ* against the real optimum (symlog). detach is the clip-coupling control:
    its real curve moves only through the clip factor."""
    d = probes[np.isfinite(numeric(probes, REAL_LOCAL + "beta")) & (control(probes) != "first_step")
               & ~((numeric(probes, REAL_LOCAL + "alpha") == 0) & (numeric(probes, REAL_LOCAL + "beta") == 0))]
    shown = regimes_in(d)
    if not shown:
        raise ValueError("F8 model vs real step: no probe with a non-flat real-step local curve")
    geometries = (*GEOMETRIES, REAL_GEOMETRY)
    has_opt = np.isfinite(numeric(d, REAL_OPT + "lambda")).any()
    fig = new_figure(18 if has_opt else 12, 3.2 * len(shown) + 0.4)
    axes = fig.subplots(len(shown), 3 if has_opt else 2, squeeze=False)
    for row_axes, regime in zip(axes, shown):
        r = d[d["regime"] == regime]
        name = f"{regime} (control)" if regime == "detach" else regime
        for ax, coef in zip(row_axes, ("alpha", "beta")):
            lines = [("real step (local fit)", REAL_LOCAL + coef, "0.5", "-")]
            lines += [(g, _model_key(g, coef), GEOMETRY_COLORS[g], "-" if g == REAL_GEOMETRY else "--")
                      for g in geometries]
            scale = " (symlog)" if _mean_series(ax, r, lines) else ""
            ax.axhline(0, color="0.7", lw=0.5)
            sym = "α" if coef == "alpha" else "β"
            ax.set(xlabel="optimizer step", ylabel=sym + scale, title=f"{name}: {sym} of each model vs the real step")
            ax.title.set_color(regime_color(regime))
            ax.legend(fontsize=7)
        if has_opt:
            ax = row_axes[2]
            lines = [(g, _model_key(g, "lambda"), GEOMETRY_COLORS[g], "-" if g == REAL_GEOMETRY else "--")
                     for g in geometries]
            lines.append(("real optimum", REAL_OPT + "lambda", "0.3", "ring"))
            scale = " (symlog)" if _mean_series(ax, r, lines) else ""
            ax.axhline(0, color="0.7", lw=0.5)
            ax.set(xlabel="optimizer step", ylabel="λ" + scale, title=f"{name}: λ* vs the real optimum")
            ax.title.set_color(regime_color(regime))
            ax.legend(fontsize=7)
    fig.suptitle(f"Each geometry's second-order model against the real AdamW step ({_runs(d)})", fontsize=10)
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F9


@figure("F9 accuracy vs λ", "run", "arm", "regime", "mtp_coef", "suite", "greedy_acc")
def f9_accuracy_vs_lambda(evals: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Final held-out accuracy (primary metric, mean over suites) against the fixed λ of each MTP loss (ce,
    policy), the baseline (off or detach) at λ = 0: per-seed points, the mean per λ and a quadratic fit; beside them
    the coefficient rules (occ, real, cosine, …), each arm's seeds and mean, with the baseline's mean as a line."""
    base = next((a for a in BASELINE_ARMS if (evals["arm"] == a).any()), None)
    losses = [(loss, lambda_points(evals, loss, base)) for loss in LAMBDA_LOSSES]
    losses = [(loss, pts) for loss, pts in losses if (pts["lam"] > 0).any()]
    acc = run_accuracy(evals, primary_metric(evals))
    rules = [a for a in arm_order(acc["arm"].dropna()) if a != base and a.split("@")[0] not in LAMBDA_LOSSES
             and a != "sft"]
    if not losses and not rules:
        raise ValueError("F9 accuracy vs λ: no fixed-λ ce or policy run, nor a coefficient rule, with an eval.json")
    panels = len(losses) + bool(rules)
    fig = new_figure(5.5 * panels, 4)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (loss, pts) in zip(axes, losses):
        color = regime_color(loss)
        ax.scatter(pts["lam"], pts["acc"], color=color, alpha=0.5, s=16, label="one seed")
        m = pts.groupby("lam")["acc"].mean()
        ax.plot(m.index, m.to_numpy(), color=color, marker="o", lw=1.2, label="mean over seeds")
        if m.size >= 3 and np.isfinite(pts["acc"]).all():
            c2, c1, c0 = np.polyfit(pts["lam"], pts["acc"], 2)
            grid = np.linspace(0, float(m.index.max()), 100)
            ax.plot(grid, c0 + c1 * grid + c2 * grid**2, color="0.3", ls="--", lw=1, label="quadratic fit")
        ax.set(xlabel="fixed λ (mtp_coef)" + (f"; λ = 0: {base}" if base else ""),
               ylabel=f"final held-out {primary_metric(evals)} (mean over suites)", title=f"{loss}: accuracy vs λ")
        ax.legend(fontsize=7)
    if rules:
        ax = axes[-1]
        colors = _arm_colors(rules)
        for i, arm in enumerate(rules):
            v = acc.loc[acc["arm"] == arm, "acc"].to_numpy(float)
            ax.scatter(np.full(v.size, i), v, color=colors[arm], alpha=0.5, s=16)
            ax.scatter([i], [np.nanmean(v)], color=colors[arm], marker="D", s=36, zorder=3)
        if base is not None:
            ax.axhline(float(acc.loc[acc["arm"] == base, "acc"].mean()), color=regime_color(base), ls="--", lw=1,
                       label=f"{base} (mean)")
            ax.legend(fontsize=7)
        ax.set_xticks(np.arange(len(rules)), rules, rotation=25, fontsize=7)
        ax.set(ylabel=f"final held-out {primary_metric(evals)} (mean over suites)",
               title="coefficient rules (seeds, mean ◆)")
    return save(fig, out, pdf)


# ------------------------------------------------------------------ F10


@figure("F10 rules' λ vs the real optimum", "run", "arm", "step", "lambda/used")
def f10_rules_lambda(metrics: pd.DataFrame, out: Path, pdf: bool = False) -> Path:
    """Per coefficient rule's arm (``lambda/rule`` neither off nor fixed): the λ it applied over training (its
    effective λ = b/a for the rules that edit θ_S's update; mean over runs, band min–max) against the real optimum
    at the probes (one point per run and probe), on a symlog axis."""
    rule = metrics["lambda/rule"] if "lambda/rule" in metrics else pd.Series("fixed", index=metrics.index)
    d = metrics[~rule.isin(["off", "fixed"]) & rule.notna()]
    arms = arm_order(d["arm"].dropna())
    if not arms:
        raise ValueError("F10 rules' λ vs the real optimum: no run of a coefficient rule (occ, real, cosine, …)")
    fig = new_figure(12, 2.8 * ((len(arms) + 1) // 2) + 0.4)
    axes = fig.subplots((len(arms) + 1) // 2, 2, squeeze=False).ravel()
    for ax in axes[len(arms):]:
        ax.set_axis_off()
    for ax, arm in zip(axes, arms):
        r = d[d["arm"] == arm]
        col = "lambda/effective" if np.isfinite(numeric(r, "lambda/effective")).any() else "lambda/used"
        color = regime_color(arm.split("/")[0].split("@")[0])
        values = []
        sp = spread(r.assign(_v=numeric(r, col)), "step", "_v")
        if not sp.empty:
            _band(ax, sp, "step", color, f"λ applied ({col.split('/')[1]})")
            values += [*sp["min"], *sp["max"]]
        opt = r.assign(_o=numeric(r, REAL_OPT + "lambda"))
        opt = opt[np.isfinite(opt["_o"])]
        if len(opt):
            ax.scatter(opt["step"], opt["_o"], color="black", marker="x", s=22, zorder=3, label="real optimum (probes)")
            values += list(opt["_o"])
        scale = " (symlog)" if symlog_if_mixed(ax, values) else ""
        ax.axhline(0, color="0.7", lw=0.5)
        ax.set(xlabel="optimizer step", ylabel="λ" + scale, title=f"{arm} ({_runs(r)})")
        ax.title.set_color(color)
        ax.legend(fontsize=7)
    fig.suptitle("Each rule's λ over training against the real optimum at the probes", fontsize=10)
    return save(fig, out, pdf)
