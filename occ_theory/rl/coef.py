"""The MTP coefficient λ: every rule in one place (docs/theory.md sections 3 and 4).

A rule reads what it needs from a ``CoefInputs`` and returns a ``Coefficient``: the λ applied and
the values it used. ``mtp_coef`` is applied here, once:

* ``off``: 0 (no MTP loss at all);
* ``detach`` / ``detach_encoder`` / ``ce`` / ``policy``: the fixed ``mtp_coef``;
* ``occ`` with ``reference`` or ``least_squares``: ``mtp_coef`` × the proxy's ratio averaged over
  the MTP depths (so each depth carries ``c = mtp_coef / D``, as the public implementation does);
* ``occ`` with ``fisher``: the proxy itself, ``Σ m·A·δ / (η·Σ m·δ²)``, *unscaled*: it is λ*_F of
  the Fisher curvature model, a coefficient in its own right, and ``mtp_coef`` does not enter. On the
  optimizer's first step (no Adam state: the step is a sign step and P is undefined) it applies 0;
* ``real``: λ*_real of the real, clipped AdamW step (``adam_real``, docs/theory.md section 2),
  clamped to the clip interval where the clip is off at λ = 0 (``step_lambda``: a gradient and an HVP);
* ``adam_step``: λ*_m of the unclipped, v̂-frozen ``adam_step`` model (formerly ``oracle``: a plug-in
  model optimum, not an oracle);

``real`` and ``adam_step`` are recomputed every ``every`` steps (``rl.coef_every``) and held in
between; where their λ* is undefined (β ≥ 0, or u = 0) they apply 0, the detach-equivalent, and count
it (``undefined``). Then, for every calibrated rule (``CALIBRATED``), an optional EMA and clip, and
the bound ``|λ| ≤ bound`` (``rl.coef_max``). A non-finite value is applied as 0 and counted.

Rules that change the update on θ_S itself (``SHARED_RULES``) keep ``mtp_coef`` in the loss, so
θ_M trains as under ``policy``; after the backward pass ``shared_update`` replaces the update on
θ_S, ``g + mtp_coef·u``, by:

* ``cosine`` (Du et al. 2018, "Adapting auxiliary losses using gradient similarity"):
  ``g + mtp_coef·u`` when cos(g, u) > 0, else ``g``;
* ``cosine_weighted``: ``g + mtp_coef·max(0, cos(g, u))·u``;
* ``pcgrad`` (Yu et al. 2020) and ``upgrad`` (Quinton & Rey 2024): torchjd's aggregation of the two
  loss gradients ``−g`` and ``−mtp_coef·u`` (``pip install ".[surgery]"``).

Each realised update is ``a·g + b·u`` (two-row aggregators stay in the span), so its effective
coefficient is ``λ_eff = b/a`` [``lambda/effective``].

The log-prob proxies come from globally summed ``(num, den)`` terms
(``occ_theory.theory.proxies``), so a multi-process run applies the same λ as one process with the
whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..names import REGIME_TABLE
from ..theory import proxies
from ..theory.params import Params, axpy, dot, mul, sq_norm
from ..theory.precond import adam_preconditioner
from .batch import forward_logprobs, mtp_mask

NAN = float("nan")
SHARED_RULES = tuple(r.rule for r in REGIME_TABLE.values() if r.edits_shared)
"""Rules that replace the update on θ_S after the backward pass (``shared_update``)."""
STEP_RULES = tuple(r.rule for r in REGIME_TABLE.values() if r.step_model)
"""Rules whose λ is a model optimum of the next step (an HVP of J), recomputed every ``every`` steps."""
NEEDS_U = tuple(r.rule for r in REGIME_TABLE.values() if r.needs_u)
"""Rules that need u = ∇M on θ_S from the live step (``fisher`` too, an occ proxy)."""
CALIBRATED = ("reference", "least_squares", "fisher", *STEP_RULES)
"""Rules whose λ is computed at each step: they take the EMA, the clip and the bound."""
SCALED_PROXIES = ("reference", "least_squares")
"""Proxies whose value is a ratio that ``mtp_coef`` scales (docs/theory.md 4a, 4b); ``fisher`` is not."""
FISHER_FD_STEP = 1e-4
"""Largest parameter change of the central difference behind the fisher proxy's δ."""


