"""Alpaca's near-duplicate rule over a whole list at once, with the hot loop compiled by numba.

Same decisions as Alpaca's quadratic loop, bit for bit: an instruction is dropped when its ROUGE-L F
(rouge_score's tokenizer and float formula) against any earlier kept one, seeds included, is above the
threshold. Three exact shortcuts make it fast:

- Prefix filtering: F > t needs an LCS (so a multiset overlap) above n·t/(2-t) tokens for either text of
  length n. With the (token, k-th occurrence) elements of every text sorted in one global order (rarest
  first), two texts with that much overlap share an element among their first n - need + 1 elements, so
  only texts whose prefixes share an element are ever scored. Lengths outside (n·r, n/r) are skipped too.
  Only kept texts are indexed (each joins the index when it is kept), so a scan never meets a dropped one.
- A 64-bit signature per text (one bit per (token, k-th occurrence) element) bounds a candidate's overlap,
  so its LCS, before the LCS is run. On a small vocabulary most candidates share one rare word and little
  else; without this bound their LCSs made the cost grow as N^2.
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


def _element_ids(ranks: np.ndarray, offsets: np.ndarray, ratio: float, vocab_size: int):
    """Per text its prefix elements (rarest first) as dense ids, and its element signature;
    returns (pre_off, pre_elem int32, n_elements, sig)."""
    pre_off, keys, sig = _prefix_keys(ranks, offsets, ratio, vocab_size)
    elems, inverse = np.unique(keys, return_inverse=True)
    del keys
    return pre_off, inverse.astype(np.int32), len(elems), sig


@njit(cache=True)
def _prefix_length(m, ratio):
    """Prefix elements a text of m tokens is indexed and probed with: any pair that can pass shares one of them."""
    if m == 0:
        return 0
    need = np.int64(np.floor(m * ratio)) + 1
    return max(1, m - need + 1)


@njit(cache=True)
def _element_bit(rank, k):
    # One of 64 bits per element (token rank, k-th occurrence of it); any fixed function keeps the bound exact.
    h = (np.uint64(rank) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(k) * np.uint64(0xC2B2AE3D27D4EB4F)
    return np.uint64(1) << (h >> np.uint64(58))


@njit(cache=True)
def _signature(seq):
    """64-bit signature of a text's elements (seq: its token ranks, sorted), for `_overlap_bound`."""
    sig = np.uint64(0)
    k = 0
    for j in range(seq.size):
        k = k + 1 if j > 0 and seq[j] == seq[j - 1] else 0
        sig |= _element_bit(seq[j], k)
    return sig


@njit(cache=True)
def _overlap_bound(sig_a, la, sig_b, lb):
    """An upper bound on the multiset overlap of two texts (so on their LCS) from their signatures.

    Every bit set in b but not in a comes from at least one element of b that a lacks, and distinct bits from
    distinct elements, so b shares at most lb - popcount(b & ~a) elements with a; the same from a's side.
    Exact whatever the hash; it prunes the many candidates that share one rare word and little else.
    """
    return min(lb - _popcount(sig_b & ~sig_a), la - _popcount(sig_a & ~sig_b))


@njit(cache=True)
def _prefix_keys(ranks, offsets, ratio, vocab_size):
    """Per text: its prefix elements as int64 keys (k-1)*V + rank, rarest first, and its signature."""
    n = offsets.size - 1
    plen = np.zeros(n, np.int64)
    for i in range(n):
        plen[i] = _prefix_length(offsets[i + 1] - offsets[i], ratio)
    pre_off = np.zeros(n + 1, np.int64)
    for i in range(n):
        pre_off[i + 1] = pre_off[i] + plen[i]
    keys = np.empty(pre_off[n], np.int64)
    sig = np.zeros(n, np.uint64)
    for i in range(n):
        seq = np.sort(ranks[offsets[i]:offsets[i + 1]])
        sig[i] = _signature(seq)
        k = 0
        for j in range(plen[i]):
            k = k + 1 if j > 0 and seq[j] == seq[j - 1] else 0
            keys[pre_off[i] + j] = np.int64(k) * vocab_size + seq[j]
    return pre_off, keys, sig


