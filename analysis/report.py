"""``occ figures``: every figure that has data, and ``summary.md`` with the six claims' verdicts.

``write_report(run_dirs, out_dir)`` loads the runs (SFT run directories among them are listed and
ignored), builds the tidy frames, draws F1–F7 (a figure without data is listed as skipped with
its reason), evaluates the claims and writes ``summary.md``: the verdict table with the numbers
behind each verdict, the thresholds, the F5 table, the runs, and the figures with captions.
Every number in it is computed from the run files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from occ_theory.atomic import atomic_write_text
from occ_theory.names import SUMMARY_FILE

from . import figures as F
from .claims import THRESHOLDS, Verdict, evaluate_claims
from .frames import REGIME_ORDER, eval_frame, metrics_frame, pick_geometry, probes_frame, regimes_in
from .load import PROBES_FILE, Run, load_runs



def _regimes(df: pd.DataFrame) -> str:
    return ", ".join(regimes_in(df)) or "none"


# (file stem, figure function, frame it reads, caption from that frame)
FIGURES: list[tuple[str, Callable, str, Callable[[pd.DataFrame], str]]] = [
    ("f1_reward", F.f1_reward, "metrics", lambda d: (
        f"Training reward per regime ({_regimes(d)}), rolling mean; line: mean over runs, band: min–max"
        + (", with held-out greedy accuracy" if np.isfinite(F.held_out_accuracy(d)).any() else "") + ".")),
    ("f2_decomposition", F.f2_decomposition, "probes", lambda d: (
        f"C, Q ({pick_geometry(d)} geometry) and cos(g, u) at each probe per regime ({_regimes(d)}); "
        "under policy, C should decay while Q persists.")),
    ("f3_curves", F.f3_curves, "probes", lambda d: (
        "Measured Δ(λ) and its fitted parabola at an early, a middle and a late probe (policy, occ), with "
        "λ*_exact, λ*_fit, the λ used and each proxy marked.")),
    ("f4_proxies", F.f4_proxies, "probes", lambda d: (
        "Each proxy beside λ*_fit and λ*_exact over training, and each proxy against λ*_fit with its Spearman ρ "
        "(exact zeros of the reference proxy dropped).")),
    ("f5_eval", F.f5_eval, "evals", lambda d: (
        f"Greedy accuracy on the held-out suites per regime ({_regimes(d)}): mean over runs, whiskers min–max.")),
    ("f6_module_cosine", F.f6_module_cosine, "metrics", lambda d: (
        "cos(g, u) per module group (rows) at each diagnosed step (columns), per regime with an MTP gradient.")),
    ("f7_taylor", F.f7_taylor, "probes", lambda d: (
        "Taylor residual of the quadratic model against the step size on log-log axes, with the fitted slope "
        "per regime (expected 3).")),
]


def fmt(v: Any) -> str:
    """A number for the report: 4 significant digits, ``n/a`` for NaN."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def claims_table(verdicts: list[Verdict]) -> str:
    lines = ["| claim | verdict | numbers |", "|---|---|---|"]
    for v in verdicts:
        nums = "; ".join(f"{k} = {fmt(x)}" for k, x in v.numbers.items()) or "–"
        lines.append(f"| {_cell(v.claim)} | **{v.verdict}** | {_cell(nums)} |")
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    lines = ["| run | regime | seed | steps | proxy | mtp_coef | probes | eval |", "|---|---|---|---|---|---|---|---|"]
    order = {g: i for i, g in enumerate(REGIME_ORDER)}
    for r in sorted(runs, key=lambda r: (order.get(r.regime, len(order)), r.regime, r.seed, r.name)):
        rl = r.config.get("rl", {}) if isinstance(r.config.get("rl"), dict) else {}
        probes = "–" if r.probes is None else f"{len(r.probes)} rows"
        ev = "–" if r.eval is None else f"{len(r.eval['suites'])} suites"
        lines.append(f"| {_cell(r.name)} | {r.regime} | {r.seed} | {r.steps} | {rl.get('proxy', '–')} | "
                     f"{fmt(rl.get('mtp_coef'))} | {probes} | {ev} |")
    return "\n".join(lines)


def write_report(run_dirs: Iterable[Path] | Path, out_dir: Path, pdf: bool = False,
                 probes_file: str = PROBES_FILE) -> Path:
    """Load the runs, draw every figure that has data, write ``summary.md``; return its path.
    ``probes_file``: the ``occ probe --out`` file to read in each run (default ``probes.parquet``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(run_dirs, probes_file)
    runs = [r for r in loaded if r.is_rl]
    if not runs:
        raise ValueError(f"no RL run among {[str(r.path) for r in loaded]} (only SFT runs)")
    frames = {"metrics": metrics_frame(runs), "probes": probes_frame(runs), "evals": eval_frame(runs)}
    drawn, skipped = [], []
    for stem, fn, frame, caption in FIGURES:
        try:
            path = fn(frames[frame], out_dir / f"{stem}.png", pdf=pdf)
        except ValueError as e:
            skipped.append((fn.TITLE, str(e)))
            continue
        drawn.append((fn.TITLE, path.name, caption(frames[frame])))
    verdicts = evaluate_claims(frames["metrics"], frames["probes"], frames["evals"])
    text = render_summary(runs, [r for r in loaded if not r.is_rl], verdicts, F.eval_table(frames["evals"]),
                          drawn, skipped, probes_file)
    out = out_dir / SUMMARY_FILE
    atomic_write_text(out, text)
    return out


def render_summary(runs: list[Run], ignored: list[Run], verdicts: list[Verdict], eval_md: str,
                   drawn: list[tuple[str, str, str]], skipped: list[tuple[str, str]],
                   probes_file: str = PROBES_FILE) -> str:
    source = "" if probes_file == PROBES_FILE else (
        f" Probe values from `{probes_file}` (`occ probe --set ... --out {probes_file}`); runs without it "
        "fall back to the online values in their metrics.")
    parts = ["# occ_theory: does the MTP loss help or hurt RL?", "",
             f"{len(runs)} RL run(s), regimes {', '.join(regimes_in(pd.DataFrame({'regime': [r.regime for r in runs]})))}."
             + source, "", "## Claims", "", claims_table(verdicts), ""]
    parts += [f"* **{v.claim}**: {v.verdict}. {v.detail}" for v in verdicts]
    parts += ["", "## Thresholds", ""] + [f"* {'claim ' + k if k.isdigit() else k}: {t}" for k, t in THRESHOLDS.items()]
    parts += ["", "## Held-out evaluation (F5)", "", "Greedy accuracy, mean ± sd over runs (number of runs).", "",
              eval_md, "", "## Runs", "", runs_table(runs), ""]
    if ignored:
        parts += [f"Ignored (SFT run directories): {', '.join(r.name for r in ignored)}.", ""]
    parts += ["## Figures", ""]
    for title, name, caption in drawn:
        parts += [f"![{title}]({name})", "", f"*{title}.* {caption}", ""]
    if skipped:
        parts += ["## Skipped figures", ""] + [f"* {title}: {_cell(why)}" for title, why in skipped] + [""]
    return "\n".join(parts)
