"""The browser's pages over a real runs folder (built with the store): lineage, search, filters, pagination,
a record's story, diff, eval side by side; and that it is read-only, escapes everything and serves no file
outside a run folder."""

from __future__ import annotations

import hashlib
import html
import re
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from pipeline.browse import allowed_hosts, create_app
from pipeline.browse.index import DatasetIndex, Query, build_index, fts_query
from pipeline.records import Record
from pipeline.store import save_records
from tests.browse.fixture import PLANTED, SECRET, XSS, make_runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("browse") / "runs")


@pytest.fixture(scope="module")
def client(runs, tmp_path_factory):
    app = create_app(runs["root"], index_dir=tmp_path_factory.mktemp("browse-index"))
    return TestClient(app, base_url="http://127.0.0.1")


def rows_on(page_html: str) -> list[int]:
    return [int(x) for x in re.findall(r'<td class="num"><a href="/runs/r1/datasets/curated/records/(\d+)">', page_html)]


def test_runs_and_run_page_show_counts_reasons_cost_lineage_and_plots(client, runs):
    home = client.get("/")
    assert home.status_code == 200 and 'href="/runs/r1"' in home.text
    page = client.get("/runs/r1")
    assert page.status_code == 200
    text = page.text
    for reason in ("near_duplicate", "exact_duplicate", "blacklisted_word", "too_short"):
        assert f"?reject_reason={reason}" in text
    assert "openai:fake-teacher" in text
    assert '<a href="/runs/r1/datasets/curated">r1/curated</a>' in text  # v2's parent, linked
    assert "0.0123" in text and ">495<" in text  # ledger cost and tokens
    assert 'src="/runs/r1/files/scores.png"' in text and 'src="/runs/r1/files/datasets/curated/diversity.png"' in text
    assert "runs_dir:" in text  # config.yaml shown
    assert client.get("/runs/r1/files/scores.png").headers["content-type"] == "image/png"
    version = client.get("/runs/r1/datasets/curated").text
    assert 'src="/runs/r1/files/datasets/curated/diversity.png"' in version and "&#34;reject_reasons&#34;" in version


def test_search_finds_the_planted_record_only(client):
    page = client.get("/runs/r1/datasets/curated", params={"q": PLANTED})
    assert page.status_code == 200
    assert len(rows_on(page.text)) == 1 and PLANTED in page.text and "1 match" in page.text
    assert rows_on(client.get("/runs/r1/datasets/curated", params={"q": "spoons collects"}).text) == rows_on(page.text)
    assert rows_on(client.get("/runs/r1/datasets/curated", params={"q": "quokka*"}).text) == rows_on(page.text)
    assert rows_on(client.get("/runs/r1/datasets/curated", params={"q": "nosuchwordanywhere"}).text) == []


@pytest.mark.parametrize("q", ['"', 'NEAR(a b)', 'a OR', '*', '-x', 'col:val', "'; DROP TABLE f; --", "(((", "^"])
def test_search_text_is_never_fts_syntax(client, q):
    assert client.get("/runs/r1/datasets/curated", params={"q": q}).status_code == 200
    assert fts_query(q) == "" or fts_query(q).startswith('"')


def test_pagination_visits_every_row_once(client, runs):
    seen, url, pages = [], "/runs/r1/datasets/curated", 0
    while url:
        page = client.get(url).text
        seen += rows_on(page)
        m = re.search(r'id="next" href="([^"]+)"', page)
        url = "/runs/r1/datasets/curated" + html.unescape(m.group(1)) if m else None
        pages += 1
    total = len(runs["accepted"]) + len(runs["rejected"])
    assert pages == 3 and sorted(seen) == list(range(total))
    # and back: "previous" from the last page returns the middle page
    last = client.get("/runs/r1/datasets/curated", params={"after": 99}).text
    prev = re.search(r'id="prev" href="([^"]+)"', last).group(1)
    assert rows_on(client.get("/runs/r1/datasets/curated" + html.unescape(prev)).text) == list(range(50, 100))


def test_filters_status_reason_source_and_length(client, runs):
    n_acc = len(runs["accepted"])
    rej = rows_on(client.get("/runs/r1/datasets/curated", params={"status": "rejected"}).text)
    assert rej == list(range(n_acc, n_acc + len(runs["rejected"])))
    near = rows_on(client.get("/runs/r1/datasets/curated", params={"reject_reason": "near_duplicate"}).text)
    assert near == [n_acc]
    gold = rows_on(client.get("/runs/r1/datasets/curated", params={"source": "gold"}).text)
    assert gold == [n_acc - 1]
    short = rows_on(client.get("/runs/r1/datasets/curated", params={"max_len": 0}).text)
    assert short == [i for i, r in enumerate(runs["accepted"] + runs["rejected"]) if len(r.output) == 0]
    band = rows_on(client.get("/runs/r1/datasets/curated", params={"min_len": 100, "max_len": 120, "status": "accepted"}).text)
    want = [i for i, r in enumerate(runs["accepted"]) if 100 <= len(r.output) <= 120]
    assert band == want[:50] and want
    assert client.get("/runs/r1/datasets/curated", params={"min_len": "ten"}).status_code == 400


