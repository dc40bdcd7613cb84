"""Ship the student: merge its LoRA adapter, write it as GGUF through the `gguf` package, and quantize it with
llama.cpp's own quantizer, so it runs wherever the teacher ran (llama.cpp, its server, Ollama).

The embedded students are llama-architecture models cut from the teacher's GGUF, so the teacher's file supplies
everything transformers does not keep (tokenizer, chat template, rope and norm settings); only the weights and the
layer count are the student's. Other students are converted with llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.errors import DistillError
from pipeline.store import atomic_write_json

log = logging.getLogger("distill")

CONVERT_HINT = ("Convert it with llama.cpp's own converter instead: `python convert_hf_to_gguf.py <merged model dir> "
                "--outtype f16` (from a llama.cpp checkout), then `llama-quantize` it.")


class ExportError(DistillError):
    """A model that cannot be exported to GGUF here; the message names the way that works."""


def quant_types() -> dict[str, int]:
    """Quantization names (lower case, as `llama-quantize` spells them) -> llama.cpp file types, from llama.cpp itself."""
    import llama_cpp

    names = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_MOSTLY_"):
            names[attr.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()] = getattr(llama_cpp, attr)
    return names


def check_quants(quants: list[str]) -> list[str]:
    """Normalised quant names; an unknown one lists the known ones."""
    known = quant_types()
    out = [q.strip().lower() for q in quants]
    bad = [q for q in out if q not in known]
    if bad:
        raise ExportError(f"Unknown quantization {', '.join(bad)}. Known: {', '.join(sorted(known))} "
                          f"(q8_0 keeps the most; q4_k_m is the usual 4-bit choice).")
    return list(dict.fromkeys(out))


def gguf_quant(path: Path) -> str | None:
    """The quantization name recorded in a GGUF's header (general.file_type), e.g. 'q4_1' for the embedded teacher."""
    return _gguf_quant(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


def quant_name(file_type: int | str | None) -> str | None:
    """A general.file_type value -> its quantization name."""
    if file_type is None:
        return None
    return {v: k for k, v in quant_types().items()}.get(int(file_type))


@functools.lru_cache(maxsize=64)
def _gguf_quant(path: str, mtime_ns: int) -> str | None:
    import gguf

    # GGUFReader parses the whole header (the vocabulary too: seconds on a busy box), hence the cache.
    field = gguf.GGUFReader(path).get_field(gguf.Keys.General.FILE_TYPE)
    return quant_name(field.contents()) if field is not None else None


def _permute(w, n_head: int):
    # transformers stores llama's q/k projections with the rotary halves split; llama.cpp expects them interleaved
    # per head. transformers' GGUF loader undoes this (reverse_permute); this is the inverse, the same reshape that
    # llama.cpp's convert_hf_to_gguf.py applies. It lives there, not in the `gguf` package, hence these lines.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_same_family(config, reader, source: Path) -> None:
    import gguf

    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    if getattr(config, "model_type", None) != "llama" or arch != "llama":
        raise ExportError(f"GGUF export here covers llama-architecture students cut from a llama GGUF; this student is "
                          f"{getattr(config, 'model_type', '?')!r} and {source.name} is {arch!r}. {CONVERT_HINT}")
    expect = {"embedding_length": config.hidden_size, "feed_forward_length": config.intermediate_size,
              "attention.head_count": config.num_attention_heads,
              "attention.head_count_kv": config.num_key_value_heads, "vocab_size": config.vocab_size}
    for key, value in expect.items():
        field = reader.get_field(f"llama.{key}")
        if field is not None and int(field.contents()) != int(value):
            raise ExportError(f"The student's {key} is {value} but {source.name} has {field.contents()}: the student "
                              f"was not cut from this GGUF, so its tokenizer and settings cannot be borrowed. Pass the "
                              f"GGUF it was cut from (--source-gguf), or: {CONVERT_HINT}")


def write_gguf(model, source_gguf: Path, out: Path, name: str | None = None) -> Path:
    """Write a merged HF llama model as an F32 GGUF, borrowing every non-weight key from the GGUF it was cut from."""
    import gguf
    import numpy as np

    config = model.config
    if getattr(config, "model_type", None) != "llama":  # before the slow header parse below
        raise ExportError(f"GGUF export here covers llama-architecture students cut from a llama GGUF; this student "
                          f"is {getattr(config, 'model_type', '?')!r}. {CONVERT_HINT}")
    reader = gguf.GGUFReader(str(source_gguf))
    _check_same_family(config, reader, source_gguf)
    n_layers = config.num_hidden_layers
    writer = gguf.GGUFWriter(str(out), "llama")
    # Copy the teacher's metadata (tokenizer, chat template, rope, norms) as gguf's own gguf_new_metadata.py does;
    # the writer adds the architecture, and the keys the student changes are set below.
    own = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION,
           gguf.Keys.LLM.BLOCK_COUNT.format(arch="llama"), gguf.Keys.General.NAME}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in own:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    source_name = reader.get_field(gguf.Keys.General.NAME)
    writer.add_name(name or f"{source_name.contents() if source_name else source_gguf.stem} student ({n_layers} layers)")
    writer.add_block_count(n_layers)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    state = model.state_dict()
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and (tied or getattr(config, "tie_word_embeddings", False)
                                            and bool((tensor == state["model.embed_tokens.weight"]).all())):
            continue  # tied to the embeddings: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"No GGUF name for tensor {hf_name!r} of the student. {CONVERT_HINT}")
        data = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize(src: Path, dst: Path, quant: str, n_threads: int | None = None) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (the C API `llama-quantize` wraps)."""
    import llama_cpp

    # llama-cpp-python forwards llama.cpp's log to stderr through this logger; its per-tensor lines are noise here.
    logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = n_threads or max(1, len(os.sched_getaffinity(0)))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (return code {rc}).")
    return dst


def export_gguf(model_dir: Path, adapter_dir: Path | None, source_gguf: Path, out_dir: Path, quants: list[str],
                stem: str = "student", name: str | None = None) -> dict[str, Any]:
    """Merge the adapter into the student, write `<stem>.<QUANT>.gguf` per quant into out_dir; returns a manifest.

    Files appear atomically (written under a temp name, then renamed); export.json beside them records sizes,
    the sources and the quantizer. An existing file from the same sources is kept (exports are resumable)."""
    from pipeline.evaluate.contenders import load_student, model_identity

    quants = check_quants(quants)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = model_identity(model_dir, adapter_dir)
    manifest_path = out_dir / f"{stem}.export.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest.get("identity") != identity:
        manifest = {"identity": identity, "files": {}}
    files = manifest["files"]
    todo = [q for q in quants if not (q in files and (out_dir / files[q]["file"]).exists())]
    if todo:
        start = time.perf_counter()
        model, _ = load_student(Path(model_dir), Path(adapter_dir) if adapter_dir else None)  # merged, as evaluated
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
            f32 = write_gguf(model, Path(source_gguf), Path(tmp) / "f32.gguf", name)
            del model
            for q in todo:
                final = out_dir / f"{stem}.{q.upper()}.gguf"
                if q == "f32":
                    shutil.copyfile(f32, Path(tmp) / "out.gguf")
                else:
                    quantize(f32, Path(tmp) / "out.gguf", q)
                os.replace(Path(tmp) / "out.gguf", final)
                files[q] = {"file": final.name, "bytes": final.stat().st_size}
                log.info("export: %s (%.1f MB)", final, final.stat().st_size / 2**20)
        manifest.update(model=str(model_dir), adapter=str(adapter_dir) if adapter_dir else None,
                        source_gguf=str(source_gguf), quantizer="llama.cpp llama_model_quantize",
                        seconds=round(time.perf_counter() - start, 1))
        atomic_write_json(manifest_path, manifest)
    return {**manifest, "paths": {q: str(out_dir / files[q]["file"]) for q in quants}}


def resolve_export_source(target: Path, source_gguf: str | None = None, base: str | None = None
                          ) -> tuple[Path, Path | None, Path, str]:
    """What `distill export-model TARGET` means: (student dir, adapter dir or None, source GGUF, file stem).

    TARGET is a run folder (or runs/champion), an adapter folder, or a full model folder."""
    from pipeline.models import resolve_gguf, resolve_student

    target = Path(target)
    if (target / "config.yaml").exists() and ((target / "adapter").is_dir() or (target / "model").is_dir()):
        from pipeline.config import load_config

        cfg = load_config(config_file=target / "config.yaml")
        if cfg.student.source != "embedded-cut" and not source_gguf:
            raise ExportError(f"The student of {target} ({cfg.student.source}) was not cut from a GGUF, so there is no "
                              f"tokenizer to borrow. Pass --source-gguf with a GGUF of the same model, or: {CONVERT_HINT}")
        student = resolve_student(cfg.student.source, cfg.student.drop_layers, cfg.student.cut_from)
        gguf_path = resolve_gguf(source_gguf or cfg.student.cut_from)
        if (target / "adapter").is_dir():
            return student, target / "adapter", gguf_path, "distilled-student"
        return target / "model", None, gguf_path, "distilled-student"
    if (target / "adapter_config.json").exists():
        base_dir = Path(base or json.loads((target / "adapter_config.json").read_text()).get("base_model_name_or_path", ""))
        if not (base_dir / "config.json").exists():
            raise ExportError(f"The adapter {target} was trained on {base_dir}, which is not here. Pass the student it "
                              f"was trained on with --base DIR.")
        return base_dir, target, resolve_gguf(source_gguf or "smollm2-135m-instruct"), "student"
    if (target / "config.json").exists():
        return target, None, resolve_gguf(source_gguf or "smollm2-135m-instruct"), "student"
    raise ExportError(f"{target} is neither a run folder (config.yaml + adapter/), an adapter folder "
                      f"(adapter_config.json) nor a model folder (config.json). Pass e.g. runs/<run-id> or runs/champion.")


def ship_champion(champion_dir: Path, run_dir: Path, quant: str | None) -> Path | None:
    """Put the new champion's GGUF in champion_dir (exported once into the run's export/, then copied), so
    runs/champion/ can be served by `distill teacher-server --model`, llama.cpp or Ollama. Returns the file, or
    None when retrain.champion_gguf is null or the student cannot be exported (logged, the promotion stands)."""
    if not quant:
        return None
    champion_dir, run_dir = Path(champion_dir), Path(run_dir)
    if not ((run_dir / "adapter" / "adapter_config.json").exists() or (run_dir / "model" / "config.json").exists()):
        log.warning("champion: %s has no peft adapter or model to export; no GGUF beside the adapter", run_dir)
        return None
    try:
        model_dir, adapter, source, stem = resolve_export_source(run_dir)
        if quant == "teacher":
            from pipeline.config import load_config
            from pipeline.models import resolve_gguf

            cfg = load_config(config_file=run_dir / "config.yaml")
            quant = (gguf_quant(resolve_gguf(cfg.teacher.model)) if cfg.teacher.backend == "llamacpp" else None) or "q8_0"
        made = export_gguf(model_dir, adapter, source, run_dir / "export", [quant], stem=stem)
    except Exception as e:  # noqa: BLE001 - the promotion is decided and stands; the missing file is logged
        log.warning("champion: no GGUF beside the adapter (%s: %s)", type(e).__name__, e)
        return None
    src = Path(made["paths"][check_quants([quant])[0]])
    target = champion_dir / src.name
    fd, tmp = tempfile.mkstemp(dir=champion_dir, prefix=".gguf-")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)  # a server never sees a half-copied file
    for old in champion_dir.glob("*.gguf"):
        if old != target:
            old.unlink()
    pointer = champion_dir / "champion.json"
    if pointer.exists():
        atomic_write_json(pointer, {**json.loads(pointer.read_text()), "gguf": str(target.resolve()),
                                    "gguf_quant": quant})
    return target
