"""The "torch" backend of the multi-adapter ops: PyTorch ops only, any device, any float dtype.

It walks the batch's active segments -- per segment, GEMMs over the slot's gathered rows, no per-token work --
with the segment bounds the batch read to the host once per step (`LoRABatch.host_segments`). Nothing else is
read back per layer: ranks become a device mask over the padded rank R (what lies past a slot's rank is never
read into the result, NaN padding included), scalings stay device scalars, and the dropout rates come as host
floats in the step's `StepDropout`. Math and conventions: `lora_kernels/ops/multi_lora.py`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lora_kernels.dropout import keep_threshold, philox4x32
from lora_kernels.ops import plumbing
from lora_kernels.ops.batch import dropout_rates, host_segments
from lora_kernels.ops.plumbing import below_autograd, seed_int, seed_tensor


def _compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The LoRA path's dtype: promote(a, b, float32) (a, b = x, A or S, B)."""
    return plumbing.lora_dtype(a.dtype, b.dtype)


# ----------------------------------------------------------------------------------------------------
# Per-slot LoRA dropout: the mask of lora_kernels.dropout for x viewed as [T, in] (element (t, k), the
# counter lora_linear uses), each row thresholded with the p of its token's slot. Regenerated from the
# call's seed wherever it is needed; never stored.
# ----------------------------------------------------------------------------------------------------

def _keep_rows(seed: int, rows: Tensor, K: int, p: float) -> Tensor:
    """Rows `rows` of lk.dropout_mask(seed, (T, K), p) as a [len(rows), K] bool tensor, without the others."""
    K4 = (K + 3) // 4
    counters = rows.view(-1, 1) * K4 + torch.arange(K4, dtype=torch.int64, device=rows.device)
    bits = torch.stack(philox4x32(seed, counters), dim=-1).view(rows.shape[0], K4 * 4)[:, :K]
    return (bits >> 1) >= keep_threshold(p)


class _SlotDropout:
    """One call's dropout over x [T, K]: `scale(l, rows)` is m / (1 - p_l) [len(rows), K] in dtype ct for rows
    of slot l, or None when p_l = 0."""

    def __init__(self, x: Tensor, ct: torch.dtype, dropout, seed):
        self.shape, self.ct, self.seed, self.ps = tuple(x.shape), ct, seed, dropout_rates(dropout)
        # The extension's vectorised generator makes the scales of all T rows at once (per distinct p), far
        # faster than the int64 Philox of _keep_rows. It rounds 1/(1-p) to float32: float32 only.
        self.full = {} if ct == torch.float32 and plumbing.native_dropout_ok(x) else None

    def scale(self, l: int, rows: Tensor) -> Optional[Tensor]:
        p = self.ps[l]
        if p == 0.0:
            return None
        if self.full is not None:
            f = self.full.get(p)
            if f is None:
                ones = torch.ones(self.shape, dtype=self.ct, device=rows.device)
                with below_autograd():
                    f = self.full[p] = torch.ops.lora_kernels.native_dropout.default(ones, p, seed_tensor(self.seed))
            return f.index_select(0, rows)
        return _keep_rows(seed_int(self.seed), rows, self.shape[1], p).to(self.ct) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------------------------------
# Segments and ranks
# ----------------------------------------------------------------------------------------------------

def _segments(bt):
    """(slot l, its token indices) for every slot with tokens, from the batch's host segment bounds."""
    starts, lens = host_segments(bt)
    sid = bt[1]
    for l, (s, n) in enumerate(zip(starts, lens)):
        if n > 0:
            yield l, sid[s:s + n].long()


def _rank_mask(ranks: Optional[Tensor], R: int, device) -> Optional[Tensor]:
    """[L, R] bool: column j of slot l is inside its rank (None when every slot uses all R)."""
    if ranks is None:
        return None
    return torch.arange(R, device=device) < ranks.to(device).clamp(0, R).view(-1, 1)


