"""The docs say what the code does. README.md stays short (the reference lives in docs/*.md, each page linked
from it), every relative link of README.md and docs/*.md reaches an existing file and heading inside the
repository, and each place where the docs once drifted from the code is derived from the code here:
- the README's stage table lists every output each stage declares in dvc.yaml (outs, metrics, plots), and
  nothing else;
- the params reference (docs/params.md) names every top-level key of params.yaml and every key a stage
  declares in dvc.yaml (`ingest.zero_ratings` among them);
- no doc hard-codes a vLLM venv path that .ci/run does not use;
- docs/ARCHITECTURE.md's cache section lists every folder the code puts under the cache root, and says where
  the response cache defaults to;
- file shapes in docs/ARCHITECTURE.md are the code's column constants; the README's diagram names every stage;
  its profile table every profile; docs/plots.md every plot of dvc.yaml;
- a README section that code, config or a prompt names (README "<section>", README: <section>) is a heading of
  README.md, and a docs/<page>.md they name (with its #anchor) exists.
Files are read when a test runs (through `REPO`), so the checks can be run on an edited copy of the tree."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from tests.conftest import REPO

KEPT_SECTION = "## Does training help here?"  # the README's one long section, not counted in its length
README_MAX_LINES = 300


def _read(rel: str) -> str:
    return (REPO / rel).read_text(encoding="utf-8")


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links and headings live there)."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def _section(text: str, heading: str) -> str:
    """From `heading` (a whole line) up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#{{1,{level}}} |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, f"no section {heading!r}"
    return match.group(1)


# ---------------------------------------------------------------- file shapes and the diagram


def _constant(dotted: str):
    module, name = dotted.rsplit(".", 1)
    value = getattr(importlib.import_module(module), name)
    return list(value.names) if hasattr(value, "names") else list(value)  # a pyarrow schema or a tuple


def test_every_documented_file_shape_is_the_codes_column_list():
    rows = re.findall(r"\| \[`([\w.]+)`\] ([^|]+) \|", _read("docs/ARCHITECTURE.md"))
    assert len(rows) >= 5
    for dotted, text in rows:
        listed = re.split(r",\s*", re.sub(r"\([^)]*\)", "", text.split(":", 1)[-1]).strip())
        names = [re.sub(r"^S1 written by .*?", "", n).split()[0] for n in listed]
        assert names == _constant(dotted), (dotted, names)


def _stages() -> dict:
    return yaml.safe_load(_read("dvc.yaml"))["stages"]


def test_the_readme_diagram_names_every_stage_in_order():
    diagram = _read("README.md").split("## The pipeline", 1)[1].split("```", 2)[1]
    named = re.findall(r"[a-z_]+(?:@\S+)?", diagram)
    for stage, spec in _stages().items():
        if "foreach" in spec:
            keys = spec["foreach"] if isinstance(spec["foreach"], list) else list(spec["foreach"])
            if stage == "evaluate":
                assert "evaluate@<method>" in named
                continue
            for k in keys:
                assert f"{stage}@{k}" in named, (stage, k)
        else:
            assert stage in named, stage


# ---------------------------------------------------------------- links and length


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = _without_code(path.read_text(encoding="utf-8"))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def _relative_links(path: Path) -> list[str]:
    return [link for link in _links(path) if not re.match(r"[a-z][a-z0-9+.-]*:", link)]  # not http:, mailto:


def test_every_relative_link_reaches_a_file_and_heading_in_the_repository():
    checked = 0
    for doc in _docs():
        for link in _relative_links(doc):
            target, _, anchor = link.partition("#")
            path = (doc.parent / target).resolve() if target else doc
            assert path.is_relative_to(REPO), (doc.name, link, "outside the repository")
            assert path.exists(), (doc.name, link, "no such file")
            if anchor:
                assert path.suffix == ".md", (doc.name, link, "an anchor into a file that is not Markdown")
                assert anchor in _anchors(path), (doc.name, link, "no such heading", sorted(_anchors(path)))
            checked += 1
    assert checked >= 20  # the check reads links at all


