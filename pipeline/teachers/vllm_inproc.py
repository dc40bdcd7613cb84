"""In-process vLLM (`vllm.LLM`, offline batch) for GPU boxes; install with the `vllm` extra."""

from __future__ import annotations

from typing import Callable

from pipeline.config import TeacherConfig
from pipeline.errors import ConfigError
from pipeline.teachers.base import CachedTeacher, Completion, ResponseCache, request_seed
from pipeline.teachers.ledger import Ledger


class VLLMTeacher(CachedTeacher):
    backend = "vllm"

    def __init__(self, cfg: TeacherConfig, cache: ResponseCache, ledger: Ledger):
        super().__init__(cfg.model, cache, ledger)
        self.cfg = cfg
        self._llm = None

    def _load(self):
        if self._llm is None:
            try:
                import vllm
            except ImportError:
                raise ConfigError("teacher.backend=vllm needs vLLM on a CUDA machine: pip install -e '.[vllm]'. "
                                  "Or run `vllm serve MODEL` and use backend=openai with its base_url.") from None
            self._vllm = vllm
            self._llm = vllm.LLM(model=self.model, seed=self.cfg.seed)
        return self._llm

    def _call_batch(self, items, store: Callable[[int, Completion], None]) -> None:
        llm = self._load()
        items = [(i, r, k) for i, r, k in items if self._admit(r, k)]  # the rest stay "not attempted"
        if not items:
            return
        params = [self._vllm.SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                            stop=r.stop or None, logprobs=r.logprobs or None,
                                            seed=request_seed(self.cfg.seed, k)) for _, r, k in items]
        chats = [(i, r) for i, r, _ in items if r.kind == "chat"]
        texts = [(i, r) for i, r, _ in items if r.kind == "completion"]
        index = {i: n for n, (i, _, _) in enumerate(items)}
        if chats:
            outs = llm.chat([r.messages for _, r in chats], [params[index[i]] for i, _ in chats], use_tqdm=False)
            for (i, _), out in zip(chats, outs):
                store(i, _to_completion(out))
        if texts:
            outs = llm.generate([r.prompt for _, r in texts], [params[index[i]] for i, _ in texts], use_tqdm=False)
            for (i, _), out in zip(texts, outs):
                store(i, _to_completion(out))


def _to_completion(out) -> Completion:
    best = out.outputs[0]
    return Completion(text=best.text, finish_reason=best.finish_reason or "",
                      tokens_in=len(out.prompt_token_ids or []), tokens_out=len(best.token_ids or []))
