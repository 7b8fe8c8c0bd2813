"""Segment tiling of the grouped multi-adapter kernels (kernels/multi_lora.py), shared with the LoRABatch
metadata that ops/multi_lora.py builds. Kept free of Triton imports: LoRABatch works without Triton."""
from __future__ import annotations


def tile_block_m(num_tokens: int) -> int:
    """Rows per segment tile of the grouped kernels: 16 for decode-sized batches, else 64.

    A function of T only, so a LoRABatch's shapes are fixed by (T, num_slots) and the Triton launchers
    can recompute it from x's shape.
    """
    return 16 if num_tokens <= 128 else 64


def num_tiles(num_tokens: int, num_slots: int) -> int:
    """Upper bound on the segment tiles of any assignment: each non-empty segment adds <= 1 partial tile."""
    bm = tile_block_m(num_tokens)
    return -(-num_tokens // bm) + min(num_slots, num_tokens)
