"""The Fashion-MNIST domain's words: class names, the caption table, and the held-out phrases.

Shared by the trainers (captions to train on) and the quality benchmarks (prompts to score). The phrases in
:data:`HELD_OUT` are deliberately absent from the table: the adherence test generates from them to check that
the text encoder, not the caption table, carries a prompt to its class.
"""

from __future__ import annotations

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Per class: noun phrases with their article (each also used in the templates below) and bare forms.
NOUNS = {
    0: (["a t-shirt", "a top", "a short-sleeved shirt", "a crew neck t-shirt"], ["t-shirt", "t-shirts", "tops"]),
    1: (["a pair of trousers", "a pair of pants", "a pair of slacks"], ["trousers", "pants", "slacks"]),
    2: (["a pullover", "a sweater", "a sweatshirt", "a knitted pullover"], ["pullover", "sweaters", "knitwear"]),
    3: (["a dress", "a summer dress", "a long dress", "a frock"], ["dress", "dresses"]),
    4: (["a coat", "a jacket", "an overcoat", "a parka"], ["coat", "coats", "jackets"]),
    5: (["a sandal", "a pair of sandals", "a strappy sandal", "a summer sandal"], ["sandal", "sandals"]),
    6: (["a shirt", "a long-sleeved shirt", "a collared shirt", "a casual shirt"], ["shirt", "shirts"]),
    7: (["a sneaker", "a trainer", "a sports shoe", "a low-top sneaker"], ["sneaker", "sneakers", "trainers"]),
    8: (["a bag", "a purse", "a tote bag", "a shoulder bag"], ["bag", "bags", "purses"]),
    9: (["an ankle boot", "a short boot", "a boot", "a bootie"], ["ankle boot", "boots", "ankle boots"]),
}
TEMPLATES = ("{}", "a photo of {}", "a picture of {}", "a product photo of {}")

# One unseen phrase per class, never in the caption table (tests check): the unseen-prompt adherence test.
# tee, jeans, cardigan, gown and handbag share no word with the table; the others share their head noun.
HELD_OUT = {
    0: "tee",
    1: "jeans",
    2: "cardigan",
    3: "gown",
    4: "winter coat",
    5: "beach sandal",
    6: "button-down shirt",
    7: "running shoe",
    8: "handbag",
    9: "chelsea boot",
}
EMPTY_CAPTION = ""
P_EMPTY = 0.1  # caption dropout: share of empty captions, which trains the unconditional branch for CFG


def class_captions(label: int) -> list[str]:
    """All training phrasings of one class."""
    if label not in NOUNS:
        raise ValueError(f"label must be in 0..{len(CLASS_NAMES) - 1}, got {label!r}")
    with_article, bare = NOUNS[label]
    return [t.format(n) for n in with_article for t in TEMPLATES] + list(bare)


def caption_table() -> tuple[list[str], list[list[int]]]:
    """Every caption once (the empty caption first, index 0) and, per class, the indices of its captions."""
    captions = [EMPTY_CAPTION]
    per_class = []
    for label in range(len(CLASS_NAMES)):
        start = len(captions)
        captions += class_captions(label)
        per_class.append(list(range(start, len(captions))))
    return captions, per_class


def class_prompt(label: int) -> str:
    """The canonical prompt of a class ("an ankle boot"): the one the quality benchmark uses."""
    class_captions(label)  # validates the label
    return NOUNS[label][0][0]