def test_no_doc_links_outside_the_repository():
    for doc in _docs():
        text = doc.read_text(encoding="utf-8")
        for link in _relative_links(doc):
            assert not link.startswith("/"), (doc.name, link)
            assert (doc.parent / link.partition("#")[0]).resolve().is_relative_to(REPO), (doc.name, link)
        assert "../shared/METHOD" not in text and "../shared/DESIGN" not in text, doc


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _relative_links(REPO / "README.md")}
    pages = sorted((REPO / "docs").glob("*.md"))
    assert len(pages) >= 8
    for page in pages:
        assert page.resolve() in linked, f"docs/{page.name} is not linked from README.md"


def test_the_readme_is_short():
    readme = _read("README.md")
    kept = _section(readme, KEPT_SECTION)
    assert kept.strip(), "the README lost its section 'Does training help here?'"
    counted = len(readme.splitlines()) - len((KEPT_SECTION + "\n" + kept).splitlines())
    assert counted <= README_MAX_LINES, (
        f"README.md has {counted} lines besides {KEPT_SECTION!r}: move reference to docs/"
    )


# ---------------------------------------------------------------- the stage table


def _foreach_items(spec: dict) -> list[tuple[str, object]]:
    each = spec["foreach"]
    if isinstance(each, list):
        return [(str(v), v) for v in each]
    if isinstance(each, dict):
        return [(str(k), v) for k, v in each.items()]
    # `${evaluate.methods}`: a params mapping
    node = yaml.safe_load(_read("params.yaml"))
    for part in each.strip("${}").split("."):
        node = node[part]
    return [(str(k), v) for k, v in node.items()]


def _substitute(text: str, key: str, item) -> str:
    text = text.replace("${key}", key)
    if isinstance(item, dict):
        text = re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), text)
    return text.replace("${item}", str(item))


def _entries(spec: dict, section: str) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in spec.get(section) or []]


def _declared_outputs() -> dict[str, list[tuple[str | None, list[str]]]]:
    """Per stage, each output as (its generic form `it{k}` / `<method>`, or None; its form for every item)."""
    out = {}
    for stage, spec in _stages().items():
        body = spec.get("do", spec)
        paths = [p for s in ("outs", "metrics", "plots") for p in _entries(body, s)]
        if "foreach" not in spec:
            out[stage] = [(p, [p]) for p in paths]
            continue
        items = _foreach_items(spec)
        generic = "<method>" if isinstance(spec["foreach"], str) else "{k}"
        out[stage] = [
            (
                None if "${item." in p else re.sub(r"\$\{(key|item)\}", generic, p),
                [_substitute(p, k, v) for k, v in items],
            )
            for p in paths
        ]
    return out


def _stage_table_writes() -> dict[str, list[str]]:
    """The README stage table: per stage name, the paths its rows' last column lists."""
    table = _read("README.md").split("## The pipeline", 1)[1].split("\n## ", 1)[0]
    writes: dict[str, list[str]] = {}
    for line in table.splitlines():
        row = re.match(r"\| `([a-z_]+)(?:@[^`]*)?` \|.*\| ([^|]*) \|$", line)
        if row:
            listed = [p.rstrip("/") for p in re.findall(r"`([^`]+)`", row.group(2))]
            writes.setdefault(row.group(1), []).extend(listed)
    return writes


def test_the_readme_stage_table_lists_every_output_dvc_yaml_declares():
    writes, declared = _stage_table_writes(), _declared_outputs()
    assert set(writes) == set(declared), "the table's stages are not dvc.yaml's"
    for stage, outputs in declared.items():
        assert outputs, stage
        for generic, each in outputs:
            assert generic in writes[stage] or all(p in writes[stage] for p in each), (
                f"README stage table, row {stage}: {generic or each} is not listed"
            )
    for stage, listed in writes.items():  # and nothing a stage no longer writes
        known = {p for generic, each in declared[stage] for p in (generic, *each)}
        assert set(listed) <= known, (stage, sorted(set(listed) - known))


