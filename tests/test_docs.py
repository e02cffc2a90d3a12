"""The docs say what the code does: file shapes in docs/ARCHITECTURE.md are the code's column constants, the
README's pipeline diagram names every stage of dvc.yaml, and no doc points at a file outside the repository."""

from __future__ import annotations

import importlib
import re

import yaml

from tests.conftest import REPO

ARCH = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
README = (REPO / "README.md").read_text(encoding="utf-8")


def _constant(dotted: str):
    module, name = dotted.rsplit(".", 1)
    value = getattr(importlib.import_module(module), name)
    return list(value.names) if hasattr(value, "names") else list(value)  # a pyarrow schema or a tuple


def test_every_documented_file_shape_is_the_codes_column_list():
    rows = re.findall(r"\| \[`([\w.]+)`\] ([^|]+) \|", ARCH)
    assert len(rows) >= 5
    for dotted, text in rows:
        listed = re.split(r",\s*", re.sub(r"\([^)]*\)", "", text.split(":", 1)[-1]).strip())
        names = [re.sub(r"^S1 written by .*?", "", n).split()[0] for n in listed]
        assert names == _constant(dotted), (dotted, names)


def test_the_readme_diagram_names_every_stage_in_order():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    diagram = README.split("## The pipeline", 1)[1].split("```", 2)[1]
    named = re.findall(r"[a-z_]+(?:@\S+)?", diagram)
    for stage, spec in stages.items():
        if "foreach" in spec:
            keys = spec["foreach"] if isinstance(spec["foreach"], list) else list(spec["foreach"])
            if stage == "evaluate":
                assert "evaluate@<method>" in named
                continue
            for k in keys:
                assert f"{stage}@{k}" in named, (stage, k)
        else:
            assert stage in named, stage


def test_no_doc_links_outside_the_repository():
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\]\((\.\./|/)", text), path
        assert "../shared/METHOD" not in text and "../shared/DESIGN" not in text, path
