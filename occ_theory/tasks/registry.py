"""The six suites by name: ``get_task``, fixed held-out ``eval_set``s and the ``train_stream`` mixture.

``eval_set(name, n, seed)`` is a pure function of its arguments: the first ``n`` distinct held-out
problems drawn from ``default_rng(seed)`` (so a smaller ``n`` gives a prefix of a larger one).
``train_stream`` draws a suite by weight, then a training problem of it, forever; evaluation-only
suites (``length_gen``) are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields

import numpy as np

from occ_theory.tasks.addition import Addition, LengthGen
from occ_theory.tasks.base import Problem, Task
from occ_theory.tasks.countdown import Countdown
from occ_theory.tasks.linear import Linear
from occ_theory.tasks.multiplication import Multiplication
from occ_theory.tasks.signed import Signed

_FAMILIES: dict[str, type[Task]] = {
    cls.name: cls for cls in (Addition, Signed, Multiplication, Linear, Countdown, LengthGen)
}
SUITES: tuple[str, ...] = tuple(_FAMILIES)
TRAIN_SUITES: tuple[str, ...] = tuple(name for name, cls in _FAMILIES.items() if not cls.eval_only)


def get_task(name: str, **difficulty: int) -> Task:
    """The task of suite ``name`` with its difficulty settings (constructor fields) overridden."""
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    cls = _FAMILIES[name]
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(difficulty) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown difficulty setting(s) {unknown} for suite {name!r}; valid settings: {valid}"
        )
    return cls(**difficulty)


def eval_set(name: str, n: int, seed: int = 1234, **difficulty: int) -> list[Problem]:
    """``n`` distinct held-out problems of suite ``name``, fixed by ``seed`` and the settings."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"eval_set: n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"eval_set: seed must be an int, got {seed!r}")
    task = get_task(name, **difficulty)
    rng = np.random.default_rng(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    patience, misses = max(2_000, 10 * n), 0
    while len(problems) < n:
        problem = task.sample(rng, "eval")
        if problem.prompt in seen:
            misses += 1
            if misses > patience:
                raise ValueError(
                    f"eval_set: found only {len(problems)} distinct held-out {name!r} problems "
                    f"(no new one in {patience} draws) but n={n}; the held-out split of settings "
                    f"{difficulty or 'default'} is smaller than n"
                )
            continue
        seen.add(problem.prompt)
        problems.append(problem)
        misses = 0
    return problems


def train_stream(
    names: str | Task | Iterable[str | Task],
    rng: np.random.Generator,
    weights: Sequence[float] | None = None,
    **difficulty: Mapping[str, int],
) -> Iterator[Problem]:
    """Endless training problems from a mixture of suites.

    ``names`` are suite names or ready ``Task``s (e.g. a ``UserTask``); ``weights`` (default equal)
    align with them; ``difficulty`` maps a suite name in ``names`` to its settings, e.g.
    ``train_stream(["addition", "linear"], rng, addition={"max_digits": 2})``. Everything is
    validated here, before the first problem is drawn.
    """
    tasks = _resolve(names, difficulty)
    probs = _normalise_weights(weights, len(tasks))
    return _mixture(tasks, probs, rng)


def _resolve(
    names: str | Task | Iterable[str | Task], difficulty: Mapping[str, Mapping[str, int]]
) -> list[Task]:
    items = [names] if isinstance(names, str | Task) else list(names)
    if not items:
        raise ValueError("train_stream: names is empty; give at least one suite")
    for item in items:
        if not isinstance(item, str | Task):
            raise ValueError(f"train_stream: names must hold suite names or Tasks, got {item!r}")
    labels = [item.name if isinstance(item, Task) else item for item in items]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"train_stream: suite(s) {duplicates} given more than once; use weights instead")
    stray = sorted(set(difficulty) - {item for item in items if isinstance(item, str)})
    if stray:
        raise ValueError(
            f"train_stream: difficulty given for {stray}, which are not suite names in names={labels}"
        )
    tasks = []
    for item in items:
        if isinstance(item, str):
            settings = difficulty.get(item, {})
            if not isinstance(settings, Mapping):
                raise ValueError(
                    f"train_stream: difficulty for {item!r} must be a dict of settings, got {settings!r}"
                )
            item = get_task(item, **settings)
        if item.eval_only:
            raise ValueError(
                f"train_stream: {item.name!r} is evaluation-only; train on {', '.join(TRAIN_SUITES)}"
            )
        tasks.append(item)
    return tasks


def _normalise_weights(weights: Sequence[float] | None, k: int) -> np.ndarray:
    if weights is None:
        return np.full(k, 1.0 / k)
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"train_stream: weights must be numbers, got {weights!r}") from None
    if w.shape != (k,):
        raise ValueError(f"train_stream: weights must have one entry per suite ({k}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"train_stream: weights must be finite, non-negative and not all zero, got {list(w)}"
        )
    return w / w.sum()


def _mixture(tasks: list[Task], probs: np.ndarray, rng: np.random.Generator) -> Iterator[Problem]:
    while True:
        task = tasks[int(rng.choice(len(tasks), p=probs))]
        yield task.sample(rng, "train")