# ---------------------------------------------------------------- the params reference


def _declared_params() -> set[str]:
    keys = set()
    for spec in _stages().values():
        body = spec.get("do", spec)
        items = _foreach_items(spec) if "foreach" in spec else [("", None)]
        entries = []
        for e in body.get("params") or []:
            entries.extend([e] if isinstance(e, str) else [k for v in e.values() for k in (v or [])])
        keys |= {_substitute(e, k, v) for e in entries for k, v in items}
    return keys


def test_the_params_reference_names_every_top_level_key_and_every_declared_key():
    doc = _read("docs/params.md")
    named = set(re.findall(r"`([\w.]+)`", doc))
    first_column = {
        k for cell in re.findall(r"^\| ([^|]+) \|", doc, re.MULTILINE) for k in re.findall(r"`(\w+)`", cell)
    }
    top = set(yaml.safe_load(_read("params.yaml")))
    assert top <= first_column, f"docs/params.md: no row for {sorted(top - first_column)}"
    assert first_column <= top, (
        f"docs/params.md: rows for keys params.yaml lacks: {sorted(first_column - top)}"
    )
    declared = _declared_params()
    assert "ingest.zero_ratings" in declared and "`ingest.zero_ratings`" in doc
    for key in declared:
        parts = key.split(".")
        covered = key in named or any(".".join(parts[:n]) in named for n in range(2, len(parts)))
        assert covered, f"docs/params.md does not name `{key}`, a key a stage declares in dvc.yaml"


# ---------------------------------------------------------------- the vLLM venv


def test_no_doc_hard_codes_a_vllm_venv_that_ci_does_not_use():
    ci = _read(".ci/run")
    default = re.search(r'VLLM_VENV="\$\{VLLM_VENV:-([^}]+)\}"', ci).group(1)
    assert '"$VLLM_VENV/bin/python" -m pytest -m vllm' in ci
    allowed = (default, default.replace("$HOME", "~"), "$VLLM_VENV", "${VLLM_VENV}")
    mentions = 0
    for doc in _docs():
        text = doc.read_text(encoding="utf-8")
        assert "/work/" not in text, (doc.name, "a path of one machine")
        for token in re.findall(r"[^\s`'\"()\[\]]*(?:venv-vllm|VLLM_VENV)[^\s`'\"()\[\]]*", text):
            token = token.removeprefix("PATH=")
            if token.startswith("${VLLM_VENV:-"):
                token = token.removeprefix("${VLLM_VENV:-").removesuffix("}")
            if token in ("VLLM_VENV=", "VLLM_VENV"):
                continue
            assert any(token == a or token.startswith(a + "/") for a in allowed), (doc.name, token, default)
            mentions += 1
        for token in re.findall(r"(?<![\w.~$}])/[\w./-]*venv[\w./-]*", text):
            raise AssertionError((doc.name, token, "an absolute venv path"))
    assert mentions >= 3


# ---------------------------------------------------------------- the caches


def _cache_folders_in_code() -> set[str]:
    pattern = re.compile(
        r'(?:cache_root\(\)|\[\s*"DEEPER_CACHE_DIR"\s*\]\)|"\.cache"\s*/\s*"deeper")\s*/\s*"([\w.-]+)"'
    )
    found = set()
    for folder in ("deeper", "stages"):
        for path in (REPO / folder).rglob("*.py"):
            found |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def _cache_section() -> str:
    arch = _read("docs/ARCHITECTURE.md")
    match = re.search(r"^- Caches live.*?(?=^- |^#|\Z)", arch, re.DOTALL | re.MULTILINE)
    assert match, "docs/ARCHITECTURE.md has no bullet '- Caches live ...'"
    return match.group(0)


