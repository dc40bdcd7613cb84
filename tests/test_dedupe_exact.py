"""Our near-duplicate filters take Alpaca's decisions bit for bit.

The reference is a transcription of the filter in Alpaca's generate_instruction.py: tokenize with
rouge_score's tokenizer, score the new instruction with `rouge_scorer._score_lcs` against every kept one
(seeds included), drop it when the highest F is above 0.7, else add it to the kept list. Single process
(Alpaca used a Pool only for speed; the scores are the same).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from rouge_score import rouge_scorer

from pipeline.curate.fastdedupe import NearDuplicateIndex, dedupe_texts, max_rouge_to, rouge_l, rouge_token_list
from pipeline.curate.synthetic import alpaca_records, near_duplicate_of, synthetic_instructions
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def alpaca_loop(texts: list[str], seeds: list[str], threshold: float = 0.7, bag_bound: bool = False) -> list[bool]:
    """Alpaca's keep/drop decisions. bag_bound=True skips `_score_lcs` for a pair whose shared-token count
    (a multiset intersection, which is >= the LCS) already caps F at the threshold: same decisions, since
    such a pair cannot exceed it, in a fraction of the time."""
    kept_tokens = [SCORER._tokenizer.tokenize(s) for s in seeds]
    kept_bags = [Counter(t) for t in kept_tokens]
    decisions = []
    for text in texts:
        tokens = SCORER._tokenizer.tokenize(text)
        bag = Counter(tokens)
        scores = [0.0]
        n = len(tokens)
        for other, other_bag in zip(kept_tokens, kept_bags):
            if bag_bound and (2 * min(n, len(other)) <= threshold * (n + len(other))
                              or 2 * sum((bag & other_bag).values()) <= threshold * (n + len(other))):
                continue
            scores.append(rouge_scorer._score_lcs(tokens, other).fmeasure)
        keep = max(scores) <= threshold
        decisions.append(keep)
        if keep:
            kept_tokens.append(tokens)
            kept_bags.append(bag)
    return decisions


def incremental_index(texts: list[str], seeds: list[str], threshold: float = 0.7) -> list[bool]:
    index = NearDuplicateIndex(threshold, vocabulary_hint=seeds + texts)
    for s in seeds:
        index.add(s)
    return [index.check_and_add(t).kept for t in texts]


@pytest.fixture(scope="module")
def alpaca_instructions() -> list[str]:
    return [r["instruction"] for r in alpaca_records()]


@pytest.fixture(scope="module")
def planted_2000(alpaca_instructions):
    """175 seeds, then ~2,000 instructions of which ~20% are planted near-duplicates of earlier ones."""
    seeds = alpaca_instructions[:175]
    texts, planted = synthetic_instructions(alpaca_instructions[175:], 2000, dup_fraction=0.2, seed=7)
    # Near-duplicates of seeds too, since seeds count as kept.
    rng = random.Random(3)
    for _ in range(40):
        texts.insert(rng.randrange(len(texts)), near_duplicate_of(rng.choice(seeds), rng))
    return seeds, texts, planted


def test_compiled_index_matches_alpaca_loop_on_2000(planted_2000):
    seeds, texts, planted = planted_2000
    reference = alpaca_loop(texts, seeds, bag_bound=True)
    fast = dedupe_texts(texts, seeds)
    assert list(fast.kept[len(seeds):]) == reference
    assert list(fast.kept[:len(seeds)]) == [True] * len(seeds)
    assert incremental_index(texts, seeds) == reference
    assert reference.count(False) > 300  # the planted near-duplicates really are there to catch


def test_bag_bound_reference_equals_plain_transcription(alpaca_instructions):
    # The shortcut in the 2,000 test is itself checked against the plain loop on a smaller set.
    seeds = alpaca_instructions[:30]
    texts, _ = synthetic_instructions(alpaca_instructions[30:], 250, dup_fraction=0.3, seed=1)
    plain = alpaca_loop(texts, seeds)
    assert alpaca_loop(texts, seeds, bag_bound=True) == plain
    assert list(dedupe_texts(texts, seeds).kept[len(seeds):]) == plain
    assert plain.count(False) > 40


@pytest.mark.slow
def test_compiled_index_matches_plain_alpaca_loop_on_2000(planted_2000):
    seeds, texts, _ = planted_2000
    assert list(dedupe_texts(texts, seeds).kept[len(seeds):]) == alpaca_loop(texts, seeds)


def test_other_thresholds_and_no_seeds(alpaca_instructions):
    texts, _ = synthetic_instructions(alpaca_instructions, 600, dup_fraction=0.25, seed=5)
    for threshold in (0.5, 0.9, 1.0):
        reference = alpaca_loop(texts, [], threshold, bag_bound=True)
        assert list(dedupe_texts(texts, [], threshold).kept) == reference, threshold


def test_long_texts_use_the_dp_fallback_exactly(alpaca_instructions):
    # Texts past 64 tokens do not fit one machine word; they take the plain DP path.
    rng = random.Random(11)
    longs = [" ".join(rng.sample(alpaca_instructions, 6)) for _ in range(60)]
    texts = []
    for t in longs:
        texts.append(t)
        if rng.random() < 0.5:
            texts.append(near_duplicate_of(t, rng))
    assert max(len(rouge_token_list(t)) for t in texts) > 64
    reference = alpaca_loop(texts, [])
    assert list(dedupe_texts(texts).kept) == reference
    assert reference.count(False) > 10


def test_scores_exactly_at_the_threshold():
    # 2·LCS/(|a|+|b|) == 0.7 exactly as a fraction; the float F may land either side of 0.7, and we must
    # land on the same side as rouge_score.
    words = [f"w{i}" for i in range(40)]
    cases = []
    for la, lb, lcs in ((10, 10, 7), (8, 12, 7), (9, 11, 7), (20, 20, 14), (16, 24, 14), (3, 7, 3.5)):
        if lcs != int(lcs):
            continue
        a = words[:la]
        b = words[:lcs] + [f"x{j}" for j in range(lb - lcs)]
        cases.append((" ".join(b), " ".join(a)))  # kept first, then the candidate
    for kept, candidate in cases:
        expected = rouge_scorer._score_lcs(rouge_token_list(candidate), rouge_token_list(kept)).fmeasure <= 0.7
        assert bool(dedupe_texts([candidate], [kept]).kept[1]) == expected
        assert incremental_index([candidate], [kept]) == [expected]


@pytest.mark.parametrize("text", [
    "Write a poem about İstanbul's cafés!", "What is 2+2? Answer: 4.", "  spaces\tand\nnewlines  ", "",
    "naïve façade — em-dash", "UPPER lower MiXeD 123abc", "emoji 🙂 here", "under_score and-hyphen",
])
def test_tokenizer_is_rouge_scores(text):
    assert rouge_token_list(text) == SCORER._tokenizer.tokenize(text)


def test_tokenizer_matches_on_all_alpaca_instructions(alpaca_instructions):
    assert all(rouge_token_list(t) == SCORER._tokenizer.tokenize(t) for t in alpaca_instructions)


def test_nearest_and_score_of_a_dropped_text_are_the_true_maximum(alpaca_instructions):
    texts, _ = synthetic_instructions(alpaca_instructions, 500, dup_fraction=0.3, seed=2)
    res = dedupe_texts(texts)
    tokens = [rouge_token_list(t) for t in texts]
    checked = 0
    for i in range(len(texts)):
        if res.kept[i]:
            continue
        kept_before = [c for c in range(i) if res.kept[c]]
        scores = [rouge_scorer._score_lcs(tokens[i], tokens[c]).fmeasure for c in kept_before]
        assert res.score[i] == max(scores)
        assert res.nearest[i] == kept_before[scores.index(max(scores))]
        checked += 1
    assert checked > 50


def test_max_rouge_to_refs(alpaca_instructions):
    refs, texts = alpaca_instructions[:20], alpaca_instructions[20:80] + [alpaca_instructions[3]]
    best = max_rouge_to(texts, refs)
    for t, b in zip(texts, best):
        assert b == max(rouge_scorer._score_lcs(rouge_token_list(t), rouge_token_list(r)).fmeasure for r in refs)
    assert best[-1] == 1.0


def test_incremental_index_matches_alpaca_loop_across_rebuilds(alpaca_instructions):
    # The generation loop's index adds texts one at a time; with a short tail its frozen part is rebuilt many
    # times over 400 texts, and every decision, nearest text and score must stay Alpaca's.
    seeds = alpaca_instructions[:50]
    texts, _ = synthetic_instructions(alpaca_instructions[50:], 400, dup_fraction=0.3, seed=4)
    index = NearDuplicateIndex(0.7, vocabulary_hint=seeds[:10], min_tail=16)  # most tokens arrive after the hint
    for s in seeds:
        index.add(s)
    verdicts = [index.check_and_add(t) for t in texts]
    assert [v.kept for v in verdicts] == alpaca_loop(texts, seeds, bag_bound=True)
    whole = dedupe_texts(texts, seeds)
    for j, v in enumerate(verdicts):
        if not v.kept:
            assert index.texts[v.nearest] == (seeds + texts)[whole.nearest[len(seeds) + j]]
            assert v.score == whole.score[len(seeds) + j]


def test_rouge_l_is_rouge_scores():
    pairs = [("Give three tips for staying healthy.", "Give me three tips for staying healthy!"),
             ("a b c d e f", "f e d c b a"), ("", "anything"), ("word " * 80, "word " * 70 + "other")]
    for a, b in pairs:
        expected = rouge_scorer._score_lcs(rouge_token_list(a), rouge_token_list(b)).fmeasure if a.strip() else 0.0
        assert rouge_l(a, b) == expected


def test_signature_bound_never_hides_a_near_duplicate():
    # The per-posting signature bound (64 bits for all of a text's (word, k-th occurrence) elements) skips the
    # LCS of most candidates. Adversarial for it: a six-word vocabulary, so words repeat within a text, signature
    # bits collide and long texts fill all 64 bits; lengths from 1 to 90 tokens cross the 64-token LCS path.
    rng = random.Random(19)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    texts = []
    for _ in range(300):
        if texts and rng.random() < 0.4:
            texts.append(near_duplicate_of(rng.choice(texts), rng))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.choice((1, 3, 7, 12, 20, 40, 70, 90)))))
    for threshold in (0.7, 0.9):
        reference = alpaca_loop(texts, [], threshold, bag_bound=True)
        assert list(dedupe_texts(texts, [], threshold).kept) == reference, threshold
        assert incremental_index(texts, [], threshold) == reference, threshold
        assert 30 < reference.count(False) < 270  # both decisions are well represented