@njit(cache=True)
def _build_groups(offsets, pre_off, pre_elem, n_elements):
    """The index's layout: postings grouped by (element, text length, element's position in its text).

    Groups of an element are sorted by length, then position, so the length and positional filters skip whole
    groups. Each group gets room for every text that could join it; `slot_group[j]` is the group prefix
    element j (in pre_off order) joins when its text is kept. Postings are written only then (`_add_kept`),
    in text order, so a scan never meets a dropped text.
    """
    n = offsets.size - 1
    m = pre_elem.size
    # Counting sort of the prefix slots by element, then a stable sort by (length, position) within each.
    start = np.zeros(n_elements + 1, np.int64)
    for j in range(m):
        start[pre_elem[j] + 1] += 1
    for e in range(n_elements):
        start[e + 1] += start[e]
    fill = start[:-1].copy()
    slot = np.empty(m, np.int64)
    key = np.empty(m, np.int64)  # text length, then position, as one sortable number
    for i in range(n):
        length = offsets[i + 1] - offsets[i]
        for j in range(pre_off[i], pre_off[i + 1]):
            q = fill[pre_elem[j]]
            fill[pre_elem[j]] += 1
            slot[q] = j
            key[q] = (np.int64(length) << 32) + (j - pre_off[i])
    n_groups = 0
    for e in range(n_elements):
        a, b = start[e], start[e + 1]
        if b - a > 1:
            order = np.argsort(key[a:b])
            slot[a:b] = slot[a:b][order]
            key[a:b] = key[a:b][order]
        for q in range(a, b):
            if q == a or key[q] != key[q - 1]:
                n_groups += 1
    grp_off = np.empty(n_elements + 1, np.int64)
    grp_len = np.empty(n_groups, np.int32)
    grp_pos = np.empty(n_groups, np.int32)
    grp_start = np.empty(n_groups + 1, np.int64)
    slot_group = np.empty(m, np.int32)
    g = -1
    for e in range(n_elements):
        grp_off[e] = g + 1
        a, b = start[e], start[e + 1]
        for q in range(a, b):
            if q == a or key[q] != key[q - 1]:
                g += 1
                grp_len[g] = key[q] >> 32
                grp_pos[g] = key[q] & 0xFFFFFFFF
                grp_start[g] = q
            slot_group[slot[q]] = g
    grp_off[n_elements] = n_groups
    grp_start[n_groups] = m
    return grp_off, grp_len, grp_pos, grp_start, slot_group


@njit(cache=True)
def _add_kept(i, pre_off, slot_group, grp_start, grp_fill, post_ids, post_sig, sig):
    """Append kept text i to the groups of its prefix elements (texts are kept in order: groups stay sorted)."""
    for j in range(pre_off[i], pre_off[i + 1]):
        g = slot_group[j]
        q = grp_fill[g]
        grp_fill[g] = q + 1
        post_ids[q] = i
        post_sig[q] = sig[i]


@njit(cache=True)
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True)
def _set_masks(tok, a0, a1, masks):
    """Bit j of masks[t] says token j of text a is t (bit-parallel LCS, texts of up to 64 tokens)."""
    if a1 - a0 <= 64:
        for j in range(a1 - a0):
            masks[tok[a0 + j]] |= np.uint64(1) << np.uint64(j)


@njit(cache=True)
def _clear_masks(tok, a0, a1, masks):
    if a1 - a0 <= 64:
        for j in range(a1 - a0):
            masks[tok[a0 + j]] = np.uint64(0)


