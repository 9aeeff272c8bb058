"""``occ figures``: every figure that has data, ``summary.md`` and ``summary.json``.

``write_report(run_dirs, out_dir)`` loads the runs (SFT run directories among them are listed and
ignored), builds the tidy frames, draws F1–F9 (a figure without data is listed as skipped with its
reason), evaluates the claims and writes ``summary.md`` (verdicts with the numbers behind them, the
thresholds, the held-out table, the runs, the figures with captions) and ``summary.json`` (the same,
machine-readable: ``claims``, ``held_out``, ``arms``, ``learning``; NaN as null). Every number in
them is computed from the run files.

Where it writes, and what it never overwrites:

* the default output is ``report/`` in the common parent folder of the run directories (beside the
  runs, never the repository's ``figures/``, which only the reference-experiment script writes);
* everything is checked before anything is created: no runs, or a ``probes_file`` that no run has,
  raise with the output untouched;
* an existing non-empty output folder is written into only when it is the report of the same run
  directories (its ``.occ_report.json`` says so) or with ``force=True``; then the report files it
  held that this report does not rewrite (stale figures) are removed, and nothing else is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from occ_theory.atomic import atomic_write_text

from . import figures as F
from .claims import THRESHOLDS, evaluate_claims
from .frames import (
    REGIME_ORDER,
    arm_order,
    eval_frame,
    held_out_frame,
    metrics_frame,
    probes_frame,
    regimes_in,
    run_geometry,
    sft_eval_frame,
)
from .load import (
    PROBES_FILE,
    Run,
    check_step_cost,
    common_parent,
    distinct_runs,
    load_runs_checked,
    read_step_cost,
    step_cost_path,
)
from .outcome import held_out_table
from .readme_table import held_out_markdown, learning_line
from .verdict import Verdict

SUMMARY_FILE, SUMMARY_JSON = "summary.md", "summary.json"
MARKER_FILE = ".occ_report.json"
"""Written into every report folder: the run directories it reports on and the files it wrote."""
DEFAULT_OUT_NAME = "report"


def _regimes(df: pd.DataFrame) -> str:
    return ", ".join(regimes_in(df)) or "none"


# (file stem, figure function, frame it reads, caption from that frame)
FIGURES: list[tuple[str, Callable, str, Callable[[pd.DataFrame], str]]] = [
    ("f1_reward", F.f1_reward, "metrics", lambda d: (
        f"Training reward per regime ({_regimes(d)}), rolling mean; line: mean over runs, band: min–max"
        + (", with held-out greedy accuracy" if np.isfinite(F.held_out_accuracy(d)).any() else "") + ".")),
    ("f2_decomposition", F.f2_decomposition, "probes", lambda d: (
        f"C, Q ({run_geometry(d, 'corr')} geometry) and cos(g, u) at each probe per regime ({_regimes(d)}); "
        "under policy, C should decay while Q persists.")),
    ("f3_curves", F.f3_curves, "probes", lambda d: (
        "Measured Δ(λ) at an early, a middle and a late probe (policy, occ): the real optimizer step on a fine grid "
        "(symlog λ) and on the local grid with the parabola fitted there (drawn over that grid only), where logged, "
        "else the model step; each curve marked with its own model's λ* (on the real step: the real optimum, "
        "adam_real's clamped λ*, adam_step's λ*_m), the λ used and each proxy; hollow points: the clip acts.")),
    ("f4_proxies", F.f4_proxies, "probes", lambda d: (
        "Each proxy beside the ground truth (the real optimum where logged) and λ*_m over training, and each proxy "
        "against the ground truth with its Spearman ρ (first-minibatch zeros of the reference proxy dropped).")),
    ("f5_eval", F.f5_eval, "held_out", lambda d: (
        "Held-out sampled accuracy (mean@k) per arm and the SFT checkpoint RL started from (`sft`): mean over runs, "
        "whiskers min–max; greedy pass@1 as ticks." if (d["arm"] == "sft").any() else
        "Held-out sampled accuracy (mean@k) per arm: mean over runs, whiskers min–max; greedy pass@1 as ticks "
        "(the SFT checkpoint has no eval.json: `occ eval CHECKPOINT`).")),
    ("f6_module_cosine", F.f6_module_cosine, "metrics", lambda d: (
        "cos(g, u) per module group (rows) at each diagnosed step (columns), per regime with an MTP gradient.")),
    ("f7_taylor", F.f7_taylor, "probes", lambda d: (
        "Taylor residual of the quadratic model against the step size on log-log axes, with the fitted slope "
        "per regime (expected 3).")),
    ("f8_geometries", F.f8_geometries, "probes", lambda d: (
        "Each geometry's α and β (adam_real: the real step's exact Taylor coefficients) against the real AdamW "
        "step's local fit, and each geometry's λ* against the real optimum, over training; detach is the "
        "clip-coupling control.")),
    ("f9_accuracy_vs_lambda", F.f9_accuracy_vs_lambda, "evals", lambda d: (
        "Final held-out accuracy against the fixed λ of each MTP loss, the baseline at λ = 0, with a quadratic fit; "
        "the coefficient rules beside them.")),
    ("f10_rules_lambda", F.f10_rules_lambda, "metrics", lambda d: (
        "The λ each coefficient rule applied over training (its effective λ for the rules that edit θ_S's update) "
        "against the real optimum at the probes (symlog).")),
]
REPORT_FILES = {SUMMARY_FILE, SUMMARY_JSON} | {f"{stem}{ext}" for stem, *_ in FIGURES for ext in (".png", ".pdf")}
"""Every file name a report writes: the only files a forced or repeated report removes."""


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
    lines = ["| run | arm | seed | steps | probes | eval |", "|---|---|---|---|---|---|"]
    order = {g: i for i, g in enumerate(REGIME_ORDER)}
    for r in sorted(runs, key=lambda r: (order.get(r.regime, len(order)), r.arm, r.seed, r.name)):
        probes = "–" if r.probes is None else f"{len(r.probes)} rows"
        ev = "–" if r.eval is None else f"{len(r.eval['suites'])} suites"
        lines.append(f"| {_cell(r.name)} | {r.arm} | {r.seed} | {r.steps} | {probes} | {ev} |")
    return "\n".join(lines)


def default_out_dir(runs: list[Run]) -> Path:
    """``report/`` in the common parent folder of the run directories."""
    return common_parent(r.path for r in runs) / DEFAULT_OUT_NAME


def _check_out_dir(out_dir: Path, sources: list[str], force: bool) -> set[str]:
    """Refuse an output we may not write into (see the module docstring); return the report files it holds."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return set()
    marker = out_dir / MARKER_FILE
    try:
        previous = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    except (OSError, json.JSONDecodeError):
        previous = {}
    if previous.get("runs") != sources and not force:
        raise ValueError(f"--out {out_dir}: not empty and not a report of these runs; pass --force to write into it "
                         "(report files there that this report does not rewrite are removed) or choose another --out")
    return {n for n in [*previous.get("files", []), *REPORT_FILES] if (out_dir / n).is_file()}


