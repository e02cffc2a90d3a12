"""Prompt templates (one `.txt` file per step of the method) and their safe rendering; see render.py."""

from deeper.prompts.render import (
    PLACEHOLDERS,
    PromptSet,
    Template,
    format_comparisons,
    format_items,
    format_number,
    format_ratings,
    load_prompts,
    quote_title,
    render,
    template_names,
)

__all__ = [
    "PLACEHOLDERS",
    "PromptSet",
    "Template",
    "format_comparisons",
    "format_items",
    "format_number",
    "format_ratings",
    "load_prompts",
    "quote_title",
    "render",
    "template_names",
]
