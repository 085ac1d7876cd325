"""The knowledge of the synthetic world: entities, their attributes, and the sentence catalogue.

Everything here is plain data. The world is small on purpose: a tiny model can learn its
language in a minute of CPU pre-training, and every response can be parsed back into
sentences whose truth is known, which is what makes gold rewards exact.
"""

from __future__ import annotations

# entity -> (colour, size, place, quality). Each attribute yields one true fact sentence.
ENTITIES: dict[str, tuple[str, str, str, str]] = {
    "apple": ("red", "small", "garden", "sweet"),
    "lemon": ("yellow", "small", "garden", "sour"),
    "whale": ("blue", "huge", "sea", "slow"),
    "shark": ("gray", "big", "sea", "fast"),
    "frog": ("green", "small", "river", "loud"),
    "bear": ("brown", "big", "forest", "strong"),
    "owl": ("brown", "small", "forest", "quiet"),
    "cat": ("black", "small", "house", "soft"),
    "dog": ("white", "big", "house", "loyal"),
    "camel": ("yellow", "big", "desert", "patient"),
    "snake": ("green", "long", "desert", "quiet"),
    "eagle": ("brown", "big", "sky", "fast"),
    "cloud": ("white", "huge", "sky", "soft"),
    "cow": ("black", "big", "farm", "slow"),
    "duck": ("white", "small", "river", "loud"),
    "tomato": ("red", "small", "farm", "sour"),
    "fox": ("orange", "small", "forest", "clever"),
    "horse": ("brown", "big", "farm", "fast"),
    "mouse": ("gray", "tiny", "house", "quiet"),
    "carrot": ("orange", "small", "garden", "sweet"),
    "pig": ("pink", "big", "farm", "loud"),
    "crab": ("red", "small", "sea", "slow"),
    "lion": ("yellow", "big", "desert", "strong"),
    "bee": ("yellow", "tiny", "garden", "busy"),
}

ATTRIBUTES = ("colour", "size", "place", "quality")
VALUES: dict[str, tuple[str, ...]] = {
    attr: tuple(sorted({e[i] for e in ENTITIES.values()})) for i, attr in enumerate(ATTRIBUTES)
}


def fact(entity: str, attr: str, value: str) -> str:
    """The canonical sentence (without the final full stop) stating one attribute."""
    if attr == "place":
        return f"the {entity} lives in the {value}"
    return f"the {entity} is {value}"


def true_facts(entity: str) -> dict[str, str]:
    return {a: fact(entity, a, v) for a, v in zip(ATTRIBUTES, ENTITIES[entity])}


def false_facts(entity: str, attr: str) -> list[str]:
    truth = ENTITIES[entity][ATTRIBUTES.index(attr)]
    return [fact(entity, attr, v) for v in VALUES[attr] if v != truth]


# Style sentences. Friendly ones raise the friendliness objective, rude ones lower it,
# filler only costs length. Distinct friendly sentences count once each.
FRIENDLY = (
    "happy to help",
    "great question",
    "thanks for asking",
    "i hope this helps",
    "have a nice day",
)
RUDE = (
    "that is obvious",
    "do not ask me again",
    "what a silly question",
)
FILLER = (
    "let me think",
    "well",
    "so",
    "here is what i know",
    "i think",
)