def write_report(run_dirs: Iterable[Path] | Path, out_dir: Path | None = None, pdf: bool = False,
                 probes_file: str = PROBES_FILE, force: bool = False, step_cost: Path | None = None,
                 skip_bad: bool = False) -> Path:
    """Load the runs, draw every figure that has data, write ``summary.md`` and ``summary.json``; return the
    path of ``summary.md``. ``out_dir`` None: ``default_out_dir``. ``probes_file``: the ``occ probe --out`` file
    to read in each run (default ``probes.parquet``; another name must exist in at least one run).
    ``force``: write into a non-empty folder that is not this report's (see the module docstring).
    ``step_cost``: ``occ cost``'s file, claim 6's design (default: ``load.step_cost_path`` of the runs, when
    there); it must time arms of these runs, from these runs. ``skip_bad``: a run that cannot be read is left out
    and named in the report instead of stopping it. Copies of a run (the same arm and seed, or the same training
    log) are counted once (``load.distinct_runs``) and named."""
    cost = read_step_cost(step_cost) if step_cost is not None else None
    loaded, dropped = load_runs_checked(run_dirs, probes_file, skip_bad)
    runs, repeats = distinct_runs([r for r in loaded if r.is_rl])
    if not runs:
        raise ValueError(f"no RL run among {[str(r.path) for r in loaded]} (only SFT runs)")
    if probes_file != PROBES_FILE and all(r.probes is None for r in runs):
        raise ValueError(f"--probes {probes_file}: no run has this file (looked in {len(runs)} run directories, "
                         f"e.g. {runs[0].path})")
    if step_cost is None and (found := step_cost_path(r.path for r in runs)).is_file():
        # recorded as the script passes it, relative to the working directory: the same summary.json
        step_cost = found.relative_to(Path.cwd()) if found.is_relative_to(Path.cwd()) else found
        cost = read_step_cost(step_cost)
    if cost is not None:
        check_step_cost(cost, runs, step_cost)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(runs)
    sources = sorted(str(r.path.resolve()) for r in loaded)
    stale = _check_out_dir(out_dir, sources, force)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {"metrics": metrics_frame(runs), "probes": probes_frame(runs), "evals": eval_frame(runs)}
    frames["held_out"] = held_out_frame(frames["evals"], sft_eval_frame(runs))
    drawn, skipped, written = [], [], set()
    for stem, fn, frame, caption in FIGURES:
        try:
            path = fn(frames[frame], out_dir / f"{stem}.png", pdf=pdf)
        except ValueError as e:
            skipped.append((fn.TITLE, str(e)))
            continue
        drawn.append((fn.TITLE, path.name, caption(frames[frame])))
        written |= {path.name} | ({path.with_suffix(".pdf").name} if pdf else set())
    summary = build_summary(runs, frames, sft_eval_frame(runs), probes_file, cost)
    summary["step_cost"] = None if step_cost is None else str(step_cost)
    summary["dropped"] = [{"run": p, "why": why} for p, why in dropped]
    summary["repeats"] = [{"run": n, "why": why} for n, why in repeats]
    summary["partial"] = [{"run": r.name, "why": note} for r in runs for note in r.notes]
    text = render_summary(runs, [r for r in loaded if not r.is_rl], summary, drawn, skipped, probes_file)
    atomic_write_text(out_dir / SUMMARY_JSON, json.dumps(json_safe(summary), indent=1, allow_nan=False))
    atomic_write_text(out_dir / SUMMARY_FILE, text)
    written |= {SUMMARY_FILE, SUMMARY_JSON}
    for name in stale - written:
        (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / MARKER_FILE, json.dumps({"runs": sources, "files": sorted(written)}, indent=1))
    return out_dir / SUMMARY_FILE


