"""The prompt grammar of the synthetic world, and its parser.

A prompt is parsed back from its text alone (no hidden metadata), so the gold rewards work on
any text: data rows, model generations, or requests sent to the Serve endpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rayalign.world.facts import ENTITIES, true_facts

ABOUT_TEMPLATES = ("tell me about the {e} .", "what do you know about the {e} ?", "describe the {e} .")
QUESTION_TEMPLATES = {
    "colour": ("what colour is the {e} ?",),
    "size": ("how big is the {e} ?",),
    "place": ("where does the {e} live ?",),
    "quality": ("what is the {e} like ?",),
}


@dataclass(frozen=True)
class Task:
    """What a prompt asks. `key` is the direct answer (None for open 'about' prompts);
    `extra` are further true sentences that make an answer more informative."""

    kind: str  # "about" | "question"
    key: str | None
    extra: tuple[str, ...]
    entity: str


def prompts_about(entity: str) -> list[str]:
    out = [t.format(e=entity) for t in ABOUT_TEMPLATES]
    for templates in QUESTION_TEMPLATES.values():
        out += [t.format(e=entity) for t in templates]
    return out


def all_prompts() -> list[str]:
    """Every prompt the grammar can produce, in a fixed order."""
    out: list[str] = []
    for e in ENTITIES:
        out += prompts_about(e)
    return out


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{e\}", r"(?P<e>[a-z]+)")
    return re.compile(pattern + r"$")


_ABOUT = [_compile(t) for t in ABOUT_TEMPLATES]
_QUESTION = [(attr, _compile(t)) for attr, ts in QUESTION_TEMPLATES.items() for t in ts]


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("?", " ?").replace(".", " .").replace("!", " !").split())


def parse_prompt(prompt: str) -> Task:
    """Parse a prompt of the grammar. Raises ValueError naming the prompt otherwise."""
    p = normalise(prompt)
    for rx in _ABOUT:
        m = rx.match(p)
        if m and m["e"] in ENTITIES:
            return Task("about", None, tuple(true_facts(m["e"]).values()), entity=m["e"])
    for attr, rx in _QUESTION:
        m = rx.match(p)
        if m and m["e"] in ENTITIES:
            facts = true_facts(m["e"])
            key = facts.pop(attr)
            return Task("question", key, tuple(facts.values()), entity=m["e"])
    raise ValueError(f"prompt is not in the synthetic world's grammar: {prompt!r}")
