"""The questions a run answers, each as a paired test on the items both contenders answered: does the distilled
student beat the raw one, does it beat the student trained on the original data, and how much of the teacher
does it keep?"""

from __future__ import annotations

from typing import Any

from pipeline.evaluate.metrics import paired_difference, paired_ratio

LABELS = {"teacher": "teacher", "raw_student": "raw student", "distilled_student": "distilled student",
          "gold_student": "gold-trained student"}
# (A, B, key): every claim "A vs B" the report makes. gold vs raw says whether the original data helps at all.
COMPARISONS = [("distilled_student", "raw_student", "distilled_vs_raw"),
               ("distilled_student", "gold_student", "distilled_vs_gold"),
               ("distilled_student", "teacher", "distilled_vs_teacher"),
               ("gold_student", "raw_student", "gold_vs_raw")]
# Per-item columns of eval/outputs.jsonl: metric -> (column suffix, title).
PER_ITEM = {"rouge_l": ("_rouge_l", "ROUGE-L"), "win_rate": ("_judge", "win rate")}


def per_item(rows: list[dict[str, Any]], contender: str, metric: str = "rouge_l") -> list[float]:
    """One contender's per-item scores from outputs rows (NaN where an item has none)."""
    col = contender + PER_ITEM[metric][0]
    return [float("nan") if r.get(col) is None else float(r[col]) for r in rows]


def paired_verdicts(rows: list[dict[str, Any]], contenders: list[str], samples: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap differences for every comparison whose two contenders are present (ROUGE-L, and the judge's
    per-item preference when there is one), plus the paired ratio distilled / teacher."""
    out: dict[str, Any] = {}
    for a, b, key in COMPARISONS:
        if a not in contenders or b not in contenders:
            continue
        for metric, (_, title) in PER_ITEM.items():
            xs, ys = per_item(rows, a, metric), per_item(rows, b, metric)
            if all(v != v for v in xs) or all(v != v for v in ys):
                continue  # not measured for one side (no judge, or the judge's baseline is this contender)
            d = paired_difference(xs, ys, names=(LABELS.get(a, a), LABELS.get(b, b)), samples=samples, seed=seed)
            out[key if metric == "rouge_l" else f"{key}_{metric}"] = {**d.as_dict(), "metric": metric,
                                                                      "sentence": d.sentence(title)}
    if "distilled_student" in contenders and "teacher" in contenders:
        ratio, lo, hi, n = paired_ratio(per_item(rows, "distilled_student"), per_item(rows, "teacher"), samples,
                                        seed=seed)
        out["keeps_of_teacher"] = {"metric": "rouge_l", "ratio": ratio, "lo": lo, "hi": hi, "n": n}
    return out


def keeps_sentence(k: dict[str, Any]) -> str:
    """'keeps 75% [62%, 88%] of the teacher's ROUGE-L' (paired bootstrap over the same items)."""
    if not k or k.get("ratio") is None or k["ratio"] != k["ratio"]:
        return ""
    lo, hi = k.get("lo"), k.get("hi")
    ci = f" [{lo:.0%}, {hi:.0%}]" if lo == lo and hi == hi else ""
    return f"keeps {k['ratio']:.0%}{ci} of the teacher's ROUGE-L (paired over {k['n']} items)"
