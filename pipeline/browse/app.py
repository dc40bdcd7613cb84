"""The browser: a read-only Starlette app with server-rendered pages over a runs folder. Every page is a
Jinja template with autoescaping on, and no page runs script (the CSP forbids it), so generated text, which
is untrusted, can only ever show up as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from pipeline.browse import story
from pipeline.browse.diff import KINDS, diff_counts, diff_page
from pipeline.browse.cache import IndexStore
from pipeline.browse.index import FACETS, SCORES, Query, QueryTooSlow
from pipeline.browse.runs import NotFound, RunsFolder, read_json

TEMPLATES = Path(__file__).parent / "templates"
PAGE_SIZE = 50
EVAL_PAGE = 20
HEADERS = {
    # No script at all: even a rendering bug could not run a record's payload.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)
    env.globals["qs"] = lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")})
    return env


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _int(value: str | None, name: str) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, got {value!r}") from None


def _float(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {value!r}") from None


def create_app(runs_dir: str | Path, index_dir: str | Path | None = None, allowed_hosts: list[str] | None = None,
               sync_index_rows: int = 50_000) -> Starlette:
    """The browse app over `runs_dir`; search indexes are cached in `index_dir` (default runs/cache/browse)."""
    folder = RunsFolder(Path(runs_dir))
    store = IndexStore(Path(index_dir) if index_dir else folder.root / "cache" / "browse", sync_rows=sync_index_rows)
    templates = Jinja2Templates(env=_env())

    def page(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, template, context, status_code=status_code, headers=HEADERS)

    def index_or_wait(request: Request, run_id: str, name: str):
        ddir = folder.dataset_dir(run_id, name)
        idx = store.get(ddir)
        if idx is None:
            return None, page(request, "building.html", status_code=503, run_id=run_id, name=name,
                              progress=store.progress(ddir) or {})
        return idx, None

    def runs_page(request: Request) -> Response:
        return page(request, "runs.html", runs=folder.runs())

    def run_page(request: Request) -> Response:
        run_id = request.path_params["run"]
        run = folder.run_dir(run_id)
        config_text, config = folder.config(run_id)
        report = read_json(run / "report.json", {}) or {}
        versions = []
        for name in folder.dataset_names(run_id):
            m = folder.manifest(run_id, name)
            versions.append({"name": name, "manifest": m, "parents": [p for p in m.get("parents") or [] if isinstance(p, str)]})
        teacher = config.get("teacher") or {}
        return page(request, "run.html", run_id=run_id, status=read_json(run / "status.json", {}) or {},
                    report=report, generation=report.get("generation") or read_json(run / "generate.json", {}) or {},
                    training=report.get("training") or read_json(run / "train.json", {}) or {},
                    evaluation=report.get("evaluation") or read_json(run / "eval" / "summary.json", {}) or {},
                    ledger=report.get("ledger") or {}, versions=versions, plots=folder.plots(run_id),
                    teacher=f"{teacher.get('backend', '?')}:{teacher.get('model', '?')}", config=config,
                    config_text=config_text, has_eval=bool((run / "eval" / "outputs.jsonl").exists()),
                    report_md=(run / "report.md").read_text(errors="replace") if (run / "report.md").exists() else "")

    def file_route(request: Request) -> Response:
        path, kind = folder.file(request.path_params["run"], request.path_params["path"])
        return FileResponse(path, media_type=kind, headers=HEADERS)

    def eval_page(request: Request) -> Response:
        run_id = request.path_params["run"]
        rows = folder.eval_outputs(run_id)
        keys = story.contenders(rows)
        n = max(0, _int(request.query_params.get("page"), "page") or 0)
        chunk = rows[n * EVAL_PAGE:(n + 1) * EVAL_PAGE]
        items = [{"row": r, "extras": story.eval_extras(r, keys)} for r in chunk]
        means = {k: (sum(r.get(f"{k}_rouge_l") or 0 for r in rows) / len(rows)) if rows else None for k in keys}
        return page(request, "eval.html", run_id=run_id, items=items, keys=keys, means=means, n=n, total=len(rows),
                    has_next=(n + 1) * EVAL_PAGE < len(rows), first=n * EVAL_PAGE)

    def dataset_page(request: Request) -> Response:
        run_id, name = request.path_params["run"], request.path_params["name"]
        manifest = folder.manifest(run_id, name)
        idx, wait = index_or_wait(request, run_id, name)
        if wait:
            return wait
        qp = request.query_params
        sort = qp.get("sort", "")
        if sort and sort.lstrip("-") not in SCORES:
            raise HTTPException(400, f"sort must be one of {', '.join(SCORES)}, '-' in front for highest first")
        ranges = {c: (_float(qp.get(f"min_{c}"), f"min_{c}"), _float(qp.get(f"max_{c}"), f"max_{c}")) for c in SCORES}
        query = Query(q=qp.get("q", "")[:500], filters={c: qp.get(c, "") for c in FACETS},
                      min_len=_int(qp.get("min_len"), "min_len"), max_len=_int(qp.get("max_len"), "max_len"),
                      score_range={c: r for c, r in ranges.items() if r != (None, None)}, sort=sort,
                      after=_int(qp.get("after"), "after"), before=_int(qp.get("before"), "before"), limit=PAGE_SIZE)
        error, result = None, None
        try:
            result = idx.page(query)
        except QueryTooSlow as e:
            error = str(e)
        state = {"q": query.q, **{c: v for c, v in query.filters.items() if v}, "min_len": qp.get("min_len", ""),
                 "max_len": qp.get("max_len", ""), "sort": sort,
                 **{f"{b}_{c}": qp.get(f"{b}_{c}", "") for c in SCORES for b in ("min", "max")}}
        return page(request, "dataset.html", status_code=400 if error else 200, run_id=run_id, name=name,
                    manifest=manifest, info=idx.info, result=result, error=error, state=state, facets=idx.info["facets"],
                    scores=idx.info.get("scores") or [],
                    others=[d for d in folder.all_datasets() if d != f"{run_id}/{name}"],
                    plots=[p for p in folder.plots(run_id) if p.startswith(f"datasets/{name}/")])

    def record_page(request: Request) -> Response:
        run_id, name = request.path_params["run"], request.path_params["name"]
        idx, wait = index_or_wait(request, run_id, name)
        if wait:
            return wait
        rec = idx.record(request.path_params["row"])
        if rec is None:
            raise NotFound("no such record")
        _, config = folder.config(run_id)
        verdict = story.verdict(rec)
        if verdict["nearest"] is not None:
            verdict["nearest_rows"] = idx.rows_with_instruction(verdict["nearest"])
        if verdict["same_as"]:
            verdict["same_as_rows"] = [r for r in idx.rows_with_id(verdict["same_as"]) if r != rec["row"]]
        seeds, seeds_problem = story.seed_examples(list(rec.get("prompt_seed_ids") or []), config)
        prompt, prompt_note = story.rendered_prompt(rec, seeds)
        return page(request, "record.html", run_id=run_id, name=name, rec=rec, verdict=verdict, seeds=seeds,
                    seeds_problem=seeds_problem, prompt=prompt, prompt_note=prompt_note,
                    tokens=story.logprob_tokens(rec), gen_params=story.pretty_json(rec.get("gen_params")),
                    manifest=folder.manifest(run_id, name), same_id=[r for r in idx.rows_with_id(rec["id"]) if r != rec["row"]],
                    shown={"id", "row", "instruction", "input", "output", "raw_reply", "gen_params", "extra", "ihash",
                           "out_len", "prompt_seed_ids", "prompt_machine_instructions", *story.LOGPROB_FIELDS})

    def record_by_id(request: Request) -> Response:
        run_id, name = request.path_params["run"], request.path_params["name"]
        idx, wait = index_or_wait(request, run_id, name)
        if wait:
            return wait
        rows = idx.rows_with_id(request.path_params["record_id"][:64])
        if not rows:
            raise NotFound("no record with that id in this dataset version")
        return RedirectResponse(f"/runs/{run_id}/datasets/{name}/records/{rows[0]}", status_code=303, headers=HEADERS)

    def diff_route(request: Request) -> Response:
        qp = request.query_params
        choices = folder.all_datasets()
        a_id, b_id, kind = qp.get("a", ""), qp.get("b", ""), qp.get("kind", "added")
        if kind not in KINDS:
            raise HTTPException(400, f"kind must be one of {', '.join(KINDS)}")
        ctx: dict[str, Any] = {"choices": choices, "a": a_id, "b": b_id, "kind": kind, "kinds": KINDS}
        if a_id and b_id:
            (ar, an), (br, bn) = folder.dataset_by_id(a_id), folder.dataset_by_id(b_id)
            ia, wait = index_or_wait(request, ar, an)
            if wait:
                return wait
            ib, wait = index_or_wait(request, br, bn)
            if wait:
                return wait
            counts = diff_counts(ia, ib)
            # An empty kind would walk every id to find nothing; the (cached) count already says so.
            rows, more = diff_page(ia, ib, kind, qp.get("after", ""), PAGE_SIZE) if counts[kind] != 0 else ([], False)
            ctx.update(counts=counts, rows=rows, more=more, a_run=ar, a_name=an, b_run=br, b_name=bn)
        return page(request, "diff.html", **ctx)

    async def not_found(request: Request, exc: Exception) -> Response:
        return page(request, "error.html", status_code=404, message=str(exc) or "not found")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return page(request, "error.html", status_code=exc.status_code, message=exc.detail)

    routes = [
        Route("/", runs_page),
        Route("/runs/{run}", run_page),
        Route("/runs/{run}/files/{path:path}", file_route),
        Route("/runs/{run}/eval", eval_page),
        Route("/runs/{run}/datasets/{name}", dataset_page),
        Route("/runs/{run}/datasets/{name}/records/{row:int}", record_page),
        Route("/runs/{run}/datasets/{name}/ids/{record_id}", record_by_id),
        Route("/diff", diff_route),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={NotFound: not_found, HTTPException: http_error})
    app.state.store = store
    app.state.folder = folder
    return app
