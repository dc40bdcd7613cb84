"""Standard benchmarks through lm-evaluation-harness (optional extra: `pip install -e '.[harness]'`).

Named tasks (ifeval, gsm8k, mmlu, ...) need their datasets from the hub; `local_task_config` turns any of our eval
files into a harness task over the local file, so the integration runs offline too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DistillError
from pipeline.evaluate.evalsets import load_eval_set


def local_task_config(name: str, data_file: Path, max_gen_toks: int = 64) -> dict[str, Any]:
    """A generate_until task over a JSONL of {instruction, input, output}: greedy answer, exact match to the output."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{instruction}}{% if input %}\n\n{{input}}{% endif %}",
        "doc_to_target": "{{output}}",
        "generation_kwargs": {"until": ["\n\n", "<|im_end|>"], "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True}],
    }


def run_harness(model: str | Path, adapter: str | Path | None = None, tasks: list[str] | None = None,
                local_files: list[str | Path] | None = None, limit: int | None = None, batch_size: int = 8,
                max_gen_toks: int = 64) -> dict[str, Any]:
    """Evaluate a checkpoint (plus optional LoRA adapter) on harness tasks and local eval files; returns
    {task: {metric: value}} plus the harness's own config block."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DistillError("lm-evaluation-harness is not installed. Install the extra: pip install -e '.[harness]' "
                           "(or pip install 'lm-eval>=0.4.13,<0.5').") from None
    import torch

    with tempfile.TemporaryDirectory(prefix="distill-harness-") as tmp:
        names = list(tasks or [])
        for f in local_files or []:
            items = load_eval_set(Path(f))  # both our formats, flattened to one row per instance
            data = Path(tmp) / f"{Path(f).stem}.jsonl"
            data.write_text("".join(json.dumps({"instruction": it.instruction, "input": it.input, "output": it.reference})
                                    + "\n" for it in items))
            name = f"distill_{Path(f).stem.replace('-', '_')}"
            (Path(tmp) / f"{name}.yaml").write_text(yaml.safe_dump(local_task_config(name, data, max_gen_toks)))
            names.append(name)
        if not names:
            raise DistillError("No harness tasks: name some (--task gsm8k) or give local eval files.")
        lm = HFLM(pretrained=str(model), peft=str(adapter) if adapter else None, batch_size=batch_size,
                  device="cuda" if torch.cuda.is_available() else "cpu")
        out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=tmp), limit=limit,
                              apply_chat_template=True, log_samples=False)
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if k != "alias" and isinstance(v, (int, float))}
               for task, metrics in out["results"].items()}
    return {"results": results, "config": {k: str(v) for k, v in (out.get("config") or {}).items()}}