@njit(cache=True)
def _lcs(tok, a0, a1, tok_b, b0, b1, masks, row):
    """LCS length of text a (tok[a0:a1]) and text b (tok_b[b0:b1]): the project's one LCS.

    Up to 64 tokens in a, one 64-bit word holds a DP row (Hyyrö 2004; masks set by `_set_masks` for a), so a
    pair costs a few logic ops per token of b; longer texts take the plain two-row DP.
    """
    la = a1 - a0
    if la <= 64:
        v = ~np.uint64(0)
        for j in range(b0, b1):
            u = v & masks[tok_b[j]]
            v = (v + u) | (v - u)
        low = ~np.uint64(0) if la == 64 else (np.uint64(1) << np.uint64(la)) - np.uint64(1)
        return la - _popcount(v & low)
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
def _best_match(tok, a0, a1, sig_a, q_pre_elem, c_lo, tok_c, off_c, grp_off, grp_len, grp_pos, grp_start, grp_fill,
                post_ids, post_sig, tslack, ratio, masks, row):
    """Best ROUGE-L F of text a (tok[a0:a1], signature sig_a, prefix elements q_pre_elem) against the indexed
    texts c >= c_lo (tokens tok_c[off_c[c]:off_c[c+1]]): (index or -1, score).

    Filters, each exact (it skips only pairs whose F cannot pass the threshold): length and position per group
    (groups of an element are sorted by length, then position), then the signatures' overlap bound per
    posting, read in order beside the posting; only what is left costs an LCS. A text met through several
    elements is bounded again, which costs less than remembering it.
    """
    la = a1 - a0
    best = -1
    best_s = 0.0
    if la == 0:  # rouge_score scores an empty text 0 against everything
        return best, best_s
    _set_masks(tok, a0, a1, masks)
    best_num, best_den = 0, 1  # best_s as the rational 2*best_num/best_den (both sides halved below)
    lo = np.int32(np.floor(la * ratio))  # candidates are longer than la*ratio ...
    hi = la / ratio  # ... and shorter than la/ratio
    for p in range(q_pre_elem.size):
        e = q_pre_elem[p]
        if e < 0:
            continue  # an element no indexed text has
        left_q = la - p  # query elements from this one on
        g_end = grp_off[e + 1]
        g = grp_off[e] + np.searchsorted(grp_len[grp_off[e]:g_end], lo, side="right")
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
            # Postings are in text order; c_lo > 0 (texts of the current batch) wants only the tail.
            q_start, q_end = grp_start[g], grp_fill[g]
            if c_lo > 0:
                q = q_end
                while q > q_start and post_ids[q - 1] >= c_lo:
                    q -= 1
                q_start = q
            for q in range(q_start, q_end):
                ub = _overlap_bound(sig_a, la, post_sig[q], lb)
                # F is 2*lcs/(la+lb) up to rounding, so a bound below `need`, or clearly below the best so far
                # (by more than any rounding), rules the pair out before its LCS.
                if ub < need or ub * best_den < best_num * (la + lb) - 1:
                    continue
                c = post_ids[q]
                lcs = _lcs(tok, a0, a1, tok_c, off_c[c], off_c[c] + lb, masks, row)
                if lcs * best_den < best_num * (la + lb) - 1 or lcs == 0:
                    continue  # the exact float formula and its three divisions are skipped too
                sc = _rouge_f(lcs, la, lb)
                if sc > best_s or (sc == best_s and best >= 0 and c < best):
                    best_s = sc
                    best = c
                    best_num, best_den = lcs, la + lb
            g += 1
    _clear_masks(tok, a0, a1, masks)
    return best, best_s


@njit(cache=True, parallel=True)
def _dedupe_kernel(tok, offsets, sig, pre_off, pre_elem, grp_off, grp_len, grp_pos, grp_start, slot_group,
                   n_kept_first, threshold, ratio, vocab_size, n_workers, batch):
    """Alpaca's loop over the texts, the first n_kept_first texts (seeds) counted as kept.

    Texts go in batches: first every text of a batch is scored against the texts kept before the batch,
    in parallel; then, in order, against the earlier kept texts of its own batch. Each decision therefore sees
    exactly the kept set Alpaca's sequential loop would. A kept text joins the index as it is kept.
    """
    n = offsets.size - 1
    kept = np.zeros(n, np.bool_)
    nearest = np.full(n, -1, np.int32)
    score = np.zeros(n, np.float64)
    grp_fill = grp_start[:-1].copy()
    post_ids = np.empty(pre_elem.size, np.int32)
    post_sig = np.empty(pre_elem.size, np.uint64)
    masks = np.zeros((n_workers, vocab_size), np.uint64)
    maxlen = 1
    for i in range(n):
        maxlen = max(maxlen, offsets[i + 1] - offsets[i])
    rows = np.zeros((n_workers, maxlen + 1), np.int64)
    tslack = threshold - 1e-9
    first = min(n_kept_first, n)
    for i in range(first):
        kept[i] = True
        _add_kept(i, pre_off, slot_group, grp_start, grp_fill, post_ids, post_sig, sig)
    for s in range(first, n, batch):
        e = min(s + batch, n)
        # Worker w takes texts s+w, s+w+W, ...: neighbours cost about the same, so the load evens out.
        for w in prange(n_workers):
            for i in range(s + w, e, n_workers):
                b, bs = _best_match(tok, offsets[i], offsets[i + 1], sig[i], pre_elem[pre_off[i]:pre_off[i + 1]], 0,
                                    tok, offsets, grp_off, grp_len, grp_pos, grp_start, grp_fill, post_ids, post_sig,
                                    tslack, ratio, masks[w], rows[w])
                nearest[i] = b
                score[i] = bs
        for i in range(s, e):
            b, bs = _best_match(tok, offsets[i], offsets[i + 1], sig[i], pre_elem[pre_off[i]:pre_off[i + 1]], s,
                                tok, offsets, grp_off, grp_len, grp_pos, grp_start, grp_fill, post_ids, post_sig,
                                tslack, ratio, masks[0], rows[0])
            if bs > score[i]:  # ties keep the earlier text, from before the batch
                nearest[i] = b
                score[i] = bs
            kept[i] = not (score[i] > threshold)
            if kept[i]:
                _add_kept(i, pre_off, slot_group, grp_start, grp_fill, post_ids, post_sig, sig)
    return kept, nearest, score


