"""Alpaca's near-duplicate rule over a whole list at once, with the hot loop compiled by numba.

Same decisions as Alpaca's quadratic loop, bit for bit: an instruction is dropped when its ROUGE-L F
(rouge_score's tokenizer and float formula) against any earlier kept one, seeds included, is above the
threshold. Two exact shortcuts make it fast:

- Prefix filtering: F > t needs an LCS (so a multiset overlap) above n·t/(2-t) tokens for either text of
  length n. With the (token, k-th occurrence) elements of every text sorted in one global order (rarest
  first), two texts with that much overlap share an element among their first n - need + 1 elements, so
  only texts whose prefixes share an element are ever scored. Lengths outside (n·r, n/r) are skipped too.
- Bit-parallel LCS (Hyyrö 2004): for texts of up to 64 tokens one 64-bit word holds a DP row, so an LCS
  costs one add, a few logic ops per token of the other text; longer texts fall back to the plain DP.

Texts are decided in batches: each text of a batch is scored against everything decided before the batch
on all cores, then in order against the earlier texts of its own batch, so every decision sees exactly the
kept set of the sequential loop.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import njit, prange

# rouge_score's tokenizer (no stemmer), same output: lowercase, non [a-z0-9] runs -> space, split.
# Tested against rouge_score itself on the Alpaca instructions.
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_token_list(text: str) -> list[str]:
    """Tokens exactly as rouge_score's default tokenizer gives them, about 3x faster."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def slack_ratio(threshold: float) -> float:
    # Slightly loose t/(2-t) so float rounding can never hide a true candidate.
    return (threshold - 1e-9) / (2 - threshold + 1e-9)


@dataclass
class Encoded:
    """Texts as token ids: tokens[offsets[i]:offsets[i+1]] is text i; vocab maps token -> id."""
    tokens: np.ndarray
    offsets: np.ndarray
    vocab: dict[str, int]


def encode(texts: Sequence[str], vocab: dict[str, int] | None = None) -> Encoded:
    """Tokenize with rouge_score's rules and map tokens to ids (the vocab grows as needed)."""
    vocab = {} if vocab is None else vocab
    get = vocab.setdefault
    lengths = np.empty(len(texts), np.int64)
    flat: list[int] = []
    extend = flat.extend
    for i, text in enumerate(texts):
        toks = _NON_ALNUM.sub(" ", text.lower()).split()
        lengths[i] = len(toks)
        extend([get(t, len(vocab)) for t in toks])
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(np.asarray(flat, dtype=np.int32), offsets, vocab)


@njit(cache=True)
def _prefix_keys(ranks, offsets, ratio, vocab_size):
    """Per text: its prefix elements as int64 keys (k-1)*V + rank, rarest first."""
    n = offsets.size - 1
    plen = np.zeros(n, np.int64)
    for i in range(n):
        m = offsets[i + 1] - offsets[i]
        if m > 0:
            need = np.int64(np.floor(m * ratio)) + 1
            plen[i] = max(1, m - need + 1)
    pre_off = np.zeros(n + 1, np.int64)
    for i in range(n):
        pre_off[i + 1] = pre_off[i] + plen[i]
    keys = np.empty(pre_off[n], np.int64)
    for i in range(n):
        seq = np.sort(ranks[offsets[i]:offsets[i + 1]])
        k = 0
        for j in range(plen[i]):
            if j > 0 and seq[j] == seq[j - 1]:
                k += 1
            else:
                k = 0
            keys[pre_off[i] + j] = np.int64(k) * vocab_size + seq[j]
    return pre_off, keys


@njit(cache=True)
def _gather(tok, offsets, ids, out_off):
    """The tokens of texts `ids`, one after another (out_off[k] is where text ids[k] starts)."""
    out = np.empty(out_off[-1], np.int32)
    for k in range(ids.size):
        c = ids[k]
        out[out_off[k]:out_off[k + 1]] = tok[offsets[c]:offsets[c + 1]]
    return out


