"""Held-out data stays held out: the seed tasks that are eval items never reach the teacher, and the gold
training data is decontaminated against every eval set like curated data."""

import json

from pipeline import DATA_DIR
from pipeline.config import load_config
from pipeline.curate.decontaminate import EvalOverlap
from pipeline.evaluate import load_eval_set
from pipeline.stages import eval_texts, generate_stage, gold_records
from pipeline.store import Run
from tests.conftest import fast_overrides
from tests.fakes.openai_server import FakeOpenAIServer, default_responder


def test_default_eval_sets_are_alpaca_dev_and_a_seed_slice_with_instances():
    cfg = load_config()
    assert [s.name for s in cfg.evaluate.eval_sets] == ["alpaca-dev", "self-instruct-heldout"]
    assert cfg.evaluate.gold_student
    items = load_eval_set(cfg.evaluate.eval_sets[1].path)
    seeds = {json.loads(line)["instruction"] for line in (DATA_DIR / "self_instruct_seed_tasks.jsonl").read_text().splitlines()}
    assert len(items) == 25 and all(it.instruction in seeds and it.reference for it in items)


def test_heldout_seed_tasks_are_never_shown_to_the_teacher(tmp_path):
    shown: list[str] = []

    def recording(body: dict) -> str:
        shown.append(json.dumps(body.get("prompt") or body.get("messages")))
        return default_responder(body)

    with FakeOpenAIServer(responder=recording) as server:
        # paper instances: the classification and instance prompts show seed tasks too
        cfg = load_config(profile="cpu-demo", overrides=fast_overrides(tmp_path / "runs", server.base_url)
                          + ["generate.instances=paper", "generate.max_prompts=6"])
        stats = generate_stage(Run.create(cfg, "g"))
    heldout = [it.instruction for it in load_eval_set(DATA_DIR / "self_instruct_heldout.jsonl")]
    sent = "\n".join(shown)
    assert stats["seeds_held_out"] == 25
    assert not [h for h in heldout if json.dumps(h)[1:-1] in sent]
    # the check can fail: other seed tasks do appear in these prompts, held-out ones would too
    others = [json.loads(line)["instruction"] for line in (DATA_DIR / "self_instruct_seed_tasks.jsonl").read_text().splitlines()]
    assert sum(json.dumps(o)[1:-1] in sent for o in others if o not in heldout) >= 10


def test_gold_training_set_is_decontaminated_against_every_eval_set(tmp_path):
    gold = [json.loads(line) for line in (DATA_DIR / "alpaca_gold_train.jsonl").read_text().splitlines()[:10]]
    # an extra eval set that (like a careless split would) contains two of the first gold records
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps({"instruction": g["instruction"], "input": g["input"], "output": "x"}) + "\n"
                               for g in (gold[1], gold[4])))
    cfg = load_config(overrides=[f"runs_dir={tmp_path}", "evaluate.eval_sets=[{name: dev, path: "
                                 f"{DATA_DIR / 'alpaca_dev.jsonl'}}}, {{name: planted, path: {planted}}}]"])
    kept, rejected = gold_records(7, cfg)
    assert len(kept) == 7 and all(r.source == "gold" and r.output for r in kept)
    assert [r.instruction for r in rejected] == [gold[1]["instruction"], gold[4]["instruction"]]
    assert all(r.reject_reason == "contaminated" for r in rejected)
    overlap = EvalOverlap(eval_texts(cfg), cfg.curate.decontaminate_ngram, cfg.curate.decontaminate_threshold)
    assert not any(overlap.is_contaminated(f"{r.instruction} {r.input}") for r in kept)
    # the first 7 clean records, in file order
    assert [r.instruction for r in kept] == [g["instruction"] for k, g in enumerate(gold) if k not in (1, 4)][:7]