def _masked(t: Tensor, keep: Optional[Tensor]) -> Tensor:
    """t with the entries outside the rank mask set to 0 (torch.where: NaN padding never leaks through)."""
    return t if keep is None else torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _rows(x: Tensor, toks: Tensor, ct: torch.dtype, drop: Optional[_SlotDropout], l: int) -> Tensor:
    """x̂ rows `toks` (all of slot l) in dtype ct."""
    xs = x.index_select(0, toks).to(ct)
    f = None if drop is None else drop.scale(l, toks)
    return xs if f is None else xs * f


# ----------------------------------------------------------------------------------------------------
# Inference building blocks and the training forward / backward
# ----------------------------------------------------------------------------------------------------

def torch_shrink(x, A_stacks, bt, ranks, drop: Optional[_SlotDropout] = None):
    R = A_stacks[0].shape[1]
    ct = _compute_dtype(x, A_stacks[0])
    S = torch.zeros(x.shape[0], len(A_stacks) * R, dtype=ct, device=x.device)
    mask = _rank_mask(ranks, R, x.device)
    for l, toks in _segments(bt):
        xs = _rows(x, toks, ct, drop, l)
        keep = None if mask is None else mask[l].view(1, R)
        for i, A in enumerate(A_stacks):
            A_l = _masked(A[l].to(ct), None if keep is None else keep.view(R, 1))
            S[toks, i * R:(i + 1) * R] = _masked(xs @ A_l.T, keep)
    return S


def torch_expand(S, B_stacks, bt, y, scalings, ranks, y_offset):
    R = B_stacks[0].shape[2]
    ct = _compute_dtype(S, B_stacks[0])
    mask = _rank_mask(ranks, R, y.device)
    for l, toks in _segments(bt):
        keep = None if mask is None else mask[l].view(1, R)
        col = y_offset
        for i, B in enumerate(B_stacks):
            n = B.shape[1]
            Sl = _masked(S[toks, i * R:(i + 1) * R].to(ct), keep) * scalings[l].to(ct)
            delta = Sl @ _masked(B[l].to(ct), keep).T
            view = y[:, col:col + n]
            # Add in the compute dtype and round once, as the kernels do.
            view.index_copy_(0, toks, (view.index_select(0, toks).to(ct) + delta).to(y.dtype))
            col += n


def torch_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, dropout, seed):
    drop = None if seed is None else _SlotDropout(x, _compute_dtype(x, A_stacks[0]), dropout, seed)
    S = torch_shrink(x, A_stacks, bt, ranks, drop)
    y = torch.nn.functional.linear(x, weight, bias)
    if y.shape[0] > 0:
        torch_expand(S, B_stacks, bt, y, scalings, ranks, 0)
    return y, S


def torch_linear(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, col_scale=None):
    if col_scale is None:
        return torch_fwd(x, weight, bias, A_stacks, B_stacks, scalings, bt, ranks, None, None)[0]
    # y = col_scale[l_t] ⊙ (x W0ᵀ + LoRA) + b: the base in x's dtype (as torch_fwd's), the LoRA added, the
    # scale and the bias applied in the compute dtype, rounded once into x's dtype.
    ct = _compute_dtype(x, A_stacks[0])
    y = torch.nn.functional.linear(x, weight).to(ct)
    if y.shape[0] > 0:
        torch_expand(torch_shrink(x, A_stacks, bt, ranks), B_stacks, bt, y, scalings, ranks, 0)
    return apply_col_scale(y, col_scale, bt[0], bias).to(x.dtype)


def apply_col_scale(y: Tensor, col_scale: Tensor, token_adapter: Tensor, bias: Optional[Tensor]) -> Tensor:
    """col_scale[l_t] ⊙ y[t] + b in y's dtype (y [T, out]; col_scale [L + 1, out], row L for the -1 tokens;
    token_adapter [T]; bias [out] or None). The rows of col_scale gathered per token: the "torch" backend and
    the differentiable fallback (autograd reaches y, col_scale and b)."""
    L = col_scale.shape[0] - 1
    key = torch.where(token_adapter >= 0, token_adapter, L).long()
    g = col_scale.to(y.dtype).index_select(0, key)
    if bias is None:
        return y * g
    return torch.addcmul(bias.to(y.dtype), y, g)