@njit(cache=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True)
def _lcs_dp(tok, a0, a1, tok_b, b0, b1, row):
    """Plain two-row LCS DP, for texts longer than one machine word."""
    lb = b1 - b0
    for j in range(lb + 1):
        row[j] = 0
    for i in range(a0, a1):
        x = tok[i]
        diag = 0
        for j in range(lb):
            up = row[j + 1]
            if x == tok_b[b0 + j]:
                row[j + 1] = diag + 1
            elif row[j] > up:
                row[j + 1] = row[j]
            diag = up
    return row[lb]


@njit(cache=True)
def _rouge_f(lcs, len_target, len_prediction):
    # rouge_score: precision = lcs/len(prediction), recall = lcs/len(target), 2*p*r/(p+r); same float ops.
    if lcs == 0:
        return 0.0
    precision = lcs / len_prediction
    recall = lcs / len_target
    return 2 * precision * recall / (precision + recall)


@njit(cache=True)
def _best_match(i, c_lo, c_hi, tok, offsets, pre_off, pre_elem, grp_off, grp_len, grp_pos, grp_start, post_ids,
                post_tok, post_tok_off, kept, tslack, ratio, mark, masks, row):
    """Best ROUGE-L F of text i against the kept texts c with c_lo <= c < c_hi: (index or -1, score).

    Postings come in groups (element, text length, element's position in that text), each group in text
    order, so length and positional filters skip whole groups before any text is touched; each posting
    carries a copy of its text's tokens, so scoring reads memory in order.
    """
    a0, a1 = offsets[i], offsets[i + 1]
    la = a1 - a0
    best = -1
    best_s = 0.0
    if la == 0:  # rouge_score scores an empty text 0 against everything
        return best, best_s
    one = np.uint64(1)
    low = np.uint64(0)
    word = la <= 64
    if word:
        for j in range(la):
            masks[tok[a0 + j]] |= one << np.uint64(j)
        low = ~np.uint64(0) if la == 64 else (one << np.uint64(la)) - one
    lo = la * ratio
    hi = la / ratio
    for p in range(pre_off[i], pre_off[i + 1]):
        e = pre_elem[p]
        left_q = la - (p - pre_off[i])  # query elements from this one on
        # First group with a length above lo (groups of an element are sorted by length, then position).
        g, g_end = grp_off[e], grp_off[e + 1]
        while g < g_end:
            h = (g + g_end) // 2
            if grp_len[h] <= lo:
                g = h + 1
            else:
                g_end = h
        g_end = grp_off[e + 1]
        while g < g_end:
            lb = grp_len[g]
            if lb >= hi:
                break
            # The first shared element of a pair bounds its overlap by the elements left on either side
            # (positional filter, as in PPJoin); a later shared element only bounds it tighter.
            need = np.int64(np.floor(tslack * (la + lb) / 2)) + 1
            if left_q < need:
                break  # longer candidates need even more overlap
            if lb - grp_pos[g] < need:
                g += 1
                continue
            q, q_end = grp_start[g], grp_start[g + 1]
            if c_lo > 0:  # skip to the first text >= c_lo (the group is in text order)
                while q < q_end:
                    h = (q + q_end) // 2
                    if post_ids[h] < c_lo:
                        q = h + 1
                    else:
                        q_end = h
                q_end = grp_start[g + 1]
            for q in range(q, q_end):
                c = post_ids[q]
                if c >= c_hi:
                    break
                if mark[c] == i or not kept[c]:
                    continue
                mark[c] = i
                b0 = post_tok_off[q]
                b1 = b0 + lb
                if word:
                    v = ~np.uint64(0)
                    for j in range(b0, b1):
                        u = v & masks[post_tok[j]]
                        v = (v + u) | (v - u)
                    lcs = la - _popcount(v & low)
                else:
                    lcs = _lcs_dp(tok, a0, a1, post_tok, b0, b1, row)
                sc = _rouge_f(lcs, la, lb)
                if sc > best_s or (sc == best_s and best >= 0 and c < best):
                    best_s = sc
                    best = c
            g += 1
    if word:
        for j in range(la):
            masks[tok[a0 + j]] = np.uint64(0)
    return best, best_s


