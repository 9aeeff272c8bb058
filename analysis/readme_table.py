"""The reference section's tables, rendered from ``summary.json`` (never typed in).

``render(summary)`` returns markdown: whether the baseline learned, the claim verdicts, and the
held-out table (sampled accuracy mean ± sd (n seeds) per arm and suite, greedy beside the mean).
``report.write_report`` uses the same held-out table in ``summary.md``. From the shell::

    python -m analysis.readme_table figures/summary.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _stat_cell(st: dict[str, Any] | None) -> str:
    if not st or not st.get("n"):
        return "–"
    if st["n"] > 1 and st.get("sd") is not None:
        return f"{_num(st['mean'])} ± {_num(st['sd'])} ({st['n']})"
    return f"{_num(st['mean'])} ({st['n']})"


def held_out_markdown(held_out: dict[str, Any]) -> str:
    """One row per arm (and the SFT checkpoint): primary metric ``mean ± sd (n)`` per suite and for the mean
    over suites, and greedy accuracy's mean beside it."""
    primary, suites = held_out["primary"], held_out["suites"]
    if not held_out["arms"]:
        return "_no eval.json results_"
    lines = [f"| arm | {' | '.join(suites)} | mean | greedy mean |", "|---" * (len(suites) + 3) + "|"]
    for arm, entry in held_out["arms"].items():
        cells = [_stat_cell(entry.get(s, {}).get(primary)) for s in [*suites, "mean"]]
        greedy = entry["mean"].get("greedy_acc", {})
        lines.append(f"| {_cell(arm)} | " + " | ".join(cells) + f" | {_num(greedy.get('mean'))} |")
    return "\n".join(lines)


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    lines = ["| claim | verdict | what the data say |", "|---|---|---|"]
    lines += [f"| {_cell(c['claim'])} | **{c['verdict']}** | {_cell(c['detail'])} |" for c in claims]
    return "\n".join(lines)


def learning_line(learning: dict[str, Any]) -> str:
    arm, gain, spread = learning.get("baseline_arm"), learning.get("baseline_gain"), learning.get("baseline_spread")
    if arm is None or gain is None:
        return f"Learning: not measured ({learning.get('reason', 'no baseline')})."
    verdict = {True: "learned", False: "did not learn (gain within its seed-to-seed spread)", None: "unknown"}[
        learning.get("learned")]
    return (f"Learning: the baseline `{arm}` gained {_num(gain)} held-out {learning.get('metric')} over the SFT "
            f"checkpoint on the RL suites (seed-to-seed sd {_num(spread)}, {learning.get('seeds')} seeds): {verdict}.")


def render(summary: dict[str, Any]) -> str:
    """The reference section's tables from a loaded ``summary.json``."""
    return "\n\n".join([learning_line(summary["learning"]), claims_markdown(summary["claims"]),
                        held_out_markdown(summary["held_out"])]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m analysis.readme_table SUMMARY_JSON", file=sys.stderr)
        return 2
    print(render(json.loads(Path(args[0]).read_text(encoding="utf-8"))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
