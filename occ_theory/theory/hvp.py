"""Gradients and Hessian-vector products of scalar functions of a parameter dict.

``f(params) -> 0-d tensor``. Three HVP methods, compared against each other and against the
explicit Hessian in ``tests/test_hvp.py``:

* ``"fwd-rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad(f)``.
* ``"rev-rev"``: reverse-over-reverse, double backward with ``torch.autograd``.
* ``"fd"``: central finite difference of the gradient, ``(∇f(θ+εv) − ∇f(θ−εv)) / 2ε``.

Both exact methods return the gradient as a by-product (``grad_and_hvps``): one gradient graph
serves every direction, so ``decompose`` and ``decompose_steps`` get ``g = ∇J`` and all their HVPs
from a single call. ``batched=True`` computes all directions in one vectorised call
(``torch.func.vmap`` over the tangents: ``is_grads_batched`` for ``rev-rev``); ``jvps`` does the
same for forward-mode products ``∂fn·v`` (the Fisher's ``δ = ∇l·v``).

The fused SDPA attention kernels have no double-backward or forward-mode rules; wrap curvature
computations on ``transformers`` models in ``eager_attention(model)``, after ``model.eval()``
(dropout makes HVPs random). Forgetting either raises a ``ValueError`` that says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .params import Params, axpy, check_alike, check_params, detached, flatten, sq_norm, unflatten

ScalarFn = Callable[[Params], Tensor]
HVP_METHODS = ("fwd-rev", "rev-rev", "fd")
FUSED_ATTENTION_HINT = (
    "a fused attention kernel (SDPA/flash) has no second-order or forward-mode derivative: wrap the call in "
    "`with occ_theory.theory.eager_attention(model):` (after model.eval())"
)
DROPOUT_HINT = "model.eval() first: dropout makes HVPs random"


def _scalar(out: object, what: str = "f(params)") -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return out.reshape(())


@contextmanager
def _explain_fused_attention() -> Iterator[None]:
    """Turn torch's raw error for a fused attention kernel under double backward or forward mode into a
    ``ValueError`` that names the fix."""
    try:
        yield
    except RuntimeError as e:  # NotImplementedError (forward mode) is a RuntimeError too
        msg = str(e)
        if "attention" in msg and ("not implemented" in msg or "not support" in msg):
            raise ValueError(f"{FUSED_ATTENTION_HINT} (torch: {msg.splitlines()[0]})") from e
        raise


def grad(f: ScalarFn, params: Mapping[str, Tensor]) -> tuple[Tensor, Params]:
    """``(f(θ), ∇f(θ))`` by reverse mode; parameters ``f`` does not use get exact zeros."""
    check_params(params)
    leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    with torch.enable_grad():
        value = _scalar(f(leaves))
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return value.detach(), dict(zip(leaves, grads))


def _as_tangent(params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> Params:
    check_alike(params, v, "v")
    return {k: v[k].detach().to(dtype=t.dtype, device=t.device) for k, t in params.items()}


def _stack(vs: Sequence[Params]) -> Params:
    return {k: torch.stack([v[k] for v in vs]) for k in vs[0]}  # (K, *shape) per key


def _unstack(batch: Params, n: int) -> list[Params]:
    return [{k: t[i].detach() for k, t in batch.items()} for i in range(n)]


def grad_and_hvp(
    f: ScalarFn, params: Mapping[str, Tensor], v: Mapping[str, Tensor], method: str = "fwd-rev"
) -> tuple[Params, Params]:
    """``(∇f(θ), ∇²f(θ)·v)`` in one pass of the chosen method."""
    g, (hv,) = grad_and_hvps(f, params, [v], method)
    return g, hv


def grad_and_hvps(
    f: ScalarFn, params: Mapping[str, Tensor], vs: Sequence[Mapping[str, Tensor]], method: str = "fwd-rev",
    batched: bool = False, project: Callable[[int, Params], Any] | None = None,
) -> tuple[Params, list[Any]]:
    """``(∇f(θ), [∇²f(θ)·v for v in vs])`` from one gradient graph.

    ``project(i, hv)`` replaces each ``∇²f·vᵢ`` by what it returns (e.g. a few dot products) as soon
    as that product exists, so that the looped methods hold one parameter-sized HVP at a time
    instead of ``len(vs)``; the batched ones hold them all anyway.

    ``batched=True`` computes every ``∇²f·v`` in one vectorised call over the stacked tangents
    (``rev-rev``: ``torch.autograd.grad(..., is_grads_batched=True)``; ``fwd-rev``: ``torch.func.vmap``
    of the JVP); ``False`` loops over ``vs`` on the same graph. Both give the same numbers. Looping
    is the default because it is the faster on CPU: on a 400k-parameter Qwen2 (one thread) rev-rev
    costs 7.2 gradients for 4 directions looped against 9.4 batched, 15.0 against 19.5 for 8
    (fwd-rev: 15.4 looped, 12.1 batched for 4). ``fd`` ignores ``batched``.
    """
    if method not in HVP_METHODS:
        raise ValueError(f"unknown HVP method {method!r}; choose one of {HVP_METHODS}")
    check_params(params)
    vs = [_as_tangent(params, v) for v in vs]
    base = detached(params)
    keep = project or (lambda i, hv: hv)
    if method == "fd":
        return grad(f, base)[1], [keep(i, _fd_hvp(f, base, v)) for i, v in enumerate(vs)]
    if not vs:
        return grad(f, base)[1], []
    with _explain_fused_attention():
        if method == "fwd-rev":
            return _fwd_rev(f, base, vs, batched, keep)
        return _rev_rev(f, base, vs, batched, keep)


class GradGraph:
    """∇f at θ with its reverse-mode graph kept: the gradient now, Hessian-vector products (rev-rev) later, along
    directions chosen after seeing the gradient (the optimizer's step depends on ∇J). One forward and one backward
    then serve the gradient and every HVP, instead of one forward and backward for the gradient and another for
    the HVPs. ``value`` is f at ``leaves`` (tensors that require grad), computed by the caller, so that one forward
    pass can also serve other gradients first (``retain_graph=True`` there)."""

    def __init__(self, value: Tensor, leaves: Mapping[str, Tensor]):
        self.keys, self.inputs = list(leaves), list(leaves.values())
        self.shapes = {k: t for k, t in leaves.items()}
        with _explain_fused_attention(), torch.enable_grad():
            gs = torch.autograd.grad(_scalar(value), self.inputs, create_graph=True, allow_unused=True,
                                     materialize_grads=True)
        self.value = value.detach()
        self.grad = {k: gk.detach() for k, gk in zip(self.keys, gs)}
        self._live = [(i, gk) for i, gk in enumerate(gs) if gk.requires_grad]  # the others are constant in θ
        self.closed = False

    @classmethod
    def of(cls, f: ScalarFn, params: Mapping[str, Tensor]) -> GradGraph:
        check_params(params)
        leaves = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
        with torch.enable_grad():
            return cls(f(leaves), leaves)

    def hvp(self, v: Mapping[str, Tensor]) -> Params:
        """∇²f·v on the kept graph (the graph stays for the next one); after ``close`` a ``RuntimeError``."""
        if self.closed:
            raise RuntimeError("this GradGraph was closed: its graph is gone, build another (GradGraph.of)")
        v = _as_tangent(self.shapes, v)
        if not self._live:  # f is linear in θ
            return {k: torch.zeros_like(t) for k, t in self.shapes.items()}
        with _explain_fused_attention():
            hv = torch.autograd.grad([gk for _, gk in self._live], self.inputs,
                                     grad_outputs=[v[self.keys[i]] for i, _ in self._live], allow_unused=True,
                                     materialize_grads=True, retain_graph=True)
        return {k: h.detach() for k, h in zip(self.keys, hv)}

    def close(self) -> None:
        """Drop the graph (its activations and their gradients)."""
        self._live, self.inputs, self.closed = [], [], True


def _fwd_rev(f: ScalarFn, base: Params, vs: list[Params], batched: bool, keep: Callable) -> tuple[Params, list]:
    g_fn = torch.func.grad(lambda q: _scalar(f(q)))
    if batched:
        g, hv = torch.func.vmap(lambda v: torch.func.jvp(g_fn, (base,), (v,)))(_stack(vs))
        return {k: t[0].detach() for k, t in g.items()}, [keep(i, h) for i, h in enumerate(_unstack(hv, len(vs)))]
    g, out = None, []
    for i, v in enumerate(vs):
        gi, hv = torch.func.jvp(g_fn, (base,), (v,))
        g = detached(gi) if g is None else g
        out.append(keep(i, detached(hv)))
    return g, out


def _rev_rev(f: ScalarFn, base: Params, vs: list[Params], batched: bool, keep: Callable) -> tuple[Params, list]:
    leaves = {k: t.clone().requires_grad_(True) for k, t in base.items()}
    keys, inputs = list(leaves), list(leaves.values())
    with torch.enable_grad():
        value = _scalar(f(leaves))
        gs = torch.autograd.grad(value, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
        g = {k: gk.detach() for k, gk in zip(keys, gs)}
        live = [i for i, gk in enumerate(gs) if gk.requires_grad]  # the others are constant in θ: H rows 0
        if not live:  # f is linear in θ: the Hessian is zero
            return g, [keep(i, {k: torch.zeros_like(t) for k, t in base.items()}) for i in range(len(vs))]
        outs = [gs[i] for i in live]
        if batched:  # one vector-Jacobian product of ∇f per stacked tangent: Hᵀv = Hv
            tangents = _stack(vs)
            hv = torch.autograd.grad(outs, inputs, grad_outputs=[tangents[keys[i]] for i in live],
                                     allow_unused=True, is_grads_batched=True)
            batch = {k: torch.zeros((len(vs), *t.shape), dtype=t.dtype) if h is None else h
                     for (k, t), h in zip(base.items(), hv)}
            return g, [keep(i, h) for i, h in enumerate(_unstack(batch, len(vs)))]
        out = []
        for j, v in enumerate(vs):
            hv = torch.autograd.grad(outs, inputs, grad_outputs=[v[keys[i]] for i in live], allow_unused=True,
                                     materialize_grads=True, retain_graph=j < len(vs) - 1)
            out.append(keep(j, {k: h.detach() for k, h in zip(keys, hv)}))
    return g, out


def _fd_hvp(f: ScalarFn, params: Params, v: Params) -> Params:
    vnorm = float(sq_norm(v)) ** 0.5
    if vnorm == 0.0:
        return {k: torch.zeros_like(t) for k, t in params.items()}
    dtype = next(iter(params.values())).dtype
    pnorm = float(sq_norm(params)) ** 0.5
    eps = torch.finfo(dtype).eps ** (1 / 3) * max(1.0, pnorm) / vnorm
    gp = grad(f, axpy(eps, v, params))[1]
    gm = grad(f, axpy(-eps, v, params))[1]
    return {k: (gp[k] - gm[k]) / (2 * eps) for k in params}


def hvp(f: ScalarFn, params: Mapping[str, Tensor], v: Mapping[str, Tensor], method: str = "fwd-rev") -> Params:
    """Hessian-vector product ``∇²f(θ)·v`` of a scalar function of a parameter dict.

    ``v`` must have the keys and shapes of ``params`` (``ValueError`` otherwise); it is cast to
    each parameter's dtype. ``method`` is ``"fwd-rev"``, ``"rev-rev"`` or ``"fd"``.
    """
    return grad_and_hvp(f, params, v, method)[1]


def jvp(fn: Callable[[Params], Tensor], params: Mapping[str, Tensor], v: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(fn(θ), ∂fn(θ)·v)`` for a tensor-valued ``fn`` by one forward-mode pass."""
    out, (tangent,) = jvps(fn, params, [v], batched=False)
    return out, tangent


def jvps(fn: Callable[[Params], Tensor], params: Mapping[str, Tensor], vs: Sequence[Mapping[str, Tensor]],
         batched: bool = True, max_batch: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``(fn(θ), [∂fn(θ)·v for v in vs])`` by forward mode: one ``torch.func.vmap``-ed pass over the
    stacked tangents (``fn(θ)`` itself is computed once), or with ``batched=False`` one pass per ``v``.
    Vectorised is the default: on CPU it costs 5.5 gradients for 8 tangents against 11.8 looped
    (a 400k-parameter Qwen2, one thread). The stack is a copy of every tangent and the pass carries
    ``len(vs)`` tangents of every activation: ``max_batch`` > 0 stacks at most that many per pass
    (same numbers, less memory; 0: all at once)."""
    check_params(params)
    if max_batch < 0:
        raise ValueError(f"max_batch must be >= 0 (0: every tangent in one pass), got {max_batch}")
    base = detached(params)
    vs = [_as_tangent(params, v) for v in vs]
    with _explain_fused_attention():
        if not vs:
            with torch.no_grad():
                return fn(base).detach(), []
        if batched:
            size, out, tangents = max_batch or len(vs), None, []
            for i in range(0, len(vs), size):
                o, t = torch.func.vmap(lambda v: torch.func.jvp(fn, (base,), (v,)))(_stack(vs[i:i + size]))
                out = o[0].detach() if out is None else out
                tangents += [x.detach() for x in t]
            return out, tangents
        pairs = [torch.func.jvp(fn, (base,), (v,)) for v in vs]
    return pairs[0][0].detach(), [t.detach() for _, t in pairs]


def hessian(f: ScalarFn, params: Mapping[str, Tensor]) -> Tensor:
    """The explicit Hessian as an (n, n) matrix over the flattened params (small models only)."""
    check_params(params)
    base = detached(params)
    with _explain_fused_attention():
        return torch.func.hessian(lambda x: _scalar(f(unflatten(x, base))))(flatten(base))


def check_dropout(*modules: nn.Module) -> None:
    """Raise ``ValueError`` when any module would drop activations at random: an ``nn.Dropout`` with
    ``p > 0`` or an attention with ``attention_dropout > 0``, in training mode. Random masks make J a
    different function at every call, so HVPs, finite differences and the curve disagree."""
    for module in modules:
        for name, sub in module.named_modules():
            if not sub.training:
                continue
            p = sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else getattr(sub, "attention_dropout", 0.0)
            if isinstance(p, (int, float)) and p > 0:
                raise ValueError(f"{DROPOUT_HINT} ({name or type(sub).__name__!r} has dropout p={p} in training mode)")


@contextmanager
def eager_attention(*modules: nn.Module) -> Iterator[None]:
    """Run ``transformers`` models with eager (math) attention inside the block, then restore.

    Fused SDPA/flash kernels have no double-backward or forward-mode AD rules, so every
    curvature computation on a ``transformers`` model must run under this. Refuses (``ValueError``)
    a model with active dropout: call ``model.eval()`` first (``check_dropout``).
    """
    check_dropout(*modules)
    saved = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            cfg = getattr(sub, "config", None)
            if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation"):
                continue
            seen.add(id(cfg))
            saved.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        for cfg, impl in reversed(saved):
            cfg._attn_implementation = impl
