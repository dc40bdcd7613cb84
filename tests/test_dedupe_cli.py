"""`distill dedupe IN OUT` through the real command line, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import PROJECT_ROOT
from pipeline.curate.standalone import dedupe_file
from pipeline.errors import InputFileError

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "output": "Eat well.", "n": 1},
    {"instruction": "Give me three tips for staying healthy!", "output": "Sleep.", "n": 2},   # near dup of 1
    {"instruction": "Name the largest planet in the solar system.", "output": "Jupiter", "n": 3},
    {"instruction": "Name the largest ocean on planet Earth.", "output": "Pacific", "n": 4},
    {"instruction": "Give three tips for staying healthy", "output": "Walk.", "n": 5},        # near dup of 1
    {"instruction": "Translate 'thank you' into Spanish.", "output": "Gracias", "n": 6},
]


def distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "dedupe", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_in_kept_and_dropped_out(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out" / "kept.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    proc = distill(str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["kept"] == 4 and stats["dropped"] == 2 and stats["input"] == 6
    assert [r["n"] for r in read_jsonl(out)] == [1, 3, 4, 6]  # whole records, input order
    dropped = read_jsonl(tmp_path / "out" / "kept.dropped.jsonl")
    assert [r["n"] for r in dropped] == [2, 5]
    assert dropped[0]["dedupe"]["nearest"] == ROWS[0]["instruction"]
    assert dropped[0]["dedupe"]["rouge_l"] > 0.7 and dropped[0]["dedupe"]["index"] == 1
    assert dropped[1]["dedupe"]["rouge_l"] == 1.0
    assert dropped[0]["output"] == "Sleep."


def test_threshold_field_and_seeds_options(tmp_path):
    src, out = tmp_path / "in.json", tmp_path / "kept.json"
    src.write_text(json.dumps([{"prompt": r["instruction"], "n": r["n"]} for r in ROWS]))
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"text": "Translate 'thank you' into Spanish, please."}) + "\n")
    proc = distill(str(src), str(out), "--field", "prompt", "--seeds", str(seeds), "--seed-field", "text")
    assert proc.returncode == 0, proc.stderr
    assert [r["n"] for r in json.loads(out.read_text())] == [1, 3, 4]
    dropped = json.loads((tmp_path / "kept.dropped.json").read_text())
    assert [r["n"] for r in dropped] == [2, 5, 6]
    assert dropped[2]["dedupe"]["nearest_is_seed"] is True
    # At 0.5 the ocean question (ROUGE-L 0.533 to the planet one) goes too.
    proc = distill(str(src), str(out), "--field", "prompt", "--threshold", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert [r["n"] for r in json.loads(out.read_text())] == [1, 3, 6]


def test_parquet_in_and_out(tmp_path):
    src, out = tmp_path / "in.parquet", tmp_path / "kept.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    proc = distill(str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).column("n").to_pylist() == [1, 3, 4, 6]
    dropped = pq.read_table(tmp_path / "kept.dropped.parquet").to_pylist()
    assert [r["n"] for r in dropped] == [2, 5] and dropped[0]["dedupe"]["reason"] == "near_duplicate"


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "Fine one."}\n{"output": "no instruction"}\n', "record 2: has no 'instruction' field"),
    (b'{"instruction": "Fine one."}\n{"instruction": 42}\n', "record 2: field 'instruction' is a int"),
    (b'{"instruction": "Fine one."}\n{"instruction": "caf\xe9 latte"}\n', "line 2: invalid UTF-8"),
    (b'{"instruction": "Fine one."}\n{"instruction": \n', "line 2: not valid JSON"),
    (b'["just a string"]\n', "record 1: is a list"),
])
def test_malformed_records_stop_before_anything_is_written(tmp_path, content, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "kept.jsonl"
    src.write_bytes(content)
    with pytest.raises(InputFileError, match="Nothing was written") as err:
        dedupe_file(src, out)
    assert message in str(err.value)
    assert not out.exists() and not (tmp_path / "kept.dropped.jsonl").exists()


def test_cli_reports_a_malformed_record_without_traceback_or_output(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "kept.jsonl"
    src.write_bytes(b'{"instruction": "Fine one."}\n{"instruction": "caf\xe9 latte"}\n')
    proc = distill(str(src), str(out))
    assert proc.returncode == 2
    assert "line 2: invalid UTF-8" in proc.stderr and "Nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "kept.dropped.jsonl").exists()


def test_invalid_utf8_json_list_and_missing_file(tmp_path):
    src = tmp_path / "in.json"
    src.write_bytes(b'[{"instruction": "caf\xe9"}]')
    with pytest.raises(InputFileError, match="invalid UTF-8"):
        dedupe_file(src, tmp_path / "o.json")
    with pytest.raises(InputFileError, match="does not exist"):
        dedupe_file(tmp_path / "missing.jsonl", tmp_path / "o.jsonl")


def test_bad_records_can_be_rejects_with_a_reason(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "kept.jsonl"
    src.write_bytes(b'{"instruction": "Give three tips for staying healthy."}\n{"instruction": 7}\n'
                    b'{"instruction": "caf\xe9"}\n{"instruction": "Give three tips for staying healthy!"}\n')
    stats = dedupe_file(src, out, on_bad="reject")
    assert stats["kept"] == 1 and stats["bad_records"] == 2 and stats["near_duplicates"] == 1
    dropped = read_jsonl(tmp_path / "kept.dropped.jsonl")
    assert [d["dedupe"]["reason"] for d in dropped] == ["wrong_type", "invalid_utf8", "near_duplicate"]
    assert [d["dedupe"]["index"] for d in dropped] == [1, 2, 3]
    with pytest.raises(InputFileError, match="record 2"):
        dedupe_file(src, tmp_path / "other.jsonl")


def test_empty_input_writes_empty_outputs(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "kept.jsonl"
    src.write_text("")
    assert dedupe_file(src, out)["input"] == 0
    assert out.read_text() == "" and (tmp_path / "kept.dropped.jsonl").read_text() == ""