# numba's default (workqueue) threading layer aborts the process if two Python threads launch parallel
# kernels at once (Prefect may run tasks in threads), so kernel launches take turns.
_KERNEL_LOCK = threading.Lock()


@dataclass
class Verdict:
    """One decision of the incremental index: kept or not, the best-scoring kept text (pool index), its F."""
    kept: bool
    nearest: int | None
    score: float


@dataclass
class DedupeResult:
    """Per text (seeds first): kept flag, index of the best-scoring kept text found (-1: none), its score.

    For dropped texts `nearest`/`score` are the true maximum over every kept text (ties: the earliest);
    for kept texts they cover only the texts the index scored, all of which are at or below the threshold.
    """
    kept: np.ndarray
    nearest: np.ndarray
    score: np.ndarray


def _frequency_ranks(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The global element order, rarest token first (ties by id): (ranks of `tokens`, rank of each token id)."""
    counts = np.bincount(tokens, minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), counts))
    rank_of = np.empty(vocab_size, np.int32)
    rank_of[order] = np.arange(vocab_size, dtype=np.int32)
    return rank_of[tokens], rank_of


def _workers(workers: int | None) -> int:
    import numba

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(workers or cores, numba.config.NUMBA_NUM_THREADS))


def dedupe_encoded(enc: Encoded, n_kept_first: int = 0, threshold: float = 0.7,
                   workers: int | None = None, batch: int = 2048) -> DedupeResult:
    """Alpaca's decisions for encoded texts in order; the first `n_kept_first` count as kept already.

    `workers` threads (default: the cores this process may use, at most numba's thread count) score each
    batch against the earlier kept texts in parallel; decisions do not depend on either setting.
    """
    workers = _workers(workers)
    ratio = slack_ratio(threshold)
    vocab_size = max(len(enc.vocab), int(enc.tokens.max()) + 1 if enc.tokens.size else 1)
    ranks, _ = _frequency_ranks(enc.tokens, vocab_size)
    pre_off, pre_elem, n_elements, sig = _element_ids(ranks, enc.offsets, ratio, vocab_size)
    grp_off, grp_len, grp_pos, grp_start, slot_group = _build_groups(enc.offsets, pre_off, pre_elem, n_elements)
    with _KERNEL_LOCK:
        kept, nearest, score = _dedupe_kernel(ranks, enc.offsets, sig, pre_off, pre_elem, grp_off, grp_len, grp_pos,
                                              grp_start, slot_group, n_kept_first, float(threshold), ratio,
                                              vocab_size, workers, batch)
    return DedupeResult(kept, nearest, score)


def dedupe_texts(texts: Sequence[str], seeds: Sequence[str] = (), threshold: float = 0.7) -> DedupeResult:
    """Alpaca's decisions for `texts` in order with `seeds` counted as kept; arrays cover seeds + texts."""
    enc = encode(list(seeds) + list(texts))
    return dedupe_encoded(enc, len(seeds), threshold)


@njit(cache=True)
def _max_rouge_against(tok, offsets, n_refs, vocab_size):
    """For each text after the first n_refs: its best ROUGE-L F against the first n_refs texts."""
    n = offsets.size - 1
    best = np.zeros(max(n - n_refs, 0), np.float64)
    maxlen = 1
    for i in range(n):
        maxlen = max(maxlen, offsets[i + 1] - offsets[i])
    row = np.zeros(maxlen + 1, np.int64)
    masks = np.zeros(vocab_size, np.uint64)
    for i in range(n_refs, n):
        a0, a1 = offsets[i], offsets[i + 1]
        _set_masks(tok, a0, a1, masks)
        for c in range(n_refs):
            b0, b1 = offsets[c], offsets[c + 1]
            if a1 > a0 and b1 > b0:
                s = _rouge_f(_lcs(tok, a0, a1, tok, b0, b1, masks, row), a1 - a0, b1 - b0)
                if s > best[i - n_refs]:
                    best[i - n_refs] = s
        _clear_masks(tok, a0, a1, masks)
    return best


def max_rouge_to(texts: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """Each text's highest ROUGE-L F against any of `refs` (Self-Instruct's overlap-with-seeds statistic)."""
    enc = encode(list(refs) + list(texts))
    return _max_rouge_against(enc.tokens, enc.offsets, len(refs), max(len(enc.vocab), 1))


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F of two texts, as rouge_score computes it (same tokens, same float formula)."""
    enc = encode([target, prediction])
    return float(_max_rouge_against(enc.tokens, enc.offsets, 1, max(len(enc.vocab), 1))[0])


@njit(cache=True)
def _best_in_tail(tok, a0, a1, tail_tok, tail_off, ratio, masks, row):
    """Best ROUGE-L F of text a against each text of a short unindexed tail (ties: the earliest)."""
    la = a1 - a0
    best, best_s = -1, 0.0
    if la == 0:
        return best, best_s
    _set_masks(tok, a0, a1, masks)
    for c in range(tail_off.size - 1):
        b0, b1 = tail_off[c], tail_off[c + 1]
        lb = b1 - b0
        if lb == 0 or not (la * ratio < lb < la / ratio):  # the length filter: F cannot pass outside
            continue
        sc = _rouge_f(_lcs(tok, a0, a1, tail_tok, b0, b1, masks, row), la, lb)
        if sc > best_s:
            best_s, best = sc, c
    _clear_masks(tok, a0, a1, masks)
    return best, best_s


@njit(cache=True)
def _query_elements(ranks, ratio, elem_of_key, vocab_size):
    """Prefix elements of one text under the index's order, as the index's element ids (-1: not indexed),
    and its signature."""
    seq = np.sort(ranks)
    plen = _prefix_length(ranks.size, ratio)
    keys = np.empty(plen, np.int64)
    k = 0
    for j in range(plen):
        k = k + 1 if j > 0 and seq[j] == seq[j - 1] else 0
        keys[j] = np.int64(k) * vocab_size + seq[j]
    at = np.searchsorted(elem_of_key, keys)
    out = np.full(plen, -1, np.int64)
    for j in range(plen):
        # A token the index has never seen (rank >= vocab_size) matches no indexed text.
        if seq[j] < vocab_size and at[j] < elem_of_key.size and elem_of_key[at[j]] == keys[j]:
            out[j] = at[j]
    return out, _signature(seq)


@njit(cache=True)
def _index_all(pre_off, slot_group, grp_start, sig):
    """Postings of every text of a frozen index (all of them kept)."""
    grp_fill = grp_start[:-1].copy()
    post_ids = np.empty(pre_off[-1], np.int32)
    post_sig = np.empty(pre_off[-1], np.uint64)
    for i in range(pre_off.size - 1):
        _add_kept(i, pre_off, slot_group, grp_start, grp_fill, post_ids, post_sig, sig)
    return grp_fill, post_ids, post_sig


class NearDuplicateIndex:
    """Kept instructions, one at a time (the generation loop): Alpaca's rule through the same compiled index
    and LCS as the whole-list filter above.

    Kept texts sit in a frozen index plus a short tail scored directly; when the tail reaches a quarter of the
    index (at least `min_tail` texts) the index is rebuilt over everything, with the token order refreshed from the
    texts seen so far, so adding n texts costs O(n log n) rebuild work in all.
    """

    def __init__(self, threshold: float = 0.7, vocabulary_hint: Sequence[str] = (), min_tail: int = 256):
        self.threshold = threshold
        self.min_tail = min_tail
        self._ratio = slack_ratio(threshold)
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        encode(list(vocabulary_hint), self._vocab)  # token ids only; the order comes from the kept texts
        self._tokens: list[np.ndarray] = []  # token ids per kept text
        self._frozen = 0  # texts [0, _frozen) are in the index
        self._index = None

    def _encode(self, text: str) -> np.ndarray:
        return encode([text], self._vocab).tokens

    def _rebuild(self) -> None:
        n = len(self._tokens)
        vocab_size = max(len(self._vocab), 1)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([t.size for t in self._tokens], out=offsets[1:])
        tokens = np.concatenate(self._tokens) if n else np.zeros(0, np.int32)
        ranks, rank_of = _frequency_ranks(tokens, vocab_size)
        pre_off, keys, sig = _prefix_keys(ranks, offsets, self._ratio, vocab_size)
        elem_of_key, pre_elem = np.unique(keys, return_inverse=True)
        grp_off, grp_len, grp_pos, grp_start, slot_group = _build_groups(offsets, pre_off, pre_elem.astype(np.int32),
                                                                         len(elem_of_key))
        grp_fill, post_ids, post_sig = _index_all(pre_off, slot_group, grp_start, sig)
        groups = (grp_off, grp_len, grp_pos, grp_start, grp_fill, post_ids, post_sig)
        self._index = (vocab_size, rank_of, elem_of_key, ranks, offsets, groups)
        self._frozen = n

    def check(self, text: str) -> tuple[Verdict, np.ndarray]:
        """Best ROUGE-L F of `text` against every kept text; kept when it is at or below the threshold."""
        tokens = self._encode(text)
        if tokens.size == 0:
            return Verdict(True, None, 0.0), tokens
        best, best_s = -1, 0.0
        vocab_size = len(self._vocab)
        masks = np.zeros(vocab_size, np.uint64)
        # The DP row spans the candidate, which may be up to 1/ratio times longer than this text (a row sized
        # by this text alone let texts past 64 tokens write beyond it).
        row = np.zeros(int(tokens.size / self._ratio) + 2, np.int64)
        if self._index is not None and self._frozen:
            size, rank_of, elem_of_key, tok_c, off_c, groups = self._index
            # Tokens the index has never seen get ranks past its vocabulary: they match nothing in it.
            ranks = np.where(tokens < size, rank_of[np.minimum(tokens, size - 1)], size + tokens).astype(np.int32)
            masks = np.zeros(max(size, int(ranks.max()) + 1), np.uint64)
            elems, sig = _query_elements(ranks, self._ratio, elem_of_key, size)
            best, best_s = _best_match(ranks, 0, ranks.size, np.uint64(sig), elems, 0, tok_c, off_c, *groups,
                                       self.threshold - 1e-9, self._ratio, masks, row)
            masks = np.zeros(vocab_size, np.uint64)
        tail = self._tokens[self._frozen:]
        if tail:
            tail_off = np.zeros(len(tail) + 1, np.int64)
            np.cumsum([t.size for t in tail], out=tail_off[1:])
            b, bs = _best_in_tail(tokens, 0, tokens.size, np.concatenate(tail), tail_off, self._ratio, masks, row)
            if bs > best_s:
                best, best_s = self._frozen + b, bs
        verdict = Verdict(not (best_s > self.threshold), best if best >= 0 else None, best_s)
        return verdict, tokens

    def add(self, text: str, tokens: np.ndarray | None = None) -> int:
        """Add a kept text; returns its index in the pool."""
        self.texts.append(text)
        self._tokens.append(self._encode(text) if tokens is None else tokens)
        if len(self._tokens) - self._frozen >= max(self.min_tail, self._frozen // 4):
            self._rebuild()
        return len(self.texts) - 1

    def check_and_add(self, text: str) -> Verdict:
        """Alpaca's step: keep (and add) the text unless a kept text scores above the threshold."""
        verdict, tokens = self.check(text)
        if verdict.kept:
            self.add(text, tokens)
        return verdict


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