@njit(cache=True, parallel=True)
def _dedupe_kernel(tok, offsets, pre_off, pre_elem, grp_off, grp_len, grp_pos, grp_start, post_ids, post_tok,
                   post_tok_off, n_kept_first, threshold, ratio, vocab_size, start, n_workers, batch):
    """Alpaca's loop over texts[start:], the first n_kept_first texts (seeds) counted as kept.

    Texts go in batches: first every text of a batch is scored against the texts decided before the batch,
    in parallel; then, in order, against the earlier texts of its own batch. Each decision therefore sees
    exactly the kept set Alpaca's sequential loop would.
    """
    n = offsets.size - 1
    kept = np.zeros(n, np.bool_)
    nearest = np.full(n, -1, np.int64)
    score = np.zeros(n, np.float64)
    marks = np.full((n_workers, n), -1, np.int32)
    masks = np.zeros((n_workers, vocab_size), np.uint64)
    maxlen = 1
    for i in range(n):
        maxlen = max(maxlen, offsets[i + 1] - offsets[i])
    rows = np.zeros((n_workers, maxlen + 1), np.int64)
    tslack = threshold - 1e-9
    for i in range(min(n_kept_first, n)):
        kept[i] = True
    first = max(start, n_kept_first)
    for s in range(first, n, batch):
        e = min(s + batch, n)
        per = (e - s + n_workers - 1) // n_workers
        for w in prange(n_workers):
            for i in range(s + w * per, min(s + (w + 1) * per, e)):
                b, bs = _best_match(i, 0, s, tok, offsets, pre_off, pre_elem, grp_off, grp_len, grp_pos, grp_start,
                                    post_ids, post_tok, post_tok_off, kept, tslack, ratio, marks[w], masks[w], rows[w])
                nearest[i] = b
                score[i] = bs
        for i in range(s, e):
            b, bs = _best_match(i, s, i, tok, offsets, pre_off, pre_elem, grp_off, grp_len, grp_pos, grp_start,
                                post_ids, post_tok, post_tok_off, kept, tslack, ratio, marks[0], masks[0], rows[0])
            if bs > score[i]:  # ties keep the earlier text, from before the batch
                nearest[i] = b
                score[i] = bs
            kept[i] = not (score[i] > threshold)
    return kept, nearest, score


# numba's default (workqueue) threading layer aborts the process if two Python threads launch parallel
# kernels at once (Prefect may run tasks in threads), so kernel launches take turns.
_KERNEL_LOCK = threading.Lock()


@dataclass
class DedupeResult:
    """Per text (seeds first): kept flag, index of the best-scoring kept text found (-1: none), its score.

    For dropped texts `nearest`/`score` are the true maximum over every kept text (ties: the earliest);
    for kept texts they cover only the texts the index scored, all of which are at or below the threshold.
    """
    kept: np.ndarray
    nearest: np.ndarray
    score: np.ndarray