def build_summary(runs: list[Run], frames: dict[str, pd.DataFrame], sft_evals: pd.DataFrame,
                  probes_file: str = PROBES_FILE, step_cost: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``summary.json`` holds: ``claims`` (id, claim, verdict, numbers, thresholds, detail), ``thresholds``
    (the rules shared by every claim), ``held_out`` (``outcome.held_out_table``), ``arms`` (arm → seeds),
    ``learning`` (``outcome.learning``), ``runs`` and ``probes_file``; ``write_report`` adds ``step_cost`` (the
    file claim 6 was judged on, or None)."""
    verdicts, learn = evaluate_claims(frames["metrics"], frames["probes"], frames["evals"], sft_evals, step_cost)
    arms = {a: len({r.seed for r in runs if r.arm == a}) for a in arm_order(r.arm for r in runs)}
    if len(sft_evals):  # the checkpoint RL started from, evaluated: the negative-control arm of claim 4
        arms["sft"] = int(sft_evals["init"].nunique())
    return {"claims": [{"id": v.id, "claim": v.claim, "verdict": v.verdict, "numbers": v.numbers,
                        "thresholds": THRESHOLDS.get(v.id, ""), "detail": v.detail} for v in verdicts],
            "thresholds": {"general": THRESHOLDS["general"]},
            "held_out": held_out_table(frames["evals"], sft_evals), "arms": arms, "learning": learn,
            "runs": [{"name": r.name, "arm": r.arm, "regime": r.regime, "seed": r.seed, "steps": r.steps} for r in runs],
            "probes_file": probes_file}


def json_safe(v: Any) -> Any:
    """Plain JSON types; NaN and infinities become null."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    return v if v is None or isinstance(v, str) else str(v)


def render_summary(runs: list[Run], ignored: list[Run], summary: dict[str, Any],
                   drawn: list[tuple[str, str, str]], skipped: list[tuple[str, str]],
                   probes_file: str = PROBES_FILE) -> str:
    source = "" if probes_file == PROBES_FILE else (
        f" Probe values from `{probes_file}` (`occ probe --set ... --out {probes_file}`); runs without it "
        "fall back to the online values in their metrics.")
    verdicts = [Verdict(c["id"], c["claim"], c["verdict"], c["numbers"], c["detail"]) for c in summary["claims"]]
    arms = ", ".join(f"{a} ({n} seed{'s' if n != 1 else ''})" for a, n in summary["arms"].items())
    parts = ["# occ_theory: does the MTP loss help or hurt RL?", "", f"{len(runs)} RL run(s); arms {arms}." + source,
             "", learning_line(json_safe(summary["learning"])), "", "## Claims", "", claims_table(verdicts), ""]
    parts += [f"* **{v.claim}**: {v.verdict}. {v.detail}" for v in verdicts]
    parts += ["", "## Thresholds", ""] + [f"* {'claim ' + k if k != 'general' else k}: {t}" for k, t in THRESHOLDS.items()]
    metric = summary["held_out"]["primary"]
    parts += ["", "## Held-out evaluation (F5)", "",
              f"{'Sampled accuracy (mean@k)' if metric == 'mean_at_k' else 'Greedy accuracy'}, mean ± sd over runs "
              "(number of runs); greedy pass@1's mean beside; `sft`: the checkpoint RL started from.", "",
              held_out_markdown(json_safe(summary["held_out"])), "", "## Runs", "", runs_table(runs), ""]
    if ignored:
        parts += [f"Ignored (SFT run directories): {', '.join(r.name for r in ignored)}.", ""]
    for key, title in (("dropped", "Left out (cannot be read)"), ("repeats", "Counted once (copies of a run)"),
                       ("partial", "Partial")):
        if summary.get(key):
            parts += [f"{title}:", ""] + [f"* {_cell(e['run'])}: {_cell(e['why'])}" for e in summary[key]] + [""]
    parts += ["## Figures", ""]
    for title, name, caption in drawn:
        parts += [f"![{title}]({name})", "", f"*{title}.* {caption}", ""]
    if skipped:
        parts += ["## Skipped figures", ""] + [f"* {title}: {_cell(why)}" for title, why in skipped] + [""]
    return "\n".join(parts)
