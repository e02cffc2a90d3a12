"""Prompt templates as files, rendered so that no title (or persona) can break them.

A template file (`deeper/prompts/<name>.txt`) is:

    # comment lines, only above the first section
    === system ===          (optional)
    text with {{placeholders}}
    === user ===            (required)
    text with {{placeholders}}
    === prefill ===         (predict_item only: a JSON string that opens the answer, e.g. "Rating: ")

Rules that keep rendering safe:
- Placeholders are `{{name}}` with a name from `PLACEHOLDERS[template]`. At load time every template must use
  each of its names and no other; a stray `{{` or `}}` is an error too (all ConfigError naming the file).
- Substitution is one `re.sub` pass over the template text: substituted values are never scanned again, so a
  title containing "{{persona}}" or "{x}" stays text.
- Values are typed by placeholder name: `ratings`, `items`, `item` and `comparisons` take titles (and
  numbers) and render one item per line, each title folded to one line and quoted as a JSON string (quotes,
  backslashes escaped); a set whose set.yaml says `lists: authors` renders them as the DEEPER authors' scripts
  did (Python dicts / lists, titles quoted by repr). Free text (`persona`, ...) keeps its line breaks.
- Every value loses byte-order marks and control characters (spaces instead), and chat-control markers of the `<|...|>` family
  (ChatML's <|im_start|>, Llama 3's <|eot_id|>, ...) are broken apart ("<|" -> "< |"), so a
  value cannot open a new chat turn even in a backend whose tokenizer parses special tokens inside text.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from deeper.errors import ConfigError, first_line

Chat = list[dict]

TEMPLATE_DIR = Path(__file__).resolve().parent
# params `prompts`: which set of templates every stage renders. tuned: this folder's (worded for small models:
# a system turn, explicit instructions); published: the paper's Appendix A tables as they are (one user message).
PROMPT_SETS = {
    "tuned": TEMPLATE_DIR,
    "published": TEMPLATE_DIR / "published",
    # the learning check's world (deeper/diagnostic.py): the tuned set, with a refine prompt that asks for tastes
    "diagnostic": TEMPLATE_DIR / "diagnostic",
}

# The names each template must use (all of them) and may use (no others).
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "init": frozenset({"item_type", "ratings"}),
    "predict": frozenset({"item_type", "persona", "items"}),
    "predict_item": frozenset({"item_type", "persona", "item"}),
    "refine": frozenset({"item_type", "old_persona", "comparisons"}),
    "incupdate": frozenset({"item_type", "old_persona", "ratings"}),
    "hiermerge_short": frozenset({"item_type", "ratings"}),
    "hiermerge_merge": frozenset({"item_type", "long_term_persona", "short_term_persona"}),
    "fullregen": frozenset({"item_type", "ratings"}),
    "slideregen": frozenset({"item_type", "ratings"}),
}
# Names a template may leave out: the paper's HierMerge merge prompt (Table 10, prompt 2) names no item type.
OPTIONAL: dict[str, frozenset[str]] = {"hiermerge_merge": frozenset({"item_type"})}
# Templates whose answer is opened by a prefill (logprob prediction); other templates may not have one.
NEEDS_PREFILL = frozenset({"predict_item"})

SECTIONS = ("system", "user", "prefill")
_SECTION_RE = re.compile(r"^=== (\w+) ===[ \t]*$")
_PLACEHOLDER_RE = re.compile(r"\{\{([a-z_]+)\}\}")
# Chat-control markers of the <|...|> family cannot form once every "<|" in a value is broken apart.
_MARKER_OPEN, _MARKER_BROKEN = "<|", "< |"


# ---------------------------------------------------------------- value formatting (one place for all prompts)


def _clean(text: str, keep_lines: bool) -> str:
    """Drop byte-order marks; control characters become spaces (or line breaks, where lines are kept)."""
    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch == "\ufeff":
            continue
        kind = unicodedata.category(ch)
        if keep_lines and (ch in "\n\r" or kind in ("Zl", "Zp")):
            out.append("\n")
        elif keep_lines and ch == "\t":
            out.append(ch)
        elif kind in ("Cc", "Zl", "Zp"):
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _defuse_markers(text: str) -> str:
    return text.replace(_MARKER_OPEN, _MARKER_BROKEN)


def _require_text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}: {value!r}")
    return value


def one_line(value) -> str:
    """A title or label as one clean line: line breaks, tabs and other control characters become spaces."""
    return _defuse_markers(" ".join(_clean(_require_text(value), keep_lines=False).split()))


def free_text(value) -> str:
    """Multi-line text (a persona): line breaks kept (as \\n), other control characters become spaces."""
    return _defuse_markers(_clean(_require_text(value), keep_lines=True).strip())


def quote_title(title) -> str:
    """The title as a JSON string: one line, quotes and backslashes escaped, unicode kept readable."""
    return json.dumps(one_line(title), ensure_ascii=False)


def format_number(value) -> str:
    """A rating for a prompt: 4 -> "4", 3.5 -> "3.5", 3.4721 -> "3.5" (one decimal is all a reader needs)."""
    x = float(value)
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"a rating in a prompt must be a finite number, got {value!r}")
    return f"{round(x, 1):.1f}".removesuffix(".0")


def format_items(titles: Iterable[str]) -> str:
    return "\n".join(f"{i}. {quote_title(t)}" for i, t in enumerate(titles, 1))


def format_ratings(pairs: Iterable[tuple[str, float]]) -> str:
    return "\n".join(f"{i}. {quote_title(t)}: {format_number(r)}" for i, (t, r) in enumerate(pairs, 1))


def format_comparisons(rows: Iterable[tuple[str, float, float]]) -> str:
    return "\n".join(
        f"{i}. {quote_title(t)}: predicted {format_number(p)}, actual {format_number(a)}"
        for i, (t, p, a) in enumerate(rows, 1)
    )


# The DEEPER authors' rendering of the same lists (their prompt scripts, github.com/sheep333c/DEEPER,
# dynamic_persona_modeling/): a window's ratings as one Python dict a line (`str({"item_name": ..., "user_rating":
# ...})`; the update prompt adds "predict_rating"), the initial persona's as JSON lines keyed "item", the items to
# predict as one Python list. A rating prints as the number it is (5, 3.5): their Amazon and Food.com windows hold
# integers; MovieLens's whole stars, floats in their files ("4.0"), print as "4" here (the database keeps floats).


def _authors_number(value):
    x = float(format_number(value))
    return int(x) if x.is_integer() else x


def authors_items(titles: Iterable[str]) -> str:
    return repr([one_line(t) for t in titles])


def authors_ratings(pairs: Iterable[tuple[str, float]]) -> str:
    return "\n".join(str({"item_name": one_line(t), "user_rating": _authors_number(r)}) for t, r in pairs)


def authors_init_ratings(pairs: Iterable[tuple[str, float]]) -> str:
    return "\n".join(
        json.dumps({"item": one_line(t), "user_rating": _authors_number(r)}, ensure_ascii=False)
        for t, r in pairs
    )


def authors_comparisons(rows: Iterable[tuple[str, float, float]]) -> str:
    return "\n".join(
        str(
            {
                "item_name": one_line(t),
                "user_rating": _authors_number(a),
                "predict_rating": _authors_number(p),
            }
        )
        for t, p, a in rows
    )


# How each placeholder's value is turned into text, per list style (a set's set.yaml names its style; default
# numbered); names not listed are free text.
_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "item_type": one_line,
    "item": quote_title,
    "items": format_items,
    "ratings": format_ratings,
    "comparisons": format_comparisons,
}
_AUTHORS: dict[str, Callable[[Any], str]] = {
    **_FORMATTERS,
    "items": authors_items,
    "ratings": authors_ratings,
    "comparisons": authors_comparisons,
}
LIST_STYLES = ("numbered", "authors")
SET_FILE = "set.yaml"  # a set folder's own settings: `lists` (LIST_STYLES), `extends` (a set in PROMPT_SETS)


def format_value(name: str, value, lists: str = "numbered", template: str = "") -> str:
    if lists == "authors":
        formatter = (
            authors_init_ratings if (template, name) == ("init", "ratings") else _AUTHORS.get(name, free_text)
        )
    else:
        formatter = _FORMATTERS.get(name, free_text)
    text = formatter(value)
    if name in ("items", "ratings", "comparisons") and not text:
        raise ValueError(f"{{{{{name}}}}}: the list is empty")
    return text


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    sections: dict[str, str]  # role -> text with placeholders ("system" optional, "user" always)
    prefill: str | None = None
    lists: str = "numbered"  # how lists of titles and ratings are rendered (LIST_STYLES)

    def render(self, **values) -> Chat:
        expected = PLACEHOLDERS[self.name]
        given = set(values)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise ValueError(f"prompt {self.name}: missing values {missing}, unknown values {extra}")
        texts = {name: format_value(name, value, self.lists, self.name) for name, value in values.items()}
        return [
            {"role": role, "content": _PLACEHOLDER_RE.sub(lambda m: texts[m.group(1)], text)}
            for role, text in self.sections.items()
        ]


def parse_template(name: str, path: Path) -> Template:
    """Read and check one template file; every problem is a ConfigError naming the file."""
    where = str(path)
    if name not in PLACEHOLDERS:
        raise ConfigError(
            "(template)", f"unknown template name {name!r}; known: {sorted(PLACEHOLDERS)}", where
        )
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("(file)", "prompt template missing", where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("(file)", f"unreadable: {e}", where) from None

    sections: dict[str, list[str]] = {}
    current = None
    for lineno, line in enumerate(raw.splitlines(), 1):
        marker = _SECTION_RE.match(line)
        if marker:
            current = marker.group(1)
            if current not in SECTIONS:
                raise ConfigError(
                    f"line {lineno}", f"unknown section {current!r}; known: {list(SECTIONS)}", where
                )
            if current in sections:
                raise ConfigError(f"line {lineno}", f"section {current!r} appears twice", where)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ConfigError(f"line {lineno}", "text before the first section must be a # comment", where)
    texts = {role: "\n".join(lines).strip("\n") for role, lines in sections.items()}

    if not texts.get("user", "").strip():
        raise ConfigError("user", "the template needs a non-empty '=== user ===' section", where)
    prefill = None
    if "prefill" in texts:
        if name not in NEEDS_PREFILL:
            raise ConfigError("prefill", f"only {sorted(NEEDS_PREFILL)} take a prefill", where)
        try:
            prefill = json.loads(texts.pop("prefill"))
        except json.JSONDecodeError:
            prefill = None
        if not isinstance(prefill, str) or not prefill.strip():
            raise ConfigError("prefill", 'must be one non-empty JSON string, e.g. "Rating: "', where)
    elif name in NEEDS_PREFILL:
        raise ConfigError("prefill", "this template needs a '=== prefill ===' section", where)

    used: set[str] = set()
    for role, text in texts.items():
        for found in _PLACEHOLDER_RE.findall(text):
            if found not in PLACEHOLDERS[name]:
                raise ConfigError(
                    f"{{{{{found}}}}}",
                    f"unknown placeholder in {role}; {name} knows {sorted(PLACEHOLDERS[name])}",
                    where,
                )
            used.add(found)
        leftover = _PLACEHOLDER_RE.sub("", text)
        if "{{" in leftover or "}}" in leftover:
            found_bad = re.search(r"\{\{[^\n]{0,30}|[^\n]{0,30}\}\}", leftover)
            assert found_bad is not None  # leftover holds "{{" or "}}", which the pattern matches
            bad = found_bad.group(0)
            raise ConfigError(
                role, f"malformed placeholder near {bad!r}; write {{{{name}}}} in lower case", where
            )
    missing = PLACEHOLDERS[name] - used - OPTIONAL.get(name, frozenset())
    if missing:
        raise ConfigError(
            ", ".join(f"{{{{{m}}}}}" for m in sorted(missing)),
            f"placeholder missing from template {name}",
            where,
        )
    ordered = {role: texts[role] for role in ("system", "user") if role in texts}
    return Template(name=name, path=path, sections=ordered, prefill=prefill)


def read_set_file(path: Path) -> tuple[str, str | None]:
    """(list style, the set it extends) from a set folder's set.yaml; ("numbered", None) where there is none."""
    import yaml

    if not path.exists():
        return "numbered", None
    try:
        block = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError("(file)", f"unreadable: {first_line(e)}", str(path)) from None
    if not isinstance(block, dict) or set(block) - {"lists", "extends"}:
        raise ConfigError("(set)", "must be a mapping with the keys lists and extends only", str(path))
    lists, extends = block.get("lists", "numbered"), block.get("extends")
    if lists not in LIST_STYLES:
        raise ConfigError("lists", f"must be one of {', '.join(LIST_STYLES)}, got {lists!r}", str(path))
    if extends is not None and extends not in PROMPT_SETS:
        raise ConfigError("extends", f"must be one of {', '.join(PROMPT_SETS)}, got {extends!r}", str(path))
    return lists, extends


