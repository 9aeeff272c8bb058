"""``hvp``: one HVP of the clipped surrogate J against one gradient of J, both through ``functional_call``.

A plain ``Qwen2ForCausalLM`` (vocabulary 100), random tokens, log-probs near uniform, random
advantages; the gradient and both exact HVP methods are interleaved. Target: HVP ≤ 3 gradients.
"""

from __future__ import annotations

from .common import BenchResult, interleave, paired_ratio, target
from .profiling import describe_ops, top_ops

HVP_SIZES = {
    # a few hundred thousand parameters: the size the target is stated for
    "tiny": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "batch": 16, "length": 48},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4,
              "batch": 8, "length": 64},
}
TARGET = 3.0


def bench_hvp(sizes: list[str], repeats: int) -> BenchResult:
    res = BenchResult("hvp")
    for size in sizes:
        rows, notes = _hvp_rows(size, repeats)
        res.rows += rows
        res.notes += notes
    res.notes.append("ratio = median over rounds of HVP time / gradient time (same round)")
    return res


def _hvp_rows(size: str, repeats: int) -> tuple[list[dict], list[str]]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..theory import eager_attention, grad, hvp

    spec = HVP_SIZES[size]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=100, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                      num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                      num_key_value_heads=spec["num_kv_heads"], max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    b, t = spec["batch"], spec["length"]
    ids = torch.randint(0, 100, (b, t), generator=g)
    old = -4.6 + 0.05 * torch.randn(b, t - 1, generator=g)
    adv = torch.randn(b, 1, generator=g)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}

    def objective(p):
        logits = torch.func.functional_call(model, p, (ids,)).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ratio = torch.exp(lp - old)
        return torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv).mean()

    fns = {
        "grad": lambda: grad(objective, params),
        "fwd-rev": lambda: hvp(objective, params, v, "fwd-rev"),
        "rev-rev": lambda: hvp(objective, params, v, "rev-rev"),
    }
    n = sum(p.numel() for p in params.values())
    rows, notes = [], []
    with eager_attention(model):
        s = interleave(fns, repeats, warmup=2, progress=f"hvp/{size}")
        for method in ("fwd-rev", "rev-rev"):
            med, lo, hi = paired_ratio(s[method].times, s["grad"].times)
            rows.append({
                "size": size, "params": n, "batch": b, "length": t, "method": method,
                "grad_ms": 1e3 * s["grad"].median_s, "hvp_ms": 1e3 * s[method].median_s,
                "spread": s[method].spread, "rss_delta_mb": s[method].rss_delta_mb, **target(med, "<=", TARGET),
                "ratio_min": lo, "ratio_max": hi,
            })
            if not rows[-1]["met"] and size == "tiny":  # profile the small model only: the large one is slow
                notes.append(_explain(method, med, fns, size))
    return rows, notes


def _explain(method: str, ratio: float, fns: dict, size: str) -> str:
    base, ops = top_ops(fns["grad"], calls=2, n=4), top_ops(fns[method], calls=2, n=4)
    mm = {o["op"]: o["calls"] for o in ops}
    mm_base = {o["op"]: o["calls"] for o in base}
    counts = ", ".join(f"{k} {mm[k]:g} vs {mm_base[k]:g}" for k in mm if k in mm_base)
    why = ("double backward: every matmul of the gradient's graph is differentiated again, so ~3× the "
           "gradient's matmuls plus the elementwise backward-of-backward of softmax, SiLU and RMSNorm"
           if method == "rev-rev" else
           "torch.func.jvp over torch.func.grad: every matmul of the forward and of the backward gets a "
           "tangent matmul per differentiable input (x·dW + dx·W), more matmuls than rev-rev's double "
           "backward; the tiny matmuls leave no room to amortise them")
    return (f"hvp {size} {method} misses ({ratio:.2f} gradients). Top ops per call: {method}: {describe_ops(ops)}; "
            f"grad: {describe_ops(base)}; calls per op ({method} vs grad): {counts}. Cause "
            f"(occ_theory/theory/hvp.py, not in bench): {why}.")
