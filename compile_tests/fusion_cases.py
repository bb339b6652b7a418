"""The combine spellings the pass must rewrite / leave alone, their inputs, and the checks shared by
the compile tests.

Every spelling is written the way model code is: sizes come from the tensors (so the token count can
be dynamic), except ``TOPK``, a model constant.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
from torch.testing import FileCheck

import fused_moe_ops
from fused_moe_ops.reference import shuffle_mul_sum_reference

TOPK = 2
K = 16
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---------------------------------------------------------------- spellings the pass rewrites


def seed(x, idx, w):  # the line from sglang PR 6916
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.view(m, TOPK, 1).to(x.dtype)).sum(dim=1)


def seed_no_to(x, idx, w):  # without .to: weights in another dtype promote the product
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.view(m, TOPK, 1)).sum(dim=1)


def reshape(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].reshape(m, TOPK, k) * w.reshape(m, TOPK, 1)).sum(dim=1)


def unsqueeze(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def ellipsis_none(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w[..., None]).sum(dim=1)


def commuted(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (w.view(m, TOPK, 1).to(x.dtype) * x[idx].view(m, TOPK, k)).sum(dim=1)


def sum1(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k) * w.unsqueeze(-1)).sum(1)


def index_select(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x.index_select(0, idx).view(m, TOPK, k) * w.unsqueeze(-1)).sum(dim=1)


def upcast(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return (x[idx].view(m, TOPK, k).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)


def weights_before_gather(y, idx, w_sorted):
    m, k = idx.shape[0] // TOPK, y.shape[1]
    return (y * w_sorted.unsqueeze(-1))[idx].view(m, TOPK, k).sum(dim=1)


def no_gather(y, w):
    m, k = w.shape[0], y.shape[1]
    return (y * w.reshape(-1).unsqueeze(-1)).view(m, TOPK, k).sum(dim=1)


def bmm(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return torch.bmm(w.unsqueeze(1), x[idx].view(m, TOPK, k)).squeeze(1)


def einsum(x, idx, w):
    m, k = w.shape[0], x.shape[1]
    return torch.einsum("mkh,mk->mh", x[idx].view(m, TOPK, k), w)


def bmm_cast(x, idx, w):  # the rows upcast for the bmm, its result cast back before the squeeze
    m, k = w.shape[0], x.shape[1]
    return torch.bmm(w.reshape(-1, 1, TOPK).float(), x[idx].view(m, TOPK, k).float()).to(x.dtype).squeeze(1)


def bmm_squeeze_cast(x, idx, w):  # the same, cast after the squeeze
    m, k = w.shape[0], x.shape[1]
    return torch.bmm(w.unsqueeze(1).float(), x[idx].view(m, TOPK, k).float()).squeeze(1).to(x.dtype)


def einsum_per_token(expert_outs, w):  # SGLang's torch-native MoE and gpt-fast's Mixtral: no gather
    return torch.einsum("tai,ta -> ti", expert_outs, w)


# ---- the scatter-add family: the routing is in the graph (top-k of the router's scores, then a sort of
# the experts), the rows arrive in expert order and are scattered back to their tokens. Stable sorts:
# the rows are graph inputs here, so which row belongs to which token must not depend on how ties
# between equal expert ids are broken.


def route(logits):
    """The router: weights and expert ids (m, topk) from the scores (m, experts) (sigmoid scores, as
    DeepSeek-V3 routes; no reduction, so that the generated-code check sees the combine's alone)."""
    return torch.topk(logits.sigmoid(), TOPK, dim=-1)


def scatter_add_float_div(y, logits):  # torchao's MoE quantization modules
    w, expert_ids = route(logits)
    m, k = expert_ids.shape[0], y.shape[1]
    perm = expert_ids.view(-1).argsort(stable=True)
    tok = perm.div(TOPK).floor().to(torch.int32)
    scores = w.view(-1, 1)[perm]
    out = torch.zeros(m, k, dtype=y.dtype, device=y.device)
    return out.scatter_add(dim=0, index=tok.unsqueeze(-1).expand(-1, k).to(torch.int64), src=scores * y)


def scatter_add_floordiv(y, logits):
    w, expert_ids = route(logits)
    m, k = expert_ids.shape[0], y.shape[1]
    perm = torch.argsort(expert_ids.view(-1), stable=True)
    tok = perm // TOPK
    out = torch.zeros(m, k, dtype=y.dtype, device=y.device)
    return out.scatter_add_(0, tok.view(-1, 1).expand(-1, k), y * w.view(-1)[perm].unsqueeze(-1))


def index_add_trunc(y, logits):  # JetMoE's router and combine
    w, expert_ids = route(logits)
    m, k = expert_ids.shape[0], y.shape[1]
    _, perm = expert_ids.flatten().sort(dim=0, stable=True)
    tok = perm.div(TOPK, rounding_mode="trunc")
    gates = w.flatten()[perm]
    zeros = torch.zeros((m, k), dtype=y.dtype, device=y.device)
    return zeros.index_add(0, tok, y * gates[:, None])


def index_put_accumulate(y, logits):
    w, expert_ids = route(logits)
    m, k = expert_ids.shape[0], y.shape[1]
    perm = expert_ids.view(-1).sort(stable=True).indices
    tok = perm.div(TOPK, rounding_mode="floor")
    out = torch.zeros(m, k, dtype=y.dtype, device=y.device)
    return out.index_put_((tok,), y * w.view(-1)[perm].view(-1, 1), accumulate=True)


@dataclass(frozen=True)
class Spelling:
    name: str
    fn: Callable
    pattern: str                 # the fusion expected to fire (key of fusion_stats()["by_pattern"])
    kind: str = "gather"         # gather | sorted (weights per row of y) | identity (no gather)
                                 # | per_token (no gather: expert outputs (m, topk, k))
                                 # | scatter (rows in expert order, router scores (m, experts))
    weights: str = "x"           # dtype of the weights: "x" (same as x) or "f32"
    negative_ok: bool = True     # eager accepts negative indices (x[idx] does, index_select does not)
    index_dtype: torch.dtype = torch.int64
    dynamic_ok: bool = True      # rewritten with a symbolic token count too
    generated: int = 0           # kernels Inductor still generates beside the op (scatter: the routing's
                                 # sigmoid, and the inverse permutation the weights' gather fuses into)

    def __repr__(self) -> str:
        return self.name


REWRITTEN: List[Spelling] = [
    Spelling("seed", seed, "gather_mul_sum", weights="f32"),
    Spelling("seed_no_to", seed_no_to, "gather_mul_sum", weights="f32"),
    Spelling("reshape", reshape, "gather_mul_sum", index_dtype=torch.int32),
    Spelling("unsqueeze", unsqueeze, "gather_mul_sum"),
    Spelling("ellipsis_none", ellipsis_none, "gather_mul_sum"),
    Spelling("commuted", commuted, "gather_mul_sum", weights="f32"),
    Spelling("sum1", sum1, "gather_mul_sum", index_dtype=torch.int32),
    Spelling("index_select", index_select, "gather_mul_sum", negative_ok=False),
    Spelling("upcast", upcast, "gather_mul_sum", weights="f32"),
    Spelling("weights_before_gather", weights_before_gather, "weighted_rows_sum", kind="sorted"),
    Spelling("no_gather", no_gather, "weighted_rows_sum", kind="identity"),
    Spelling("bmm", bmm, "bmm_combine"),
    Spelling("einsum", einsum, "bmm_combine"),
    Spelling("bmm_cast", bmm_cast, "bmm_combine"),
    Spelling("bmm_squeeze_cast", bmm_squeeze_cast, "bmm_combine", weights="f32"),
    Spelling("einsum_per_token", einsum_per_token, "bmm_combine", kind="per_token"),
    # float32 division: exact only for a known row count (docs/FUSION.md)
    Spelling("scatter_add_float_div", scatter_add_float_div, "scatter_add_combine", kind="scatter", generated=2, dynamic_ok=False),
    Spelling("scatter_add_floordiv", scatter_add_floordiv, "scatter_add_combine", kind="scatter", generated=2),
    Spelling("index_add_trunc", index_add_trunc, "scatter_add_combine", kind="scatter", generated=2),
    Spelling("index_put_accumulate", index_put_accumulate, "scatter_add_combine", kind="scatter", generated=2),
]
BY_NAME: Dict[str, Spelling] = {s.name: s for s in REWRITTEN}


# HF transformers' grouped_mm experts (transformers/integrations/moe.py, 5.17 and 5.24): the expert
# output is sorted by expert, weighted per row, un-permuted by a scattered inverse permutation and
# summed; 5.17 (and 5.24 under expert parallelism) first zeroes sentinel rows with masked_fill. The
# decoder layer then adds the residual to ``out.reshape(b, s, h)``.
HF_TOPK = 4


def hf_grouped_mm_combine(proj_out, top_k_weights, perm, residual, sentinel_mask=None):
    if sentinel_mask is not None:
        proj_out = proj_out.masked_fill(sentinel_mask, 0.0)
    sample_weights_g = top_k_weights.reshape(-1)[perm]
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted_out = weighted_out[inv_perm]
    num_tokens = top_k_weights.shape[0]
    final = weighted_out.view(num_tokens, HF_TOPK, proj_out.shape[-1]).sum(dim=1)
    return residual + final.to(residual.dtype).reshape(1, num_tokens, -1)


def hf_grouped_mm_inputs(m: int, seed: int, dtype=torch.bfloat16):
    """(proj_out, top_k_weights, perm, residual) for hf_grouped_mm_combine: m tokens, HF_TOPK slots."""
    g = torch.Generator().manual_seed(seed)
    s = m * HF_TOPK
    proj_out = torch.randn(s, K, generator=g).to(dtype)
    weights = torch.rand(m, HF_TOPK, generator=g).to(dtype)
    perm = torch.randperm(s, generator=g)
    residual = torch.randn(1, m, K, generator=g).to(dtype)
    return proj_out, weights, perm, residual


# ---------------------------------------------------------------- inputs and the float64 reference


def make_index(n: int, rows: int, *, negative: bool, dtype=torch.int64, gen=None) -> torch.Tensor:
    """n row numbers in [-rows, rows) with duplicates and a -1 (or in [0, rows) if not negative)."""
    low = -rows if negative else 0
    idx = torch.randint(low, rows, (n,), generator=gen)
    if n >= 3:
        idx[1] = idx[2]  # a duplicate
    if negative and n >= 1:
        idx[0] = -1      # eager: the last row
    return idx.to(dtype)


def make_inputs(sp: Spelling, m: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = m * TOPK + 3  # expert output with a few extra (padding) rows
    wdtype = torch.float32 if sp.weights == "f32" else dtype

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt).to(device)

    if sp.kind == "identity":
        return (randn(m * TOPK, K), (torch.rand(m, TOPK, generator=gen) + 0.1).to(wdtype).to(device))
    if sp.kind == "per_token":
        return (randn(m, TOPK, K), (torch.rand(m, TOPK, generator=gen) + 0.1).to(wdtype).to(device))
    if sp.kind == "scatter":  # 4 experts for m * topk pairs: ties, uneven loads
        return (randn(m * TOPK, K), randn(m, 4))
    idx = make_index(m * TOPK, rows, negative=sp.negative_ok, dtype=sp.index_dtype, gen=gen).to(device)
    if sp.kind == "sorted":
        return (randn(rows, K), idx, (torch.rand(rows, generator=gen) + 0.1).to(wdtype).to(device))
    return (randn(rows, K), idx, (torch.rand(m, TOPK, generator=gen) + 0.1).to(wdtype).to(device))


def reference64(sp: Spelling, args) -> torch.Tensor:
    """What the spelling computes, accumulated in float64 (the reference's acc_dtype) with eager's
    indexing (negative entries wrap), from the same low-precision inputs. The reference's dtypes stop
    at float32, so it rounds once to float32 at the end (2^-24 relative, far below every tolerance)."""
    if sp.kind == "identity":
        y, w = args
        return shuffle_mul_sum_reference(y, None, w, torch.float32, acc_dtype=torch.float64).double()
    if sp.kind == "per_token":
        eo, w = args
        return shuffle_mul_sum_reference(eo.reshape(-1, eo.shape[-1]), None, w, torch.float32,
                                         acc_dtype=torch.float64).double()
    if sp.kind == "scatter":  # row r belongs to pair perm[r]: slot (t, j) reads row inverse[t*topk + j]
        y, logits = args
        w, ids = route(logits.cpu())  # eager's routing (the combine is what is compared)
        perm = ids.reshape(-1).argsort(stable=True)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        return shuffle_mul_sum_reference(y.cpu(), inverse, w.cpu(), torch.float32, acc_dtype=torch.float64).double()
    x, idx, w = args
    wrapped = torch.where(idx < 0, idx + x.shape[0], idx).long()
    factors = w[wrapped].view(-1, TOPK) if sp.kind == "sorted" else w
    return shuffle_mul_sum_reference(x, wrapped, factors, torch.float32, acc_dtype=torch.float64).double()


_ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}
_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_accuracy(out: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> None:
    """out matches eager's dtype and shape, is close to the float64 reference, and at least as close
    as eager (slack: one rounding step of the result)."""
    assert out.dtype == eager.dtype and out.shape == eager.shape, (out.dtype, eager.dtype, out.shape, eager.shape)
    ref = ref64.cpu()
    scale = max(1.0, float(ref.abs().max()))
    err_out = float((out.cpu().double() - ref).abs().max())
    err_eager = float((eager.cpu().double() - ref).abs().max())
    tol = _TOL.get(out.dtype, 1e-5) * scale
    assert err_out <= tol, f"compiled result off the float64 reference by {err_out} (tolerance {tol})"
    slack = 2 * _ULP[out.dtype] * scale
    assert err_out <= err_eager + slack, f"compiled error {err_out} > eager error {err_eager} + {slack}"


# ---------------------------------------------------------------- generated-code checks


FUSED_CALL = "torch.ops.moe._shuffle_mul_sum_fused.default("


def generated_kernels(code: str) -> List[str]:
    """Names of the kernels Inductor generated in ``code`` (C++ and Triton), each defined once."""
    return re.findall(r"^(\w+) = async_compile\.(?:cpp_pybinding|cpp|triton)\(", code, flags=re.M)


def kernel_launches(code: str) -> Dict[str, int]:
    """What one call of the compiled graph launches: generated kernels and the calls of our op."""
    return {"generated": len(generated_kernels(code)), "op": code.count(FUSED_CALL) + code.count("torch.ops.moe.shuffle_mul_sum.default(")}


def assert_fused(code: str, generated: int = 0, ops: int = 1) -> None:
    """The generated module calls the op ``ops`` times and launches ``generated`` kernels of its own:
    by default none (the whole graph is the combine: the index wrap, the weights' cast and gather are
    the op's arguments, not kernels that feed it), and it computes no reduction / bmm of its own."""
    launches = kernel_launches(code)
    assert launches == {"generated": generated, "op": ops}, (
        f"expected {ops} op call(s) and {generated} generated kernel(s), got {launches}: "
        f"{generated_kernels(code)}\n{code}")
    assert not _reduction_in(code), "generated code still reduces:\n" + code


def assert_not_fused(code: str) -> None:
    FileCheck().check_not("torch.ops.moe.").run(code)


def _reduction_in(code: str) -> bool:
    return bool(
        re.search(r"\btmp_acc\d", code)             # C++ (CPU) reduction accumulators
        or re.search(r"\btl\.sum\(|triton_helpers\.\w*reduc", code)  # Triton reductions
        or "extern_kernels.bmm" in code or "extern_kernels.mm" in code or "aten.bmm" in code
    )


def symbolic_m_logged(messages: List[str]) -> bool:
    """Whether a rewrite was logged with a symbolic token count (m=s0, m=(s1//2), ...)."""
    for msg in messages:
        mo = re.search(r"\bm=(\S+)", msg)
        if mo and not mo.group(1).isdigit():
            return True
    return False


class _ListHandler(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def fusion_log(level: int = logging.INFO):
    """Collect the messages of logger ``fused_moe_ops`` (independent of pytest's log capture)."""
    logger = logging.getLogger("fused_moe_ops")
    handler, saved = _ListHandler(level), logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