def dedupe_encoded(enc: Encoded, n_kept_first: int = 0, threshold: float = 0.7, start: int = 0,
                   workers: int | None = None, batch: int = 2048) -> DedupeResult:
    """Alpaca's decisions for encoded texts in order; the first `n_kept_first` count as kept already.

    `workers` threads (default: the cores this process may use, at most numba's thread count) score each
    batch against the earlier kept texts in parallel; decisions do not depend on either setting.
    """
    import numba

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(workers or cores, numba.config.NUMBA_NUM_THREADS))
    ratio = slack_ratio(threshold)
    vocab_size = max(len(enc.vocab), int(enc.tokens.max()) + 1 if enc.tokens.size else 1)
    # Global element order: rarest token first (ties by id), fixed for this call.
    counts = np.bincount(enc.tokens, minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), counts))
    rank_of = np.empty(vocab_size, np.int64)
    rank_of[order] = np.arange(vocab_size)
    ranks = rank_of[enc.tokens]
    pre_off, keys = _prefix_keys(ranks, enc.offsets, ratio, vocab_size)
    elems, pre_elem = np.unique(keys, return_inverse=True)
    # Postings grouped by (element, text length, position of the element in its text), each group in
    # text order.
    n = len(enc.offsets) - 1
    lengths = np.diff(enc.offsets)
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(pre_off))
    pos = np.arange(len(pre_elem), dtype=np.int64) - pre_off[owner]
    order = np.lexsort((owner, pos, lengths[owner], pre_elem))
    post_ids, e_s, l_s, p_s = owner[order], pre_elem[order], lengths[owner][order], pos[order]
    new_group = np.ones(len(order), bool)
    if len(order):
        new_group[1:] = (e_s[1:] != e_s[:-1]) | (l_s[1:] != l_s[:-1]) | (p_s[1:] != p_s[:-1])
    starts = np.flatnonzero(new_group)
    grp_start = np.append(starts, len(order)).astype(np.int64)
    grp_off = np.searchsorted(e_s[starts], np.arange(len(elems) + 1)).astype(np.int64)
    ranks32 = ranks.astype(np.int32)
    post_tok_off = np.zeros(len(order) + 1, np.int64)
    np.cumsum(l_s, out=post_tok_off[1:])
    post_tok = _gather(ranks32, enc.offsets, post_ids, post_tok_off)
    with _KERNEL_LOCK:
        kept, nearest, score = _dedupe_kernel(ranks32, enc.offsets, pre_off, pre_elem.astype(np.int64),
                                              grp_off, l_s[starts].astype(np.int64), p_s[starts].astype(np.int64),
                                              grp_start, post_ids, post_tok, post_tok_off, n_kept_first,
                                              float(threshold), ratio, vocab_size, start, workers, batch)
    return DedupeResult(kept, nearest, score)


def dedupe_texts(texts: Sequence[str], seeds: Sequence[str] = (), threshold: float = 0.7) -> DedupeResult:
    """Alpaca's decisions for `texts` in order with `seeds` counted as kept; arrays cover seeds + texts."""
    enc = encode(list(seeds) + list(texts))
    return dedupe_encoded(enc, len(seeds), threshold)


@njit(cache=True)
def _max_rouge_against(tok, offsets, n_refs):
    """For each text after the first n_refs: its best ROUGE-L F against the first n_refs texts."""
    n = offsets.size - 1
    best = np.zeros(max(n - n_refs, 0), np.float64)
    maxlen = 1
    for i in range(n):
        maxlen = max(maxlen, offsets[i + 1] - offsets[i])
    row = np.zeros(maxlen + 1, np.int64)
    for i in range(n_refs, n):
        a0, a1 = offsets[i], offsets[i + 1]
        for c in range(n_refs):
            b0, b1 = offsets[c], offsets[c + 1]
            if a1 > a0 and b1 > b0:
                s = _rouge_f(_lcs_dp(tok, a0, a1, tok, b0, b1, row), a1 - a0, b1 - b0)
                if s > best[i - n_refs]:
                    best[i - n_refs] = s
    return best


def max_rouge_to(texts: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """Each text's highest ROUGE-L F against any of `refs` (Self-Instruct's overlap-with-seeds statistic)."""
    enc = encode(list(refs) + list(texts))
    return _max_rouge_against(enc.tokens, enc.offsets, len(refs))


def save_pool(path, texts: Sequence[str], threshold: float) -> None:
    """Persist the kept instructions of a dataset version (seeds included), in the order they were kept.

    A later run counts them as kept before its own records, so new data is deduped against every earlier
    version without re-deduplicating the old data (re-tokenizing them takes about 6 s per million).
    """
    import io

    from pipeline.store import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, texts=np.array(list(texts), dtype=str), threshold=np.float64(threshold))
    atomic_write_bytes(path, buf.getvalue())


def load_pool(path) -> list[str]:
    """Kept instructions saved by `save_pool`, in the order they were kept."""
    with np.load(path, allow_pickle=False) as z:
        return [str(t) for t in z["texts"]]
