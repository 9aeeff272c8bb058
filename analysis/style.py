"""Shared plotting style: one colour per regime and per proxy across every figure, saving, symlog.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas; pyplot's global state is
never touched, so the analysis runs headless and figures never leak between calls.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from .frames import require

REGIME_COLORS = {"off": "#7f7f7f", "detach": "#1f77b4", "detach_encoder": "#17becf", "ce": "#ff7f0e",
                 "policy": "#d62728", "occ": "#2ca02c", "real": "#bcbd22", "adam_step": "#e6ab02",
                 "cosine": "#6a3d9a", "cosine_weighted": "#1b9e77", "pcgrad": "#b15928", "upgrad": "#393b79",
                 "sft": "#333333"}
"""One colour per regime (and ``sft``, the checkpoint as an arm), each of its own hue among the rules, so that
the lighter shades ``_arm_colors`` gives a regime's further arms (``detach/separate``, ``ce@1``) stay apart."""
PROXY_COLORS = {"reference": "#9467bd", "least_squares": "#8c564b", "fisher": "#e377c2"}
PROXY_MARKERS = {"reference": "o", "least_squares": "s", "fisher": "^"}
_EXTRA = ("#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94")


def regime_color(regime: str) -> str:
    """The regime's colour (a fixed fallback, stable across calls, for a regime outside ``REGIME_COLORS``)."""
    return REGIME_COLORS.get(regime) or _EXTRA[sum(map(ord, regime)) % len(_EXTRA)]


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, out: Path, pdf: bool = False) -> Path:
    """Write ``out`` as PNG (and the same name as PDF when asked); return the PNG path."""
    out = Path(out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, kwargs in [(out, {"dpi": 140})] + ([(out.with_suffix(".pdf"), {})] if pdf else []):
        tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed over the old figure
        fig.savefig(tmp, format=path.suffix[1:], **kwargs)
        os.replace(tmp, path)
    return out


def symlog_if_mixed(ax, values: Iterable[float], axis: str = "y") -> bool:
    """Symmetric-log scale on ``axis`` when the finite values take both signs; True if applied."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if not ((v > 0).any() and (v < 0).any()):
        return False
    a = np.abs(v[v != 0])
    linthresh = max(float(np.percentile(a, 25)), float(a.max()) * 1e-4)  # at most ~4 decades per sign
    symlog_decades(ax, linthresh, float(a.max()), axis)
    return True


def symlog_decades(ax, linthresh: float, top: float, axis: str = "y") -> None:
    """A symlog ``axis`` whose ticks are 0 and at most three decades on each side, so labels never crowd around 0."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("symlog", linthresh=linthresh, linscale=0.5)
    lo_k, hi_k = math.ceil(math.log10(linthresh)), math.floor(math.log10(max(top, linthresh)))
    step = max(1, math.ceil((hi_k - lo_k + 1) / 3))
    ks = list(range(hi_k, lo_k - 1, -step))
    which = ax.yaxis if axis == "y" else ax.xaxis
    which.set_major_locator(FixedLocator(sorted([0.0, *(10.0**k for k in ks), *(-(10.0**k) for k in ks)])))
    which.set_major_formatter(FuncFormatter(lambda x, _: "0" if x == 0 else
                                            f"{'−' if x < 0 else ''}1e{round(math.log10(abs(x)))}"))
    which.set_minor_locator(NullLocator())


def figure(title: str, *requires: str) -> Callable:
    """Declare a figure function's title and the columns it needs (``REQUIRES``); the check runs first."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(df, out, *args, **kwargs):
            require(df, requires, title)
            return fn(df, out, *args, **kwargs)

        wrapper.REQUIRES = requires
        wrapper.TITLE = title
        return wrapper
    return deco