def test_the_architecture_cache_section_lists_every_cache_folder_the_code_uses():
    used, section = _cache_folders_in_code(), _cache_section()
    assert {"downloads", "responses"} <= used, used  # the scan finds the code's folders at all
    listed = set(re.findall(r"^  - `([\w.-]+)/`", section, re.MULTILINE))
    assert used <= listed, f"docs/ARCHITECTURE.md's cache section lacks {sorted(used - listed)}"
    assert listed <= used, (
        f"docs/ARCHITECTURE.md's cache section lists folders no code uses: {sorted(listed - used)}"
    )


def test_the_architecture_cache_section_says_where_the_response_cache_defaults(monkeypatch, tmp_path):
    from deeper.assets import cache_root
    from deeper.llm.cache import default_cache_dir

    monkeypatch.delenv("DEEPER_CACHE_DIR", raising=False)
    monkeypatch.delenv("DEEPER_RESPONSE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    responses = _cache_section().split("`responses/`", 1)[1]
    if default_cache_dir() == cache_root() / "responses":
        assert "working directory" not in responses
    else:
        assert default_cache_dir() == tmp_path / ".cache" / "deeper" / "responses"
        assert "under the current\n    working directory, not the repo root" in responses


# ---------------------------------------------------------------- profiles and plots


def test_the_readme_profile_table_names_every_profile():
    table = _section(_read("README.md"), "## Profiles: the embedded default and the paper")
    first = [
        m
        for cell in re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE)
        for m in re.findall(r"`([\w/<>]+)`", cell)
    ]
    profiles = {p.stem for p in (REPO / "profiles").glob("*.yaml")}
    ablations = {p.stem for p in (REPO / "profiles" / "ablations").glob("*.yaml")}
    assert profiles and ablations
    assert profiles <= set(first), sorted(profiles - set(first))
    assert set(first) - {"params.yaml"} <= profiles | {"ablations/<name>"}, first
    ablation_row = next(line for line in table.splitlines() if line.startswith("| `ablations/<name>`"))
    for name in ablations:
        assert f"`{name}`" in ablation_row, name


def test_the_plots_page_names_every_plot_of_dvc_yaml():
    page = _read("docs/plots.md")
    for entry in yaml.safe_load(_read("dvc.yaml"))["plots"]:
        key = next(iter(entry)) if isinstance(entry, dict) else entry
        name = Path(key).stem if "/" in key else key
        assert f"`{name}`" in page, f"docs/plots.md does not name the plot {name}"


# ---------------------------------------------------------------- README sections named in code and config

# Where code, config and prompt comments point at the docs. results/ is left out: its params.yaml copies are the
# records of past runs, kept as they were.
_SCANNED_FOLDERS = (".ci", ".github", "bench", "deeper", "profiles", "scripts", "stages", "tests")
_SCANNED_SUFFIXES = (".py", ".yaml", ".yml", ".toml", ".txt")  # .txt: the prompt templates' # comments
_SCANNED_TOP = ("params.yaml", "dvc.yaml", "pyproject.toml", "Makefile", ".ci/run")
# README "Section", README 'Section', README's "Section", README: "Section" or README, "Section"; and
# README: Section unquoted (up to ; ) ] , or the line's end). A README with no section after it is a plain
# mention and is not checked.
_README_SECTION = re.compile(
    r"""\bREADME(?:\.md)?(?:'s)?(?:[ \t]*[:,][ \t]*|[ \t]+)(?:"(?P<dq>[^"\n]+)"|'(?P<sq>[^'\n]+)')"""
    r"""|\bREADME(?:\.md)?:[ \t]*(?P<bare>[^\s"'][^;)\],\n]*)"""
)
_PAGE_LINK = re.compile(r"(?<![\w/.])(?P<page>README\.md|docs/[\w.-]+\.md)(?:#(?P<anchor>[\w-]+))?")
# Stale references in files this test's author could not edit, each to be mended there; the test fails once the
# reference is gone, so the exception cannot outlive it.
_PENDING: set = set()