class PromptSet:
    """All templates of one directory, loaded and checked up front (so a bad file fails before any LLM call)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else TEMPLATE_DIR
        self.lists, extends = read_set_file(self.directory / SET_FILE)
        # a set that extends another holds only the templates it changes; the rest are the other set's
        base = PromptSet(PROMPT_SETS[extends]) if extends is not None else None
        self.templates: dict[str, Template] = {}
        for name in PLACEHOLDERS:
            path = self.directory / f"{name}.txt"
            template = parse_template(name, path) if base is None or path.exists() else base.templates[name]
            self.templates[name] = replace(template, lists=self.lists)

    def __getitem__(self, name: str) -> Template:
        if name not in self.templates:
            raise KeyError(f"no prompt template {name!r}; known: {sorted(self.templates)}")
        return self.templates[name]

    def render(self, name: str, **values) -> Chat:
        return self[name].render(**values)

    def prefill(self, name: str) -> str:
        prefill = self[name].prefill
        if prefill is None:
            raise KeyError(f"prompt template {name!r} has no prefill")
        return prefill


@cache
def _load_cached(directory: str) -> PromptSet:
    return PromptSet(directory)


def load_prompts(directory: str | Path | None = None) -> PromptSet:
    """The templates of `directory` (default: the package's own), loaded once per process."""
    return _load_cached(str(Path(directory).resolve() if directory is not None else TEMPLATE_DIR))


def prompts_from_params(params: dict) -> PromptSet:
    """The template set params `prompts` names (tuned | published), loaded and checked."""
    from deeper.config import get

    name = get(params, "prompts", "tuned")
    if name not in PROMPT_SETS:
        raise ConfigError("prompts", f"must be one of {', '.join(PROMPT_SETS)}, got {name!r}")
    return load_prompts(PROMPT_SETS[name])


def render(name: str, **values) -> Chat:
    """Render one of the package's templates: `render("init", item_type="movie", ratings=[(title, 4), ...])`."""
    return load_prompts().render(name, **values)


def template_names() -> Sequence[str]:
    return tuple(PLACEHOLDERS)
