"""Sliding-window attention (Mistral 7B; Beltagy et al. 2020): a query sees the `model.window`
most recent keys of its document, itself included, and nothing earlier.

    mask[l, s] = same document and s <= l and l - s < window

The mask is built at slot indices, so cached decoding applies the same window to the cache: a
new token never attends to a key more than `window - 1` slots back. model.window = 0 means no
window (plain causal attention).
"""

from __future__ import annotations

from jaxllm.layers.attention import ATTENTION_KINDS, AttentionKind, Tokens, not_after, same_document


def sliding_window_mask(q: Tokens, k: Tokens, cfg):
    mask_BLS = same_document(q, k) & not_after(q, k)
    if cfg.window > 0:
        mask_BLS = mask_BLS & (q.index[:, :, None] - k.index[:, None, :] < cfg.window)
    return mask_BLS


ATTENTION_KINDS.register("sliding_window", AttentionKind(sliding_window_mask, causal=True))