def test_record_story_shows_verdict_nearest_duplicate_prompt_and_lineage(client, runs):
    row = len(runs["accepted"])  # the first reject: a near-duplicate of record 0
    page = client.get(f"/runs/r1/datasets/curated/records/{row}").text
    assert "near_duplicate" in page and 'id="nearest-score">0.812<' in page
    assert '<a href="/runs/r1/datasets/curated/records/0">record 0</a>' in page  # the kept instruction it nearly copies
    assert "re-rendered from prompts/self_instruct_completion.j2" in page
    assert "Task 3: List three facts about volcanoes." in page  # seeds then the machine example, as the teacher saw it
    assert "seed_task_0" in page and "Is there anything I can eat for a breakfast" in page
    assert "reply text 600" in page and "openai:fake-teacher" in page
    dup = client.get(f"/runs/r1/datasets/curated/records/{len(runs['accepted']) + 1}").text
    assert "exact_duplicate" in dup and '<a href="/runs/r1/datasets/curated/records/1">record 1</a>' in dup
    by_id = client.get(f"/runs/r1/datasets/curated/ids/{runs['accepted'][3].id}", follow_redirects=False)
    assert by_id.status_code == 303 and by_id.headers["location"].endswith("/records/3")
    assert client.get("/runs/r1/datasets/curated/records/99999").status_code == 404


def test_logprobs_render_as_token_shading(client):
    page = client.get("/runs/r1/datasets/scored/records/0").text
    spans = re.findall(r'<span class="tok" style="background: rgba\(230, 80, 40, ([0-9.]+)\)" title="([^"]*)">([^<]*)</span>', page)
    assert [s[2] for s in spans] == ["Hello", " world"]
    assert float(spans[0][0]) < 0.05 < 0.9 < float(spans[1][0])  # sure token light, unsure token dark
    assert "there" in html.unescape(spans[1][1])


@pytest.mark.parametrize("url", ["/runs/r1/datasets/curated", "/runs/r1/datasets/curated/records/{xss}", "/runs/r1/eval",
                                 "/runs/r1/datasets/curated?q=pwned", "/diff?a=r1/curated&b=r1/v2&kind=removed"])
def test_html_payloads_are_escaped_everywhere(client, runs, url):
    xss_row = len(runs["accepted"]) - 2
    res = client.get(url.format(xss=xss_row))
    assert res.status_code == 200
    assert "script-src" not in res.headers["content-security-policy"] and "default-src 'none'" in res.headers["content-security-policy"]
    assert "<script" not in res.text.lower() and "onerror=" not in res.text.replace("onerror=&#34;", "")
    if "pwned" in res.text:
        assert html.escape(XSS, quote=True)[:60] in res.text or "&lt;script&gt;" in res.text


def test_eval_outputs_side_by_side(client):
    page = client.get("/runs/r1/eval").text
    assert page.index("teacher") < page.index("raw student") < page.index("distilled student")
    assert "joyful" in page and "(ROUGE-L 1.000; judge 1.00)" in page and ">words<" in page


def test_diff_counts_and_rows(client, runs):
    page = client.get("/diff", params={"a": "r1/curated", "b": "r1/v2", "kind": "changed"}).text
    counts = dict(re.findall(r'id="count-(\w+)">([\d,]+)<', page))
    assert counts == {"added": "1", "removed": "1", "changed": "1"}
    assert runs["flipped"].id in page and "contaminated" in page
    assert runs["added"].id in client.get("/diff", params={"a": "r1/curated", "b": "r1/v2", "kind": "added"}).text
    assert runs["removed"].id in client.get("/diff", params={"a": "r1/curated", "b": "r1/v2", "kind": "removed"}).text
    same = client.get("/diff", params={"a": "r1/curated", "b": "r1/curated", "kind": "changed"}).text
    assert dict(re.findall(r'id="count-(\w+)">([\d,]+)<', same)) == {"added": "0", "removed": "0", "changed": "0"}
    assert client.get("/diff", params={"a": "../x", "b": "r1/v2"}).status_code == 404


BAD_PATHS = ["../catalog.sqlite", "..%2Fcatalog.sqlite", "..%2F..%2Fsecret.txt", "%2e%2e/secret.png", "link.png",
             "/etc/passwd", "%2Fetc%2Fpasswd", "datasets/../../secret.png", "evil.html", "config.yaml%00.png",
             "datasets/curated/accepted.parquet", ".%2F..%2Fsecret.png", "..\\secret.png", ""]


@pytest.mark.parametrize("bad", BAD_PATHS)
def test_file_route_refuses_traversal_and_unservable_files(client, bad):
    res = client.get("/runs/r1/files/" + bad)
    assert res.status_code in (404, 400) and SECRET not in res.text and "<script>alert(1)" not in res.text


@pytest.mark.parametrize("url", ["/runs/..%2F..", "/runs/..%2Fsecret.png", "/runs/r1/datasets/..%2F..%2Fr1",
                                 "/runs/r1/datasets/.hidden", "/runs/%2Fetc"])