def _scanned_files() -> list[Path]:
    files = [REPO / rel for rel in _SCANNED_TOP if (REPO / rel).is_file()]
    for folder in _SCANNED_FOLDERS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in _SCANNED_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    here = Path(__file__).resolve()
    return [f for f in dict.fromkeys(files) if f.resolve() != here]


def _readme_headings() -> list[str]:
    text = re.sub(r"^```.*?^```[^\n]*$", "", _read("README.md"), flags=re.DOTALL | re.MULTILINE)
    return [h.strip() for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)]


def _names_a_readme_heading(section: str, headings: list[str]) -> bool:
    """`section` is a heading's text, or its part before a colon ("Profiles" for "Profiles: the embedded ...")."""
    want = section.strip().rstrip(".").casefold()
    return any(want in (h.casefold(), h.split(":", 1)[0].strip().casefold()) for h in headings)


def _doc_references() -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str, str | None]]]:
    """(README sections named, as (file, line, section)); (pages named, as (file, line, page, anchor))."""
    sections, pages = [], []
    for path in _scanned_files():
        rel = path.relative_to(REPO).as_posix()
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in _README_SECTION.finditer(line):
                section = (m.group("dq") or m.group("sq") or m.group("bare")).strip()
                if section:
                    sections.append((rel, lineno, section))
            for m in _PAGE_LINK.finditer(line):
                pages.append((rel, lineno, m.group("page"), m.group("anchor")))
    return sections, pages


def test_every_readme_section_and_docs_page_that_code_names_exists():
    sections, pages = _doc_references()
    headings = _readme_headings()
    missing = [
        f"{rel}:{lineno}: README has no section {section!r} (move the reference to the docs/ page that holds it)"
        for rel, lineno, section in sections
        if not _names_a_readme_heading(section, headings) and (rel, section) not in _PENDING
    ]
    for rel, lineno, page, anchor in pages:
        target = REPO / page
        if not target.is_file():
            missing.append(f"{rel}:{lineno}: no such page {page}")
        elif anchor and anchor not in _anchors(target):
            missing.append(
                f"{rel}:{lineno}: {page} has no heading #{anchor}; it has {sorted(_anchors(target))}"
            )
    assert not missing, "\n".join(missing)
    pending = {(rel, section) for rel, _, section in sections} & _PENDING
    assert pending == _PENDING, f"mended, remove from _PENDING: {sorted(_PENDING - pending)}"
    # the scan reads references at all: README sections, docs pages and anchors into them
    assert len({s for _, _, s in sections}) >= 2, sections
    assert len(pages) >= 15 and sum(anchor is not None for *_, anchor in pages) >= 4, pages


def test_the_reference_scan_tells_a_section_from_a_plain_mention():
    cases = {
        '(README "vLLM")': "vLLM",
        "(.ci/run, README 'vLLM')": "vLLM",
        'README: Paper-scale profile, "Sharing outputs")': "Paper-scale profile",
        'see README, "vLLM").': "vLLM",
        'the README\'s "Paper parity" section': "Paper parity",
        'README: "Prompt sets"': "Prompt sets",
    }
    for text, section in cases.items():
        m = _README_SECTION.search(text)
        assert m and (m.group("dq") or m.group("sq") or m.group("bare")).strip() == section, text
    for plain in (
        "see the README",
        "(deeper/serve.py, README)",
        "(hours: README)",
        "the README's test command",
        'readme = "README.md"',
        '"README").write_text(',
        "a README edit",
        '(repo / "models" / "embedded" / "README").write_text("x")',
        "README\n'vLLM'",
    ):
        assert not _README_SECTION.search(plain), plain
    headings = ["Profiles: the embedded default and the paper", "Tests and benchmarks"]
    assert _names_a_readme_heading("Profiles", headings) and _names_a_readme_heading(
        "tests and benchmarks", headings
    )
    assert not _names_a_readme_heading("vLLM", headings) and not _names_a_readme_heading(
        "Paper parity", headings
    )
