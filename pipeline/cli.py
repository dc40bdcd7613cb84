"""The `distill` command."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sqlite3
import os
import sys
import time
from pathlib import Path

from pipeline.errors import DistillError


def _quiet_prefect() -> None:
    # Offline boxes: telemetry calls only produce noise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The temporary local API server can take longer than Prefect's 20 s default on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # A user error raised inside the flow is printed once, as a paragraph with the fix; Prefect's engine would
    # otherwise log it with a full traceback first.
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_UserErrorWithoutTraceback())


class _UserErrorWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def _is_user_error(e: BaseException | None) -> bool:
    return isinstance(e, DistillError) or (e is not None and _disk_full(e))


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(profile=None if args.config else args.profile, config_file=args.config, overrides=args.set)
    from pipeline.stages import preflight

    preflight(cfg)  # bad seeds, eval set or model: fail in a second, before Prefect starts
    if args.dry_run:
        return print_estimate(cfg, args)
    _quiet_prefect()
    from flows.distill import distill

    start = time.perf_counter()
    result = distill(config=cfg, run_id=args.run_id, stages_to_run="data" if args.data_only else "full",
                     allow_config_change=args.allow_config_change)
    elapsed = time.perf_counter() - start
    print_summary(result, elapsed)
    return 0


def print_estimate(cfg, args: argparse.Namespace) -> int:
    """`distill run --dry-run`: the most each stage can ask of the teacher, and what it can cost; no call made."""
    from pipeline.estimate import estimate, format_estimate

    spent = None
    ledger_path = Path(cfg.runs_dir) / args.run_id / "ledger.sqlite" if args.run_id else None
    if ledger_path is not None and ledger_path.exists():
        from pipeline.teachers import Ledger

        spent = Ledger.for_teacher(cfg.teacher, ledger_path).totals().cost_usd
    print(format_estimate(cfg, estimate(cfg, "data" if args.data_only else "full"), spent))
    return 0


_SHORT = {"teacher": "teacher", "raw_student": "raw", "distilled_student": "distilled", "gold_student": "gold"}
_QUESTIONS = (("distilled_vs_raw", "distilled vs raw"), ("distilled_vs_gold", "distilled vs gold"),
              ("distilled_vs_teacher", "distilled vs teacher"))


def print_summary(result: dict, elapsed: float) -> None:
    print("\n" + "=" * 72)
    print(f"distill finished in {elapsed / 60:.1f} min. Run folder: {result['run_dir']}")
    print(f"  data: {result.get('accepted')} accepted, {result.get('rejected')} rejected")
    if result.get("sets"):
        for line in verdict_lines(result["sets"]):
            print("  " + line)
    else:  # a data-only run names the teacher here instead
        for key, label in (("teacher", "teacher"), ("raw_student", "raw student"), ("distilled_student", "distilled student")):
            if isinstance(result.get(key), (int, float)):
                print(f"  ROUGE-L {label:<18} {result[key]:.3f}")
    for key, label in (("raw_student", "raw student"), ("distilled_student", "distilled student")):
        if f"{key}_win_rate" in result:
            print(f"  judge win rate {label:<11} {result[f'{key}_win_rate']:.0%}")
    if "decision" in result:
        print(f"  registry: {'champion' if result.get('promoted') else 'challenger'}: {result['decision']}")
    if result.get("report"):
        print(f"  report: {result['report']}")
    print("=" * 72)


def verdict_lines(sets: dict) -> list[str]:
    """Per held-out set: ROUGE-L per contender, then the three questions as paired differences [95% CI]."""
    lines = []
    for name, s in sets.items():
        scores = "  ".join(f"{_SHORT.get(k, k)} {v:.3f}" for k, v in (s.get("rouge_l") or {}).items() if v is not None)
        lines.append(f"{name} ({s.get('items')} items), ROUGE-L: {scores}")
        for key, label in _QUESTIONS:
            p = (s.get("paired") or {}).get(key)
            if not p or not p.get("n"):
                continue
            verdict = p["verdict"] + (f" on {p['n']} items (~{p['n_needed']} needed)"
                                      if p["verdict"] == "not distinguishable" and p.get("n_needed") else "")
            lines.append(f"  {label:<21} {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]  {verdict}")
        k = s.get("keeps_of_teacher") or {}
        if k.get("ratio") is not None and k["ratio"] == k["ratio"]:
            lines.append(f"  {'keeps of the teacher':<21} {k['ratio']:.0%} [{k['lo']:.0%}, {k['hi']:.0%}]")
        hit = {k: v for k, v in (s.get("hit_limit") or {}).items() if v is not None}
        if hit:
            lines.append(f"  {'hit the token limit':<21} " + "  ".join(f"{_SHORT.get(k, k)} {v:.0%}" for k, v in hit.items()))
    return lines


def cmd_dedupe(args: argparse.Namespace) -> int:
    from pipeline.curate.standalone import dedupe_file

    stats = dedupe_file(Path(args.input), Path(args.output), field=args.field, threshold=args.threshold,
                        seeds=Path(args.seeds) if args.seeds else None, seed_field=args.seed_field,
                        on_bad=args.on_bad)
    print(json.dumps(stats, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.curate.export import export_version

    print(export_version(Path(args.version), args.format, args.dest, token_env=args.token_env, private=not args.public))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.store import Catalog

    for row in Catalog(Path(args.runs_dir)).rows("runs", "ORDER BY created"):
        print(f"{row['id']:<40} {row['state']:<10} {row['dir']}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.registry import decisions
    from pipeline.store import Catalog

    catalog = Catalog(Path(args.runs_dir))
    reasons = {d["model_id"]: d["reason"] for d in decisions(catalog)}  # the latest decision per model
    for row in catalog.rows("models", "ORDER BY created"):
        m = json.loads(row["metrics"] or "{}")
        score, ci = m.get("rouge_l", m.get("distilled_student")), m.get("rouge_l_ci")
        shown = "–" if score is None else f"{score:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        print(f"{row['id']:<48} {row['role']:<10} ROUGE-L {shown}  {row['path']}")
        if row["id"] in reasons:
            print(f"    {reasons[row['id']]}")
    pointer = Path(args.runs_dir) / "champion" / "champion.json"
    if pointer.exists():
        print(f"champion: {json.loads(pointer.read_text())['model_id']} -> {pointer.parent / 'adapter'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.store import load_records
    import yaml

    from pipeline.train.ablation import cut_depth, kd_grid

    if bool(args.run_id) == bool(args.data):
        raise ConfigError("distill ablate needs exactly one data source: --run-id ID (that run's accepted data and "
                          "config) or --data FILE (an accepted.parquet written by curate) with --profile.")
    if args.run_id:
        run_dir = Path(args.runs_dir) / args.run_id
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"No run folder {run_dir} (or it has no config.yaml). List runs with `distill runs`.")
        cfg = load_config(config_file=run_dir / "config.yaml", overrides=args.set)
        data, out = run_dir / "datasets" / "curated" / "accepted.parquet", Path(args.out or run_dir / "ablation")
    else:
        cfg = load_config(profile=args.profile, overrides=args.set)
        data, out = Path(args.data), Path(args.out or "ablation")
    if not data.exists():
        raise ConfigError(f"No accepted data at {data}: run generate and curate first (`distill run --data-only`).")
    records = load_records(data)
    if cfg.train.mix_gold:
        from pipeline.stages import gold_records

        records += gold_records(cfg.train.mix_gold, cfg)[0]  # decontaminated like curated data
    result: dict = {"records": len(records), "data": str(data)}
    if args.grid:
        result["grid"] = kd_grid(cfg, records, out, temperatures=[float(t) for t in args.temperatures.split(",")],
                                 alphas=[float(a) for a in args.alphas.split(",")])
    if args.cuts:
        overrides: dict[str, dict] = {}
        for item in args.method_set:  # 'on-policy:max_steps=30' -> train.max_steps=30 for that contender only
            spec, _, kv = item.partition(":")
            key, _, value = kv.partition("=")
            if not key or not value:
                raise ConfigError(f"--method-set {item!r} must look like CONTENDER:KEY=VALUE, e.g. on-policy:max_steps=30.")
            overrides.setdefault(spec.strip(), {})[key.strip()] = yaml.safe_load(value)
        rows = cut_depth(cfg, records, out, [c.strip() for c in args.cuts.split(";") if c.strip()],
                         alpha=args.cut_alpha, temperature=args.cut_temperature,
                         methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         hidden_weight=args.hidden_weight, method_overrides=overrides, saved_only=args.saved_only)
        result["cut_depth"] = [{k: r.get(k) for k in ("cut", "contender", "rouge_l", "perplexity", "hit_limit",
                                                      "train_wall_s")} for r in rows]
        for r in rows:
            if r.get("vs_sft"):
                d = r["vs_sft"]
                print(f"cut {r['cut']}: {r['contender']} - sft = {d['mean']:+.4f} ROUGE-L "
                      f"[{d['lo']:+.4f}, {d['hi']:+.4f}] over {d['n']} items ({d['verdict']})")
    print(json.dumps(result, indent=2, default=str))
    print(f"ablation written to {out}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.study import StudyOptions, budget_overrides, load_inputs, run_study
    from pipeline.study_report import summary_lines

    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.replace(";", ",").split(",") if x.strip())

    overrides = budget_overrides(args.set, args.budget)
    cfg, records, data, out = load_inputs(args.run_id, args.runs_dir, args.data, args.profile, overrides, args.out)
    options = StudyOptions(questions=tuple(f"q{q.lstrip('qQ')}" for q in names(args.questions)),
                           methods=names(args.methods), targets=names(args.targets), layers=names(args.layers),
                           cuts=tuple(c.strip() for c in args.cuts.split(";") if c.strip()),
                           cut_methods=names(args.cut_methods), teacher=args.teacher)
    command = "distill " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["study"] else "distill study"
    study = run_study(cfg, records, out, options, source={"data": str(data), "run_id": args.run_id,
                                                          "command": command, "overrides": overrides})
    print("\n".join(summary_lines(study)))
    print(f"study written to {out / 'study.md'}")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from pipeline.browse import serve

    serve(Path(args.runs_dir), host=args.host, port=args.port, index_dir=args.index_dir)
    return 0


def cmd_teacher_server(args: argparse.Namespace) -> int:
    from pipeline.teachers.server import run_teacher_server

    return run_teacher_server(args.model, args.port, n_threads=args.n_threads, n_ctx=args.n_ctx)


def cmd_export_model(args: argparse.Namespace) -> int:
    from pipeline.ship import export_gguf, resolve_export_source

    model_dir, adapter, source, stem = resolve_export_source(Path(args.target), args.source_gguf, args.base)
    out = Path(args.out or Path(args.target) / "export")
    made = export_gguf(model_dir, adapter, source, out, args.quant or ["q8_0", "q4_k_m"], stem=stem)
    for quant, path in made["paths"].items():
        print(f"{quant:<8} {Path(path).stat().st_size / 2**20:8.1f} MB  {path}")
    print(f"Serve one: distill teacher-server --model {next(iter(made['paths'].values()))}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.scale.train_launch import train_run

    return train_run(Path(args.run_dir))


def _add_data_source(p: argparse.ArgumentParser, verb: str, example: str) -> None:
    """The data source and overrides shared by `ablate` and `study`: a run's data and config, or a file + profile."""
    p.add_argument("--run-id", help="use this run's accepted data and saved config")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--data", help=f"an accepted.parquet to {verb} instead of a run's (config from --profile)")
    p.add_argument("--profile", default=None, help="profile for --data (default: cpu-demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. {example} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distil a teacher LLM into a small student through synthetic data.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline (the `distill` flow) locally")
    r.add_argument("--profile", default="cpu-demo", help="profile in profiles/ (default: cpu-demo)")
    r.add_argument("--config", help="a YAML config file instead of a profile")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set generate.target_instructions=20 (repeatable)")
    r.add_argument("--run-id", help="reuse this run id: resumes an unfinished run folder")
    r.add_argument("--data-only", action="store_true", help="generate and curate only")
    r.add_argument("--dry-run", action="store_true",
                   help="print the most teacher requests each stage can make, their worst-case tokens and dollars at the "
                        "configured prices and the time at the measured rate, then stop before any teacher call")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume --run-id with a config that differs from the run's: the stages the changed keys feed, "
                        "and those after them, run again (recorded in status.json)")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("dedupe", help="Alpaca's ROUGE-L near-duplicate filter over a JSONL/JSON/Parquet file")
    d.add_argument("input")
    d.add_argument("output", help="kept records (same format); dropped ones go beside it as <name>.dropped.<ext>")
    d.add_argument("--field", default="instruction")
    d.add_argument("--threshold", type=float, default=0.7)
    d.add_argument("--seeds", help="file of instructions counted as already kept")
    d.add_argument("--seed-field", default="instruction")
    d.add_argument("--on-bad", choices=["error", "reject"], default="error",
                   help="malformed record: stop before writing (error) or drop it with a reason (reject)")
    d.set_defaults(func=cmd_dedupe)

    e = sub.add_parser("export", help="export a dataset version: Alpaca JSONL, Parquet, or the Hugging Face Hub")
    e.add_argument("version", help="a dataset version folder, e.g. runs/<run-id>/datasets/curated")
    e.add_argument("--format", choices=["jsonl", "parquet", "hub"], default="jsonl")
    e.add_argument("dest", help="output file, or the Hub repo id (user/name) for --format hub")
    e.add_argument("--token-env", default="HF_TOKEN", help="environment variable with the Hub token")
    e.add_argument("--public", action="store_true", help="make the Hub dataset public (default: private)")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("browse", help="read-only web pages for every run, dataset version and record")
    b.add_argument("--runs-dir", default="runs")
    b.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    b.add_argument("--port", type=int, default=8765)
    b.add_argument("--index-dir", help="where search indexes are cached (default: <runs-dir>/cache/browse)")
    b.set_defaults(func=cmd_browse)

    t = sub.add_parser("teacher-server", help="serve a GGUF teacher with llama.cpp's OpenAI-compatible server on loopback")
    t.add_argument("--model", default="smollm2-135m-instruct", help="packaged alias or GGUF path")
    t.add_argument("--port", type=int, default=8080)
    t.add_argument("--n-threads", type=int, default=None, help="default: one per core")
    t.add_argument("--n-ctx", type=int, default=2048)
    t.set_defaults(func=cmd_teacher_server)

    x = sub.add_parser("export-model", help="the student (adapter merged) as quantized GGUF files for llama.cpp/Ollama")
    x.add_argument("target", help="a run folder (runs/<run-id>), runs/champion, an adapter folder or a model folder")
    x.add_argument("--quant", action="append", metavar="TYPE",
                   help="llama.cpp quantization, repeatable: q8_0, q4_k_m, q4_1, f16, f32, ... (default: q8_0 and q4_k_m)")
    x.add_argument("--out", help="output folder (default: TARGET/export)")
    x.add_argument("--source-gguf", help="the GGUF the student was cut from (default: the run's student.cut_from)")
    x.add_argument("--base", help="the student an adapter folder was trained on (default: its adapter_config.json)")
    x.set_defaults(func=cmd_export_model)

    tr = sub.add_parser("train", help="train a run's student (after `distill run --data-only`); launch it with "
                                      "torchrun or accelerate launch for N processes")
    tr.add_argument("run_dir", help="the run folder, e.g. runs/<run-id>")
    tr.set_defaults(func=cmd_train)

    a = sub.add_parser("ablate", help="logit-distillation ablation over T x alpha, and distillation methods per layer cut")
    _add_data_source(a, "train on", "--set evaluate.limit=100")
    a.add_argument("--out", help="output folder (default: the run's ablation/, or ./ablation)")
    a.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="train the T x alpha grid")
    a.add_argument("--temperatures", default="1,2,3,5,10,20")
    a.add_argument("--alphas", default="0,0.2,0.5,0.8,1")
    a.add_argument("--cuts", help="layer cuts separated by ';', e.g. '12-17;middle:10;every:2'")
    a.add_argument("--cut-alpha", type=float, default=0.5, help="KD alpha for the layer-cut table")
    a.add_argument("--cut-temperature", type=float, default=2.0, help="KD temperature for the layer-cut table")
    a.add_argument("--methods", default="sft,kd", help="contenders per cut beside the raw student: sft, kd, on-policy, "
                   "each optionally +hidden (the hidden-state term), e.g. 'sft,kd,on-policy,sft+hidden'")
    a.add_argument("--hidden-weight", type=float, default=1.0, help="train.hidden_loss_weight of the +hidden contenders")
    a.add_argument("--method-set", action="append", default=[], metavar="CONTENDER:KEY=VALUE",
                   help="a train.* override for one contender, e.g. on-policy:max_steps=30 (repeatable)")
    a.add_argument("--saved-only", action="store_true", help="train nothing: tabulate the cells a stopped ablation saved")
    a.set_defaults(func=cmd_ablate)

    st = sub.add_parser("study", help="one report on three questions: distilled vs gold data, where adapters help, "
                                      "how many layers can go (paired verdicts, resumable cells)")
    _add_data_source(st, "study", "--set train.max_steps=32")
    st.add_argument("--budget", choices=["small", "profile"], default="small",
                    help="small (default): a CPU-sized budget (train.max_steps=16, 30 eval items, 64 new tokens) "
                         "under your --set keys; profile: the config's own settings")
    st.add_argument("--out", help="output folder (default: the run's study/, or ./study); rerun to resume")
    st.add_argument("--questions", default="1,2,3", help="which questions: 1 data, 2 placement, 3 cuts")
    st.add_argument("--methods", default="sft,kd", help="Q1: train.method values to compare gold vs distilled with")
    st.add_argument("--targets", default="attention,mlp,all-linear", help="Q2: train.lora_target values")
    st.add_argument("--layers", default="early,middle,late", help="Q2: train.lora_layers values")
    st.add_argument("--cuts", default="middle:10", help="Q3: extra layer cuts separated by ';' (the student's own "
                                                        "cut is always a row), e.g. 'middle:10;20-29'")
    st.add_argument("--cut-methods", default="sft,kd", help="Q3: methods trained on every cut, as for `distill ablate "
                                                             "--methods` (e.g. sft,kd,on-policy,sft+hidden)")
    st.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                    help="score the teacher too (the reference Q3's cuts are compared with)")
    st.set_defaults(func=cmd_study)

    from pipeline.evaluate.cli import add_evaluate_parser

    add_evaluate_parser(sub)  # distill evaluate --model DIR --adapter DIR --eval-set FILE [--eval-set FILE] [--judge k=v]

    for name, fn, help_ in (("runs", cmd_runs, "list runs in the catalog"), ("models", cmd_models, "list models with scores")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--runs-dir", default="runs")
        s.set_defaults(func=fn)
    return p


def _disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) == errno.ENOSPC or "disk is full" in str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistillError as e:
        print(f"\ndistill: error: {e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.OperationalError) as e:
        if not _disk_full(e):
            raise
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"\ndistill: error: No space left on the device{where}. Finished stages and cached teacher replies are "
              f"kept and nothing half-written is marked complete; free some space, then resume with "
              f"`distill run --run-id <run id>`.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndistill: interrupted; finished stages are kept, rerun with --run-id to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
