"""OpenAI Batch API backend: submit a batch's requests as one JSONL job (half price, results within hours), poll,
collect. The batch id is stored in the response cache, so a killed run resumes polling the same job."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import openai
from pydantic import SecretStr

from pipeline.config import TeacherConfig
from pipeline.teachers.base import CachedTeacher, Completion, Request, ResponseCache, request_seed
from pipeline.teachers.ledger import Ledger
from pipeline.teachers.openai_compat import completion_from_json, endpoint, request_body
from pipeline.teachers.secrets import redact, client_api_key

DONE = {"completed", "failed", "expired", "cancelled"}


class OpenAIBatchTeacher(CachedTeacher):
    backend = "openai-batch"

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger):
        super().__init__(cfg.model, cache, ledger)
        self.cfg = cfg
        # Held as a SecretStr (a repr or log of this object shows '**********'), handed only to the HTTP client.
        self._api_key = SecretStr(client_api_key(cfg))

    def _client(self) -> openai.OpenAI:
        return openai.OpenAI(api_key=self._api_key.get_secret_value(), base_url=self.cfg.base_url,
                             max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s)

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        # One job per endpoint: a Batch API job serves a single URL.
        by_endpoint: dict[str, list[tuple[int, Request, str]]] = {}
        for item in items:
            by_endpoint.setdefault(endpoint(item[1]), []).append(item)
        with self._client() as client:
            for path, group in by_endpoint.items():
                try:
                    self._run_job(client, path, group, store)
                except openai.OpenAIError as e:  # the job could not be submitted or read: every item failed
                    message = redact(f"{type(e).__name__}: {e}", self._api_key.get_secret_value())
                    for i, _, _ in group:
                        store(i, Completion(error=message))

    def _run_job(self, client: openai.OpenAI, path: str, group, store) -> None:
        start = time.perf_counter()
        tag = hashlib.sha256((path + "\n" + "\n".join(sorted(k for _, _, k in group))).encode()).hexdigest()
        batch_id = self.cache.pending_batch(tag)
        batch = client.batches.retrieve(batch_id) if batch_id else None
        hold = f"batch:{tag}"  # one hold per job: a resumed run takes over the hold of the job it resumes
        if batch is None or batch.status in {"failed", "expired", "cancelled"}:
            # A job is paid for as a whole once submitted: refuse one whose worst case (every request using its
            # max_tokens) would cross what is left of the run's budget, before anything is uploaded.
            if self.ledger.reserve([req for _, req, _ in group], hold_id=hold) is None:
                self.ledger.check_budget()  # raises BudgetExceeded, saying what the job could cost and what is left
            lines = [json.dumps({"custom_id": key, "method": "POST", "url": "/v1" + path,
                                 "body": request_body(self.model, req, request_seed(self.cfg.seed, key))})
                     for _, req, key in group]
            try:
                upload = client.files.create(file=("distill-batch.jsonl", ("\n".join(lines) + "\n").encode()),
                                             purpose="batch")
                batch = client.batches.create(input_file_id=upload.id, endpoint="/v1" + path,
                                              completion_window=self.cfg.batch_completion_window)
            except BaseException:
                self.ledger.release(hold)  # never submitted: nothing to pay for
                raise
            self.cache.remember_batch(tag, batch.id)  # before waiting: a kill from here on resumes this job
        else:
            self.ledger.reserve([req for _, req, _ in group], hold_id=hold, check=False)  # already committed
        while batch.status not in DONE:
            time.sleep(self.cfg.batch_poll_s)
            batch = client.batches.retrieve(batch.id)

        results: dict[str, dict] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                for line in client.files.content(file_id).text.splitlines():
                    if line.strip():
                        row = json.loads(line)
                        results[row["custom_id"]] = row
        latency = (time.perf_counter() - start) / max(1, len(group))
        for i, req, key in group:
            store(i, _completion(req, results.get(key), batch.status, latency))
        self.ledger.release(hold)  # every item is now in the ledger at its real cost
        self.cache.forget_batch(tag)


def _completion(req: Request, row: dict | None, status: str, latency: float) -> Completion:
    if row is None:
        return Completion(error=f"missing from the Batch API output (batch {status})", latency_s=latency)
    response = row.get("response") or {}
    if row.get("error") or response.get("status_code") != 200:
        err = row.get("error") or (response.get("body") or {}).get("error") or {}
        return Completion(error=f"batch item failed: {err.get('code', '')} {err.get('message', '')}".strip(),
                          latency_s=latency)
    try:
        return completion_from_json(req, response["body"]).model_copy(update={"latency_s": latency})
    except (KeyError, IndexError, TypeError) as e:
        return Completion(error=f"unreadable batch item: {type(e).__name__}: {e}", latency_s=latency)