@dataclass(frozen=True)
class Coefficient:
    """The λ applied at one step, with the values it came from."""

    value: float
    """λ, the coefficient multiplying M in the loss ``−J − λ·M``."""
    rule: str
    """off | fixed | reference | least_squares | fisher | real | adam_step | cosine | cosine_weighted | pcgrad |
    upgrad."""
    mtp_coef: float
    """The configured ``rl.mtp_coef`` (the base coefficient c for the scaled proxies)."""
    raw: float = NAN
    """The proxy before scaling, EMA and clip (NaN for off and fixed)."""
    scale: float = NAN
    """What multiplied ``raw`` (``mtp_coef`` for the scaled proxies, 1 for fisher)."""
    held: bool = False
    """A ``STEP_RULES`` value held from an earlier step (``rl.coef_every``), not computed at this one."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coefficient:
        return cls(**d)


@dataclass
class CoefInputs:
    """What a rule may read at one step. ``proxies`` holds each log-prob proxy's unscaled value;
    ``fisher`` computes the fisher proxy on demand (it costs a backward and two forwards), ``real`` and
    ``adam_step`` their model optimum (a gradient and an HVP each); ``first_step``: the optimizer has no
    state yet."""

    proxies: dict[str, float] = field(default_factory=dict)
    fisher: Callable[[], float] | None = None
    real: Callable[[], float] | None = None
    adam_step: Callable[[], float] | None = None
    first_step: bool = False


@dataclass
class CoefficientRule:
    regime: str
    mtp_coef: float
    proxy: str = "reference"
    ema: float = 0.0
    clip: tuple[float, float] | None = None
    bound: float = 0.0
    every: int = 1
    _state: float | None = None
    _last: Coefficient | None = None
    _calls: int = 0
    non_finite: int = 0
    undefined: int = 0

    @property
    def name(self) -> str:
        """The rule the regime's row of ``REGIME_TABLE`` names (``proxy``: ``rl.proxy``)."""
        rule = REGIME_TABLE[self.regime].rule
        return self.proxy if rule == "proxy" else rule

    @property
    def needs_mtp_grad(self) -> bool:
        """Whether the rule needs u = ∇M on θ_S from the live step (at some steps)."""
        return self.name in ("fisher", *NEEDS_U)

    @property
    def needs_mtp_grad_now(self) -> bool:
        """Whether the next call needs u (a ``STEP_RULES`` rule holding its value does not)."""
        return self.needs_mtp_grad and not self._holds_next

    @property
    def _holds_next(self) -> bool:
        return self.name in STEP_RULES and self._last is not None and self._calls % self.every != 0

    @property
    def edits_shared(self) -> bool:
        """Whether ``shared_update`` replaces the update on θ_S after the backward pass."""
        return self.name in SHARED_RULES

    def scaled(self, name: str, raw: float) -> float:
        """The λ the proxy ``name`` gives before EMA and clip."""
        return self.mtp_coef * raw if name in SCALED_PROXIES else raw

    def __call__(self, inputs: CoefInputs | None = None) -> Coefficient:
        rule = self.name
        if rule == "off":
            return Coefficient(0.0, rule, self.mtp_coef)
        if rule == "fixed" or rule in SHARED_RULES:  # shared rules: mtp_coef in the loss, θ_S edited later
            return Coefficient(float(self.mtp_coef), rule, self.mtp_coef)
        holds = self._holds_next
        self._calls += 1
        if holds:
            return replace(self._last, held=True)
        inputs = inputs or CoefInputs()
        placeholder = False  # the 0 applied where no value exists: never averaged into the EMA
        if rule == "fisher" and inputs.first_step:
            self.undefined += 1  # no Adam state: P is undefined and the step is a sign step
            raw, placeholder = 0.0, True
        elif rule in ("fisher", *STEP_RULES):
            compute = getattr(inputs, rule)
            if compute is None:
                raise ValueError(f"the {rule} rule needs CoefInputs.{rule}")
            raw = float(compute())
            if rule in STEP_RULES and math.isnan(raw):
                self.undefined += 1  # β ≥ 0 or u = 0: no finite optimum, apply the detach-equivalent 0
                raw, placeholder = 0.0, True
        elif rule in inputs.proxies:
            raw = float(inputs.proxies[rule])
        else:
            raise ValueError(f"occ needs the {rule!r} proxy value")
        if not math.isfinite(raw):
            self.non_finite += 1
            raw, placeholder = 0.0, True
        value = self.scaled(rule, raw)
        if not placeholder:
            if self._state is not None and self.ema > 0:
                value = self.ema * self._state + (1 - self.ema) * value
            self._state = value
        if self.clip is not None:
            value = min(max(value, self.clip[0]), self.clip[1])
        if self.bound > 0:
            value = min(max(value, -self.bound), self.bound)
        self._last = Coefficient(value, rule, self.mtp_coef, raw, self.mtp_coef if rule in SCALED_PROXIES else 1.0)
        return self._last

    def state_dict(self) -> dict:
        return {"state": self._state, "non_finite": self.non_finite, "undefined": self.undefined, "calls": self._calls,
                "last": None if self._last is None else self._last.as_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self._state, self.non_finite, self.undefined = sd["state"], sd["non_finite"], sd.get("undefined", 0)
        self._calls = sd.get("calls", 0)  # checkpoints before rl.coef_every have neither
        self._last = Coefficient.from_dict(sd["last"]) if sd.get("last") is not None else None


# ---------------------------------------------------------------- the log-prob proxies


def _stat_terms(prefix: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sums from which the mean, std and max |x| over valid positions follow (summable over processes)."""
    ok = (mask > 0) & torch.isfinite(x)
    v = torch.where(ok, x, torch.zeros_like(x)).double()
    return {f"{prefix}/n": ok.double().sum(), f"{prefix}/s1": v.sum(), f"{prefix}/s2": (v * v).sum(),
            f"{prefix}/max_abs": v.abs().max() if v.numel() else v.new_zeros(())}


def _stats(prefix: str, t: dict[str, Tensor]) -> dict[str, float]:
    n, s1, s2 = (float(t[f"{prefix}/{k}"]) for k in ("n", "s1", "s2"))
    if n == 0:
        return {f"{prefix}/mean": NAN, f"{prefix}/std": NAN, f"{prefix}/max_abs": NAN}
    mean = s1 / n
    var = max(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return {f"{prefix}/mean": mean, f"{prefix}/std": math.sqrt(var), f"{prefix}/max_abs": float(t[f"{prefix}/max_abs"])}


def logprob_proxy_terms(logp: Tensor, old_logp: Tensor, mtp_logp: list[Tensor], mask: Tensor, prompt_len: int,
                        attention_mask: Tensor) -> dict[str, Tensor]:
    """The sums behind ``reference``, ``least_squares`` (per MTP depth) and the log-ratio statistics."""

    def block(t: Tensor) -> Tensor:  # the response block, padding filled with zeros as the trainer does
        return torch.where(mask > 0, t, torch.zeros_like(t))[:, prompt_len:]

    terms = _stat_terms("stats/l_minus_old", logp - old_logp, mask)
    for k, q in enumerate(mtp_logp, start=1):
        blocks = (block(logp), block(old_logp), block(q))
        if all(bool(torch.isfinite(t).all()) for t in blocks):
            num, den = proxies.reference_terms(*blocks)
        else:  # a non-finite forward: NaN, which the rule applies as 0 and counts
            num, den = torch.tensor(NAN, dtype=torch.float64), torch.tensor(float(blocks[0].numel()))
        terms |= {f"ref{k}/num": num, f"ref{k}/den": den}
        num, den = proxies.least_squares_terms(logp, old_logp, q, mtp_mask(mask, k, attention_mask))
        terms |= {f"ls{k}/num": num, f"ls{k}/den": den}
    if mtp_logp:
        terms |= _stat_terms("stats/q_minus_old", mtp_logp[0] - old_logp, mask)
    return terms


def logprob_proxies(logp: Tensor, old_logp: Tensor, mtp_logp: list[Tensor], mask: Tensor, prompt_len: int,
                    attention_mask: Tensor, reduce: Any = None) -> tuple[dict[str, float], dict[str, float]]:
    """``(raw, stats)``: the unscaled ``reference`` (public code: unmasked mean over the response
    block) and ``least_squares`` ratios, averaged over MTP depths, and the statistics of l − l_old
    and q − l_old. Cheap: every step. ``reduce`` sums the terms over processes (pass one that takes
    the max of keys ending in ``max_abs``)."""
    depths = len(mtp_logp)
    terms = logprob_proxy_terms(logp, old_logp, mtp_logp, mask, prompt_len, attention_mask)
    if reduce is not None:
        terms = reduce(terms)
    stats = _stats("stats/l_minus_old", terms)
    if depths == 0:
        return {"reference": NAN, "least_squares": NAN}, stats
    ref = sum(proxies.from_terms(terms[f"ref{k}/num"], terms[f"ref{k}/den"]) for k in range(1, depths + 1))
    ls = sum(proxies.from_terms(terms[f"ls{k}/num"], terms[f"ls{k}/den"], eps=proxies.REFERENCE_EPS)
             for k in range(1, depths + 1))
    return {"reference": ref / depths, "least_squares": ls / depths}, stats | _stats("stats/q_minus_old", terms)


def proxy_record(rule: CoefficientRule, raw: dict[str, float]) -> dict[str, float]:
    """``lambda/<proxy>``: the λ each proxy rule would apply (before EMA and clip)."""
    return {f"lambda/{name}": rule.scaled(name, v) for name, v in raw.items()}


# ---------------------------------------------------------------- the fisher proxy


def fisher_delta_fd(logp_at: Callable[[Params], Tensor], params: Params, direction: Params,
                    fd_step: float = FISHER_FD_STEP) -> Tensor | None:
    """δ = ∇l·v, the change of the main log-probs along ``direction`` v, by a central difference of
    two forward passes whose largest coordinate moves by ``fd_step`` (full precision); None when
    v = 0. (Probes compute δ exactly, by a JVP.)"""
    top = max(float(t.abs().max()) for t in direction.values())
    if top == 0.0:
        return None
    eps = fd_step / top
    with torch.no_grad():
        plus, minus = (logp_at(axpy(sign * eps, direction, params)).double() for sign in (1.0, -1.0))
    return (plus - minus) / (2 * eps)


def fisher_proxy(advantages: Tensor, dlogp: Tensor | None, mask: Tensor, lr: float, reduce: Any = None) -> float:
    """The fisher proxy, unscaled: ``Σ m·A·δ / (η·Σ m·δ²)`` (docs/theory.md 4c); 0 when δ = 0 (or None).
    ``reduce`` sums the two terms over processes."""
    if dlogp is None:
        dlogp = torch.zeros_like(mask, dtype=torch.float64)
    num, den = proxies.fisher_terms(advantages, dlogp, mask)
    t = {"num": num, "den": den}
    if reduce is not None:
        t = reduce(t)
    return proxies.from_terms(t["num"], t["den"], scale=1.0 / lr)


def fisher_from_optimizer(model: Any, batch: Any, temperature: float, shared: dict[str, Tensor],
                          optimizer: torch.optim.Optimizer, u: dict[str, Tensor], reduce: Any = None) -> float:
    """The fisher proxy of a live step: δ = ∇l·Pu in the optimizer's own geometry (Adam's P from its
    state; SGD's, P = I, before the first step), by ``fisher_delta_fd``; ``u`` is the global MTP
    gradient on θ_S and ``reduce`` sums the terms over processes."""
    params = {k: p.detach() for k, p in shared.items()}
    group = optimizer.param_groups[0]
    state = {k: optimizer.state.get(p, {}) for k, p in shared.items()}
    pu = mul(u, adam_preconditioner(state, params, group["betas"][1], group["eps"]))
    dlogp = fisher_delta_fd(lambda p: forward_logprobs(model, batch, temperature, "full", False, p)[0], params, pu)
    return fisher_proxy(batch.advantages, dlogp, batch.response_mask, group["lr"], reduce)


# ---------------------------------------------------------------- the model optima of the next step


def step_lambda(rule: str, model: Any, batch: Any, spec: Any, shared: dict[str, Tensor],
                optimizer: torch.optim.Optimizer, u: Params, mtp_grad_sq: float, *, grad_clip: float,
                clip_scope: str = "global", norms: Any = None, method: str = "rev-rev", reduce: Any = None) -> float:
    """The λ of a ``STEP_RULES`` rule at the live step (docs/theory.md section 2), from g = ∇J on this minibatch,
    ``u`` (the global MTP gradient on θ_S), ``mtp_grad_sq`` = ‖∇_{θ_M}M‖² and the optimizer's state: ``real``,
    ``adam_real``'s λ* clamped to the clip interval where the clip is off at λ = 0; ``adam_step``, λ*_m of the
    unclipped, v̂-frozen model. NaN where undefined. ``reduce`` sums over processes. g is recomputed here in the
    model's full precision; ``u`` comes from the live step, whose forward runs under autocast on a GPU (bf16), so
    there the rule's λ and the probe's (float64 by default) can differ by that precision, not by the theory."""
    from ..theory.hvp import eager_attention, grad
    from ..theory.step import adamw_state_buffers, adamw_step_directions, decompose_step, real_step_taylor
    from .batch import compute_objectives

    params = {k: p.detach() for k, p in shared.items()}

    def J(p: Params) -> Tensor:
        return compute_objectives(model, batch, spec, params=p, with_mtp=False, norms=norms).rl_objective

    group = optimizer.param_groups[0]
    buffers = adamw_state_buffers(params, {k: optimizer.state.get(p, {}) for k, p in shared.items()})
    adam = (group["lr"], group["betas"], group["eps"], group["weight_decay"])
    with eager_attention(model):
        g = grad(J, params)[1]
        g = reduce(g) if reduce is not None else g
        if rule == "real":
            return real_step_taylor(J, params, g, u, *buffers, *adam, grad_clip, mtp_grad_sq, clip_scope=clip_scope,
                                    method=method, reduce=reduce).lambda_star_clamped
        if rule == "adam_step":
            s, a = adamw_step_directions(params, g, u, *buffers, *adam)
            return decompose_step(J, params, s, a, method, reduce, geometry="adam_step").lambda_star
    raise ValueError(f"{rule!r} is not one of {STEP_RULES}")


# ---------------------------------------------------------------- rules that edit the update on θ_S


@dataclass(frozen=True)
class SharedUpdate:
    """The update a ``SHARED_RULES`` rule realises on θ_S: ``d = a·g + b·u`` (ascent direction of J)."""

    d: Params
    weight_g: float  # a
    weight_u: float  # b
    cosine: float  # cos(g, u)

    @property
    def lambda_effective(self) -> float:
        """λ_eff = b/a: the coefficient for which g + λ_eff·u points along d (NaN when a = 0)."""
        return self.weight_u / self.weight_g if self.weight_g != 0 else NAN

    def record(self) -> dict[str, float]:
        return {"lambda/effective": self.lambda_effective, "lambda/weight_g": self.weight_g,
                "lambda/weight_u": self.weight_u, "lambda/cosine": self.cosine}


def aggregator(name: str) -> Any:
    """torchjd's aggregator ``pcgrad`` | ``upgrad``, with a message naming the extra when torchjd is missing."""
    try:
        from torchjd.aggregation import PCGrad, UPGrad
    except ImportError as e:
        raise ValueError(f"regime {name!r} aggregates the RL and MTP gradients with torchjd: pip install "
                         "'occ-theory[surgery]' (torchjd with its quadprog projector)") from e
    return {"pcgrad": PCGrad, "upgrad": UPGrad}[name]()


def shared_update(rule: str, g: Params, u: Params, mtp_coef: float) -> SharedUpdate:
    """The realised update on θ_S of a ``SHARED_RULES`` rule, from g = ∇J and u = ∇M (see the module docstring).

    The surgery rules weight the two loss-gradient rows ``−g`` and ``−mtp_coef·u`` with torchjd's own
    weighting of their 2×2 Gramian (the aggregators are Gramian-weighted: the result is ``wᵀ`` times
    the rows), so θ_S is never flattened into a matrix."""
    gg, uu, gu = (float(x) for x in (sq_norm(g), sq_norm(u), dot(g, u)))
    cos = gu / math.sqrt(gg * uu) if gg > 0 and uu > 0 else NAN
    if rule == "cosine":
        a, b = 1.0, (mtp_coef if cos > 0 else 0.0)
    elif rule == "cosine_weighted":
        a, b = 1.0, (mtp_coef * max(0.0, cos) if math.isfinite(cos) else 0.0)
    elif rule in ("pcgrad", "upgrad"):
        c = mtp_coef
        gramian = torch.tensor([[gg, c * gu], [c * gu, c * c * uu]], dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):  # PCGrad draws a permutation from the global generator
            w = aggregator(rule).gramian_weighting(gramian)
        a, b = float(w[0]), c * float(w[1])  # rows −g and −c·u: the descent −(a·g + b·u)
    else:
        raise ValueError(f"{rule!r} is not a rule that edits the update on θ_S; those are {SHARED_RULES}")
    return SharedUpdate({k: a * g[k] + b * u[k] for k in g}, a, b, cos)