def torch_bwd(dy, x, weight, A_stacks, B_stacks, S, scalings, bt, ranks, dropout, seed, need_dx, need_dA, need_dB):
    """Per active slot l (its gathered rows, G = dy rows, s = s_l, slice i, columns inside r_l):
    dB_i[l] = s Gᵢᵀ S_i, dS_i = s Gᵢ B_i[l], dA_i[l] = dS_iᵀ x̂, dx rows += (Σ_i dS_i A_i[l]) ⊙ m / (1 - p_l)."""
    R = A_stacks[0].shape[1]
    ct = _compute_dtype(x, A_stacks[0])
    dA = [torch.zeros(A.shape, dtype=ct, device=A.device) for A in A_stacks] if need_dA else None
    dB = [torch.zeros(B.shape, dtype=ct, device=B.device) for B in B_stacks] if need_dB else None
    dx = torch.mm(dy, weight) if need_dx else None
    if need_dx or need_dA or need_dB:
        drop = None if seed is None else _SlotDropout(x, ct, dropout, seed)
        mask = _rank_mask(ranks, R, x.device)
        for l, toks in _segments(bt):
            s = scalings[l].to(ct)
            cols = None if mask is None else mask[l].view(1, R)   # [1, R]: columns of B / S, rows of A
            rows = None if cols is None else cols.view(R, 1)
            G = dy.index_select(0, toks).to(ct)
            keep = None if drop is None else drop.scale(l, toks)
            if need_dA:
                xs = x.index_select(0, toks).to(ct)
                xs = xs if keep is None else xs * keep
            if need_dB:
                Ss = _masked(S.index_select(0, toks).to(ct), None if cols is None else cols.repeat(1, len(A_stacks)))
            lora_dx, col = None, 0
            for i, (A, B) in enumerate(zip(A_stacks, B_stacks)):
                Gi = G[:, col:col + B.shape[1]]
                col += B.shape[1]
                if need_dB:
                    dB[i][l] = _masked((Gi.T @ Ss[:, i * R:(i + 1) * R]).mul_(s), cols)
                if need_dA or need_dx:
                    dS = _masked((Gi @ _masked(B[l].to(ct), cols)).mul_(s), cols)  # [n, R]
                    if need_dA:
                        dA[i][l] = _masked(dS.T @ xs, rows)
                    if need_dx:
                        Al = _masked(A[l].to(ct), rows)
                        lora_dx = dS @ Al if lora_dx is None else lora_dx.addmm_(dS, Al)
            if need_dx:
                if keep is not None:
                    lora_dx.mul_(keep)
                # Add in the compute dtype and round once.
                dx.index_copy_(0, toks, (dx.index_select(0, toks).to(ct) + lora_dx).to(dx.dtype))
    if dA is not None:
        dA = [g.to(A.dtype) for g, A in zip(dA, A_stacks)]
    if dB is not None:
        dB = [g.to(B.dtype) for g, B in zip(dB, B_stacks)]
    return dx, dA, dB


def dropped_input(x, bt, dropout, seed) -> Tensor:
    """x̂ [T, in] in x's dtype for shrink kernels that take no mask: the rows of slots with p > 0 scaled by
    m / (1 - p) in float32, every other row x (the shrink skips -1 tokens and rank-0 slots)."""
    drop = _SlotDropout(x, torch.float32, dropout, seed)
    out = x.clone()
    for l, toks in _segments(bt):
        f = drop.scale(l, toks)
        if f is not None:
            out.index_copy_(0, toks, (x.index_select(0, toks).float() * f).to(x.dtype))
    return out
