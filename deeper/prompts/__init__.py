"""Prompt templates (one `.txt` file per step of the method) and their safe rendering; see render.py."""

from deeper.prompts.render import (
    PLACEHOLDERS,
    PROMPT_SETS,
    PromptSet,
    Template,
    format_comparisons,
    format_items,
    format_number,
    format_ratings,
    load_prompts,
    prompts_from_params,
    quote_title,
    render,
    template_names,
)

__all__ = [
    "PLACEHOLDERS",
    "PROMPT_SETS",
    "PromptSet",
    "Template",
    "format_comparisons",
    "format_items",
    "format_number",
    "format_ratings",
    "load_prompts",
    "prompts_from_params",
    "quote_title",
    "render",
    "template_names",
]
