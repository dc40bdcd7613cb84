"""Training on a tiny real student (4 layers cut from the packaged SmolLM2): the loss mask, the preflight counts,
a missing chat template, resuming after an interrupted run, merged and full fine-tuned outputs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline.config import TrainConfig
from pipeline.errors import DistillError
from pipeline.models import resolve_student
from pipeline.records import Record
from pipeline.train import build_trainer, train_lora
from pipeline.train.prepare import to_prompt_completion
from tests.conftest import TINY_STUDENT_DROP


@pytest.fixture(scope="module")
def student():
    return resolve_student("embedded-cut", json.loads(TINY_STUDENT_DROP), "smollm2-135m-instruct")


def records(n: int = 4) -> list[Record]:
    base = [("Name a primary colour.", "", "Red is a primary colour."),
            ("Translate to French.", "good morning", "Bonjour."),
            ("Give a synonym of happy.", "", "Joyful."),
            ("Add the numbers.", "2 and 3", "2 + 3 = 5.")]
    return [Record(instruction=i, input=x, output=o, status="accepted") for i, x, o in (base * 2)[:n]]


def test_loss_mask_is_exactly_response_plus_end_of_turn(student, tmp_path):
    recs = records(2)
    trainer, report = build_trainer(student, recs, TrainConfig(max_length=128, max_steps=1, padding_free="off"), tmp_path)
    tok = trainer.processing_class
    row = to_prompt_completion(recs)[0]
    prompt_ids = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
    full_ids = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    end = full_ids.index(eot_id, len(prompt_ids)) + 1  # the response, then <|im_end|>; not the newline after it
    expected = [t if len(prompt_ids) <= i < end else -100 for i, t in enumerate(full_ids)]

    ex = next(e for e in trainer.train_dataset if e["record_index"] == 0)
    assert ex["input_ids"] == full_ids
    for i, (got, want) in enumerate(zip(ex["labels"], expected, strict=True)):
        assert got == want, f"token {i} ({tok.decode([full_ids[i]])!r}): label {got}, expected {want}"
    trained = [t for t in ex["labels"] if t != -100]
    assert tok.decode(trained[:-1]) == recs[0].output and trained[-1] == eot_id
    assert report.mask_ok and report.end_of_turn == "<|im_end|>"


def test_preflight_counts_truncated_examples(student, tmp_path):
    long_answer = Record(instruction="Describe the sea.", output="The sea is wide and deep. " * 60, status="accepted")
    long_prompt = Record(instruction="Summarise this text.", input="word " * 200, output="Short.", status="accepted")
    recs = records(2) + [long_answer, long_prompt]
    trainer, report = build_trainer(student, recs, TrainConfig(max_length=64, max_steps=1, padding_free="off"), tmp_path)
    assert (report.examples, report.truncated, report.truncated_responses_lost) == (4, 2, 1)
    assert report.max_tokens > 200
    # TRL truncates to max_length and drops the example whose response was cut away entirely.
    assert len(trainer.train_dataset) == 3
    assert all(len(e["input_ids"]) <= 64 for e in trainer.train_dataset)


def test_student_without_chat_template_is_refused(student, tmp_path):
    bare = tmp_path / "bare-student"
    shutil.copytree(student, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = bare / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    with pytest.raises(DistillError, match="no chat template"):
        train_lora(bare, records(), TrainConfig(max_steps=1), tmp_path / "out")
    # Declared in the config (student.chat_template), the template is used and the loss mask checks out.
    declared = tmp_path / "chatml.jinja"
    declared.write_text(AutoTokenizer.from_pretrained(str(student)).chat_template)
    _, report = build_trainer(bare, records(2), TrainConfig(max_steps=1), tmp_path / "out", chat_template=str(declared))
    assert report.mask_ok and report.end_of_turn == "<|im_end|>"


def test_interrupted_run_resumes_and_merges(student, tmp_path):
    recs = records(4)
    first = train_lora(student, recs, TrainConfig(max_steps=2, batch_size=2, max_length=64), tmp_path)
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    assert first["tokens_per_s"] and first["tokens_per_s"] > 0
    assert (tmp_path / "checkpoints" / "checkpoint-2").exists()
    # A second call in the same folder (as after a kill) continues from step 2 instead of starting over.
    second = train_lora(student, recs, TrainConfig(max_steps=4, batch_size=2, max_length=64, merge=True), tmp_path)
    assert second["resumed_from_step"] == 2 and second["steps"] == 4
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "training_curves.png").exists()
    steps = [h["step"] for h in json.loads((tmp_path / "train_log.json").read_text()) if "loss" in h]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_full_finetune_changes_every_layer(student, tmp_path):
    summary = train_lora(student, records(4), TrainConfig(finetune="full", max_steps=2, batch_size=2, max_length=64,
                                                          learning_rate=1e-4), tmp_path)
    assert summary["trainable_params"] == summary["params"] and "adapter" not in summary
    before, after = load_file(str(student / "model.safetensors")), load_file(str(tmp_path / "model" / "model.safetensors"))
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert any("layers.3." in k for k in changed) and any("layers.0." in k for k in changed)


def _batch_loss(trainer) -> float:
    """Mean response-token loss of the untrained student over every training row, in one collated batch."""
    rows = [{k: ex[k] for k in ex if k in ("input_ids", "completion_mask", "seq_lengths", "labels")}
            for ex in trainer.train_dataset]
    batch = trainer.data_collator(rows)
    model = trainer.model.float().eval()  # fp32 on every device: bf16 rounding would hide a small leak
    device = next(model.parameters()).device
    with torch.no_grad():
        inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "completion_mask"}
        return model(**inputs).loss.item()


def test_padding_free_batches_score_like_padded_ones(student, tmp_path):
    # Packed rows have no attention mask: only position_ids that restart per example. If the model attended across
    # example boundaries, the packed loss would differ from the padded one.
    recs = records(4)
    packed, _ = build_trainer(student, recs, TrainConfig(max_length=256, max_steps=1, padding_free="on"), tmp_path / "a")
    padded, _ = build_trainer(student, recs, TrainConfig(max_length=256, max_steps=1, padding_free="off"), tmp_path / "b")
    assert packed.args.padding_free and packed.args.packing and len(packed.train_dataset) < len(recs)
    assert not padded.args.padding_free and len(padded.train_dataset) == len(recs)
    assert sorted(_labelled_runs(packed)) == sorted(_labelled_runs(padded))  # same trained tokens, example by example
    assert _batch_loss(packed) == pytest.approx(_batch_loss(padded), rel=1e-4)


def _labelled_runs(trainer) -> list[tuple[int, ...]]:
    runs = []
    for ex in trainer.train_dataset:
        run = []
        for label in ex["labels"] + [-100]:
            if label != -100:
                run.append(label)
            elif run:
                runs.append(tuple(run))
                run = []
    return runs


def test_packed_preflight_skips_a_truncated_example(student, tmp_path):
    # Packing truncates an over-long example and puts it in a row of its own; the mask check must look past it.
    long_answer = Record(instruction="Describe the sea.", output="The sea is wide and deep. " * 60, status="accepted")
    trainer, report = build_trainer(student, [long_answer] + records(2),
                                    TrainConfig(max_length=64, max_steps=1, padding_free="on"), tmp_path)
    assert report.mask_ok and report.truncated == 1 and trainer.args.packing
