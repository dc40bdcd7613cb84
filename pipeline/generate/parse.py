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


# --- classification identification and instances (Self-Instruct, steps 2 and 3) ---------------------------

_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_FIELD = re.compile(r"^\s*(?:[-*]\s*)?(Input|Output|Class label|Label)\s*:\s*(.*)$", re.IGNORECASE)


def parse_is_classification(reply: str) -> bool | None:
    """'Yes'/'No' at the start of the reply (after 'Is it classification?'); None when it says neither."""
    m = _YES_NO.match(reply.strip())
    return None if m is None else m.group(1).lower() == "yes"


def _fields(reply: str) -> list[tuple[str, str]]:
    """(field name, text) pairs, where a field's text runs until the next field or 'Task:' line."""
    out: list[tuple[str, str]] = []
    for line in reply.split("\n"):
        if re.match(r"^\s*(Task|Example)\b.*:", line, re.IGNORECASE) and out:
            break  # the model started another task or example: keep only the first
        m = _FIELD.match(line)
        if m:
            name = m.group(1).lower()
            out.append(("output" if name in ("label", "class label") else name, m.group(2)))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
    return [(k, v.strip()) for k, v in out]


def _noinput(text: str) -> str:
    return "" if text.strip().lower() in ("", "<noinput>", "none", "n/a", "no input", "(none)") else text.strip()


def parse_input_first(continuation: str, truncated: bool) -> tuple[str, str] | None:
    """Input-first instance from a reply continuing 'Task: ...\\nInput:': the input, then 'Output:'.

    Returns (input, output), '' for '<noinput>'. A reply cut by max_tokens inside its output is not
    trusted (the output would be half an answer); a reply with no 'Output:' is not an instance.
    """
    # The prompt ends with 'Input:'; a chat reply may repeat the field name, a continuation will not.
    first_line = continuation.lstrip().split("\n", 1)[0]
    fields = _fields(continuation if _FIELD.match(first_line) else "Input:" + continuation)
    inp, out, at = "", None, -1
    for at, (name, text) in enumerate(fields):
        if name == "input":
            inp = text
        elif name == "output":
            out = text
            break
    # Cut by max_tokens is harmless if the model had already moved on to another field after the output.
    if out is None or not out.strip() or (truncated and at == len(fields) - 1):
        return None
    return _noinput(inp), out.strip()


def parse_output_first(continuation: str, truncated: bool) -> tuple[str, str] | None:
    """Output-first instance from a reply continuing 'Task: ...\\nClass label:': the label, then 'Input:'.

    Returns (input, output=label). Without an input the label alone is an instance only if the task
    needs no input, which a parser cannot know; such replies return ('', label) and curation decides.
    """
    text = continuation.lstrip()
    m = _FIELD.match(text.split("\n", 1)[0])
    if m and m.group(1).lower() in ("class label", "label"):  # a chat reply that repeats the field name
        text = m.group(2) + text[len(text.split("\n", 1)[0]):]
    lines = text.split("\n")
    label = lines[0].strip()
    rest = _fields("\n".join(lines[1:]))
    inp = next((t for n, t in rest if n == "input"), "")
    if not label or (truncated and inp and rest and rest[-1][0] == "input"):
        return None
    return _noinput(inp), label


# --- Alpaca: '###'-separated numbered instruction/input/output triples ------------------------------------

_ALPACA_SPLIT = re.compile(r"^\s*\d+\s*[.)]\s*(Instruction|Input|Output)\s*:", re.IGNORECASE | re.MULTILINE)
_ALPACA_BLOCK = re.compile(r"^[ \t]*###+[ \t]*|(?=^\s*\d+\s*[.)]\s*Instruction\s*:)", re.IGNORECASE | re.MULTILINE)


def parse_alpaca_triples(continuation: str, truncated: bool) -> list[tuple[str, str, str]]:
    """Alpaca's format: blocks split on '###', each '<n>. Instruction:/Input:/Output:'.

    The prompt ends with '<n>. Instruction:', so the first block has no field name before its
    instruction. Small models drop the '###' lines, so a new '<n>. Instruction:' also starts a block.
    Blocks missing an instruction or output are skipped (a missing input means none); the last block
    is dropped when the reply was cut by max_tokens.
    """
    blocks = _ALPACA_BLOCK.split("1. Instruction:" + continuation)
    if truncated:
        blocks = blocks[:-1]
    triples = []
    for block in blocks:
        parts = _ALPACA_SPLIT.split(block)
        # parts: [before, 'Instruction', text, 'Input', text, 'Output', text]
        named = {parts[j].lower(): parts[j + 1].strip() for j in range(1, len(parts) - 1, 2)}
        if "instruction" not in named or "output" not in named:
            continue
        instruction = _clean(named["instruction"])
        output = named["output"].strip()
        if instruction and output:
            triples.append((instruction, _noinput(named.get("input", "")), output))
    return triples


# --- Magpie: the user's turn the model wrote after the template's opening ---------------------------------

def parse_magpie_query(continuation: str, truncated: bool) -> str | None:
    """The user request a model wrote after its chat template's user-turn opening; None if empty or cut."""
    text = continuation.strip()
    if not text or truncated:
        return None
    return text