def test_names_in_urls_cannot_leave_the_runs_folder(client, url):
    res = client.get(url)
    assert res.status_code == 404 and SECRET not in res.text


def test_read_only_and_loopback_only(client, runs, tmp_path):
    run_dir: Path = runs["run"].dir
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    client.get("/runs/r1/datasets/v2")
    assert client.post("/runs/r1/datasets/curated", data={"q": "x"}).status_code == 405
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after  # no file in the run folder written, the index lives in index_dir
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400  # DNS rebinding
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "::1", "[::1]", "localhost"] and allowed_hosts("0.0.0.0") == ["*"]


def test_index_rebuilds_when_a_version_changes_and_big_ones_build_in_background(runs, tmp_path):
    app = create_app(runs["root"], index_dir=tmp_path / "idx")
    app.state.store.sync_rows = 0  # every version counts as big here: built in a thread
    c = TestClient(app, base_url="http://127.0.0.1")
    first = c.get("/runs/r1/datasets/v2")
    assert first.status_code == 503 and "Indexing" in first.text
    for _ in range(100):
        if c.get("/runs/r1/datasets/v2").status_code == 200:
            break
        time.sleep(0.1)
    assert c.get("/runs/r1/datasets/v2", params={"q": "lighthouses"}).status_code == 200
    # a new file in the version (changed signature) means a new index, not stale results
    ddir = runs["run"].dir / "datasets" / "v2"
    fresh = Record(**runs["accepted"][0].model_dump(exclude={"id", "instruction"}), instruction="Fresh words about narwhals.")
    save_records(ddir / "extra.parquet", [fresh])
    app.state.store.sync_rows = 10**9
    try:
        build_index(ddir, tmp_path / "direct.sqlite")
        assert DatasetIndex(tmp_path / "direct.sqlite").page(Query(q="narwhals")).total == 1
        assert "Fresh words about narwhals." in c.get("/runs/r1/datasets/v2", params={"q": "narwhals"}).text
    finally:
        (ddir / "extra.parquet").unlink()
    assert "Fresh words about narwhals." not in c.get("/runs/r1/datasets/v2", params={"q": "narwhals"}).text


def test_serve_binds_loopback_by_default(runs, tmp_path):
    import psutil

    from tests.browse.fixture import BrowseServer

    with BrowseServer(runs["root"], tmp_path / "idx") as srv:
        listening = [c.laddr for c in psutil.Process(srv.proc.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert [a.ip for a in listening] == ["127.0.0.1"] and listening[0].port == srv.port
        assert "r1" in __import__("httpx").get(srv.url + "/").text


def test_records_sort_and_filter_by_quality_scores(tmp_path):
    """A version with model-based scores (curate.quality): sortable both ways across pages, filterable by range;
    records without the score drop out of a score ordering."""
    from pipeline.config import load_config
    from pipeline.store import Run

    run = Run.create(load_config(profile="cpu-demo", overrides=[f"runs_dir={tmp_path / 'runs'}"]), run_id="q")
    ifds = [((i * 37) % 101) / 100 for i in range(70)]  # distinct, in no particular order
    accepted = [Record(instruction=f"Explain idea number {i} clearly.", output="ok", ifd=v, quality_score=v / 2,
                       status="accepted") for i, v in enumerate(ifds)]
    rejected = [Record(instruction="Say hi to me.", output="hi").reject("too_short")]  # no scores
    run.save_dataset("curated", accepted, rejected, {"parents": []})
    client = TestClient(create_app(tmp_path / "runs", index_dir=tmp_path / "idx"), base_url="http://127.0.0.1")
    url = "/runs/q/datasets/curated"

    def rows(page: str) -> list[int]:
        return [int(x) for x in re.findall(r'<td class="num"><a href="/runs/q/datasets/curated/records/(\d+)">', page)]

    seen, link = [], url + "?sort=-ifd"
    while link:
        page = client.get(link).text
        seen += rows(page)
        m = re.search(r'id="next" href="([^"]+)"', page)
        link = url + html.unescape(m.group(1)) if m else None
    assert seen == sorted(range(70), key=lambda i: -ifds[i])  # highest first, every scored row once, unscored out
    first = client.get(url, params={"sort": "-ifd"}).text
    assert 'class="num score-ifd">' in first and f"{max(ifds):.3f}" in first
    # "previous" from the second page returns the first page in the same order
    second = client.get(url + html.unescape(re.search(r'id="next" href="([^"]+)"', first).group(1))).text
    back = client.get(url + html.unescape(re.search(r'id="prev" href="([^"]+)"', second).group(1))).text
    assert rows(back) == seen[:50]
    low = rows(client.get(url, params={"sort": "quality_score", "max_ifd": "0.2"}).text)
    assert low == sorted([i for i in range(70) if ifds[i] <= 0.2], key=lambda i: ifds[i])
    assert client.get(url, params={"sort": "rouge"}).status_code == 400
    assert client.get(url, params={"min_ifd": "high"}).status_code == 400
