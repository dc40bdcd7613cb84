"""Dataset versions: diversity statistics, plots, the Alpaca-format export and the persisted dedupe pool."""

from __future__ import annotations

import json

from pipeline.config import load_config
from pipeline.curate.fastdedupe import load_pool, save_pool
from pipeline.curate.stats import diversity_stats, leading_verb, plot_stats
from pipeline.evaluate import load_eval_set
from pipeline.records import Record
from pipeline.stages import curate_stage
from pipeline.store import Run, load_records, save_records


def rec(instruction: str, output: str = "An answer of a few words.", input: str = "") -> Record:
    return Record(instruction=instruction, input=input, output=output)


def test_diversity_stats_numbers():
    seeds = ["Give three tips for staying healthy.", "Translate the sentence into French."]
    records = [rec("Give three tips for staying healthy."),                     # ROUGE-L 1.0 to a seed
               rec("Write a limerick about a cat.", output="one two three"),    # 0.0 to both seeds
               rec("Translate the sentence into German.", input="Good morning, everyone.")]
    stats = diversity_stats(records, seeds)
    hist = stats["rouge_l_to_nearest_seed"]["histogram"]
    assert sum(hist) == 3 and hist[0] == 1 and hist[-1] == 1 and hist[8] == 1  # 0.8 for the German one
    assert stats["lengths_words"]["instruction"]["count"] == 3
    assert stats["lengths_words"]["output"]["mean"] == 5.0  # 6, 3 and 6 words
    assert stats["lengths_words"]["input"]["count"] == 1 and stats["inputs_nonempty"] == 1
    assert dict(stats["leading_verbs"]) == {"give": 1, "write": 1, "translate": 1}
    assert leading_verb("  \"Classify\" the following.") == "classify"


def test_plots_are_pngs(tmp_path):
    stats = diversity_stats([rec("Write a poem about rain."), rec("Explain gravity to a child.")],
                            ["Write a story about snow."])
    written = plot_stats(stats, tmp_path)
    assert {p.name for p in written} == {"rouge_to_seeds.png", "lengths.png", "leading_verbs.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_pool_round_trip(tmp_path):
    texts = ["Give three tips.", "Name a planet — any planet.", "Ünïcode stays as it is"]
    save_pool(tmp_path / "pool.npz", texts, 0.7)
    assert load_pool(tmp_path / "pool.npz") == texts


def test_curate_stage_writes_a_dataset_version_and_the_next_version_dedupes_against_it(tmp_path):
    cfg = load_config(profile="cpu-demo", overrides=[f"runs_dir={tmp_path / 'runs'}"])
    eval_item = load_eval_set(cfg.evaluate.eval_set)[0]
    generated = [rec("Explain why the sky looks blue during the day."),
                 rec("Explain why the sky looks blue during the day time."),            # near duplicate
                 rec(eval_item.instruction, input=eval_item.input),                      # planted eval item
                 rec("Suggest a name for a bakery that sells only bread.")]
    run = Run.create(cfg, "v1")
    save_records(run.path("generated.parquet"), generated)
    manifest = curate_stage(run)
    folder = run.path("datasets", "curated")
    assert manifest["accepted"] == 2 and manifest["stage_counts"]["near_duplicates"] == 1
    assert manifest["stage_counts"]["decontamination"] == 1
    assert manifest["decontamination"]["examples"][0]["instruction"] == eval_item.instruction
    assert sum(manifest["diversity"]["rouge_l_to_nearest_seed"]["histogram"]) == 2
    for name in ("accepted.parquet", "rejected.parquet", "accepted.alpaca.jsonl", "near_dup_pool.npz",
                 "rouge_to_seeds.png", "lengths.png", "leading_verbs.png"):
        assert (folder / name).exists(), name
    alpaca = [json.loads(line) for line in (folder / "accepted.alpaca.jsonl").read_text().splitlines()]
    assert alpaca[0] == {"instruction": generated[0].instruction, "input": "", "output": generated[0].output}
    assert len(load_pool(folder / "near_dup_pool.npz")) == 175 + 2  # seeds + accepted
    reasons = [r.reject_reason for r in load_records(folder / "rejected.parquet")]
    assert sorted(reasons) == ["contaminated", "near_duplicate"]

    # Version 2 sees new data plus a repeat of version 1's accepted instruction: only the new one stays.
    cfg2 = cfg.model_copy(deep=True)
    cfg2.curate.prior_datasets = [folder]
    run2 = Run.create(cfg2, "v2")
    save_records(run2.path("generated.parquet"), [rec("Explain why the sky looks so blue during the day."),
                                                   rec("List four uses of baking soda around the house.")])
    manifest2 = curate_stage(run2)
    assert manifest2["accepted"] == 1 and manifest2["parents"] == [str(folder)]
    assert len(load_pool(run2.path("datasets", "curated", "near_dup_pool.npz"))) == 175 + 2 + 1
