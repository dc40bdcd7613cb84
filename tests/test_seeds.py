import json

import pytest

from pipeline import DATA_DIR
from pipeline.errors import InputFileError
from pipeline.generate.seeds import load_seed_tasks


def test_shipped_seed_tasks_load():
    tasks = load_seed_tasks(DATA_DIR / "self_instruct_seed_tasks.jsonl")
    assert len(tasks) == 175
    assert sum(t.is_classification for t in tasks) > 0
    assert all(t.instruction for t in tasks)


def test_malformed_line_is_named(tmp_path):
    p = tmp_path / "seeds.jsonl"
    good = json.dumps({"id": "a", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]})
    p.write_text(good + "\n{not json\n")
    with pytest.raises(InputFileError, match=r"line 2"):
        load_seed_tasks(p)


def test_wrong_field_type_is_named(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text(json.dumps({"id": "a", "instruction": 5}) + "\n")
    with pytest.raises(InputFileError, match=r"line 1: field 'instruction'"):
        load_seed_tasks(p)


def test_invalid_utf8_is_named(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_bytes(json.dumps({"id": "a", "instruction": "ok"}).encode() + b"\n" + b'{"instruction": "\xff\xfe"}\n')
    with pytest.raises(InputFileError, match=r"line 2: invalid UTF-8"):
        load_seed_tasks(p)


def test_empty_file(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text("\n\n")
    with pytest.raises(InputFileError, match="no tasks"):
        load_seed_tasks(p)
