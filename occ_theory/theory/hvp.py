"""Gradients and Hessian-vector products of scalar functions of a parameter dict.

``f(params) -> 0-d tensor``. Three HVP methods, compared against each other and against the
explicit Hessian in ``tests/test_hvp.py``:

* ``"fwd-rev"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad(f)``.
* ``"rev-rev"``: reverse-over-reverse, double backward with ``torch.autograd``.
* ``"fd"``: central finite difference of the gradient, ``(∇f(θ+εv) − ∇f(θ−εv)) / 2ε``.

Both exact methods return the gradient as a by-product (``grad_and_hvp``), which is how
``decompose`` gets ``g = ∇J`` and ``H·Pu`` from a single call.

The fused SDPA attention kernels have no double-backward or forward-mode rules; wrap curvature
computations on ``transformers`` models in ``eager_attention(model)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .params import Params, axpy, check_alike, check_params, detached, sq_norm

ScalarFn = Callable[[Params], Tensor]
HVP_METHODS = ("fwd-rev", "rev-rev", "fd")


def _scalar(out: object, what: str = "f(params)") -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what} must return a scalar tensor, got {shape}")
    return out.reshape(())


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


def grad_and_hvp(
    f: ScalarFn, params: Mapping[str, Tensor], v: Mapping[str, Tensor], method: str = "fwd-rev"
) -> tuple[Params, Params]:
    """``(∇f(θ), ∇²f(θ)·v)`` in one pass of the chosen method."""
    g, (hv,) = grad_and_hvps(f, params, [v], method)
    return g, hv


def grad_and_hvps(
    f: ScalarFn, params: Mapping[str, Tensor], vs: Sequence[Mapping[str, Tensor]], method: str = "fwd-rev"
) -> tuple[Params, list[Params]]:
    """``(∇f(θ), [∇²f(θ)·v for v in vs])``; ``rev-rev`` builds the gradient graph once for every v."""
    check_params(params)
    vs = [_as_tangent(params, v) for v in vs]
    base = detached(params)
    if method == "fwd-rev":
        def g_fn(p: Params) -> Params:
            return torch.func.grad(lambda q: _scalar(f(q)))(p)

        pairs = [torch.func.jvp(g_fn, (base,), (v,)) for v in vs]
        g = detached(pairs[0][0]) if pairs else grad(f, base)[1]
        return g, [detached(hv) for _, hv in pairs]
    if method == "rev-rev":
        leaves = {k: t.requires_grad_(True) for k, t in ((k, t.clone()) for k, t in base.items())}
        out = []
        with torch.enable_grad():
            value = _scalar(f(leaves))
            gs = torch.autograd.grad(value, list(leaves.values()), create_graph=True, allow_unused=True,
                                     materialize_grads=True)
            for i, v in enumerate(vs):
                inner = sum(torch.sum(gk * v[k]) for gk, k in zip(gs, leaves))
                if not inner.requires_grad:  # f is linear in θ: the Hessian is zero
                    hv = [torch.zeros_like(t) for t in leaves.values()]
                else:
                    hv = torch.autograd.grad(inner, list(leaves.values()), allow_unused=True,
                                             materialize_grads=True, retain_graph=i < len(vs) - 1)
                out.append({k: h.detach() for k, h in zip(leaves, hv)})
        return {k: gk.detach() for k, gk in zip(leaves, gs)}, out
    if method == "fd":
        return grad(f, base)[1], [_fd_hvp(f, base, v) for v in vs]
    raise ValueError(f"unknown HVP method {method!r}; choose one of {HVP_METHODS}")


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
    check_params(params)
    out, tangent = torch.func.jvp(fn, (detached(params),), (_as_tangent(params, v),))
    return out.detach(), tangent.detach()


def hessian(f: ScalarFn, params: Mapping[str, Tensor]) -> Tensor:
    """The explicit Hessian as an (n, n) matrix over the flattened params (small models only)."""
    from .params import flatten, unflatten

    check_params(params)
    base = detached(params)
    flat = flatten(base)
    return torch.func.hessian(lambda x: _scalar(f(unflatten(x, base))))(flat)


@contextmanager
def eager_attention(*modules: nn.Module) -> Iterator[None]:
    """Run ``transformers`` models with eager (math) attention inside the block, then restore.

    Fused SDPA/flash kernels have no double-backward or forward-mode AD rules, so every
    curvature computation on a ``transformers`` model must run under this.
    """
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
