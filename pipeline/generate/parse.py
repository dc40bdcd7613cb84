"""Small parsers from a teacher's raw reply to candidate instructions; each has its own tests."""

from __future__ import annotations

import re

_TASK_LINE = re.compile(r"^\s*Task\s*(\d+)\s*[:.)]\s*(.*)$", re.IGNORECASE)
_NUMBERED = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s+(.*)$")


def parse_completion_tasks(continuation: str, first_number: int, truncated: bool) -> list[str]:
    """Split a few-shot continuation ('<task 9>\\nTask 10: ...') into instructions.

    The first line continues the prompt's 'Task N:'; parsing stops at the first line that is not a task
    (the model drifting into prose), and the last item is dropped when the reply was cut by max_tokens.
    """
    lines = continuation.split("\n")
    items: list[str] = []
    first = lines[0].strip()
    if first:
        items.append(first)
    complete = True
    for line in lines[1:]:
        if not line.strip():
            complete = True
            break
        m = _TASK_LINE.match(line)
        if not m:
            break
        items.append(m.group(2).strip())
    else:
        complete = not truncated
    if truncated and not complete and items:
        items.pop()
    return [_clean(i) for i in items if _clean(i)]


def parse_numbered_list(reply: str, truncated: bool) -> list[str]:
    """Items of a numbered or bulleted list in a chat reply; prose around the list is ignored."""
    items = []
    for line in reply.split("\n"):
        m = _NUMBERED.match(line) or _TASK_LINE.match(line)
        if m:
            items.append(m.group(m.lastindex).strip())
    if truncated and items and not reply.rstrip().endswith((".", "?", "!")):
        items.pop()
    return [_clean(i) for i in items if _clean(i)]


def _clean(text: str) -> str:
    text = text.strip().strip('"').strip()
    text = re.sub(r"^(Instruction|Task)\s*:\s*", "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text)
