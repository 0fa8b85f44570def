"""Noun prompts for GroupViT's multi-label loss (``loss.multi_label: N``).

GroupViT's ``WordAugTokenizeWrapper`` (``datasets/builder.py``) turns each caption into the
caption plus N prompts: N words of the caption drawn without replacement among those nltk tags
as NN, NNS, NNP, VB, VBD, VBG, VBN, VBP or VBZ (verbs included, as the reference does), each put
in one of the 80 CLIP ImageNet templates drawn at random; a caption with fewer such words is
padded with copies of itself. Two taggers (``loss.noun_tagger``):
- ``nltk``: the reference's (``nltk.word_tokenize`` + ``nltk.pos_tag``); needs nltk and its
  ``punkt_tab`` and ``averaged_perceptron_tagger_eng`` data installed (nothing is downloaded at
  run time);
- ``words`` (our approximation, for machines without nltk data): every alphabetic word of three
  or more letters that is not a stop word.
"""

from __future__ import annotations

import re

import numpy as np

#: the POS tags GroupViT keeps (word_type 'noun')
REFERENCE_TAGS = ("NN", "NNS", "NNP", "VBG", "VB", "VBD", "VBN", "VBP", "VBZ")

STOP_WORDS = frozenset(
    "the and with for from that this there these those are was were has have had its his her "
    "their our your into onto over under near next one two three some any many much more most "
    "very just than then them they she him who what which when where while also not but all "
    "each other such can will would could should may might being been does did doing".split()
)
_WORD = re.compile(r"[A-Za-z]{3,}")


def imagenet_templates() -> list[str]:
    """The 80 CLIP ImageNet templates (GroupViT's ``full_imagenet_templates``), as format
    strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def nltk_ready() -> str:
    """'' when the nltk tagger works offline, else what to install."""
    try:
        import nltk

        nltk.pos_tag(nltk.word_tokenize("a dog runs"))
    except ImportError:
        return (
            "pip install nltk, then python -m nltk.downloader punkt_tab "
            "averaged_perceptron_tagger_eng"
        )
    except LookupError:
        return "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng"
    return ""


def caption_words(caption: str, tagger: str = "nltk") -> list[str]:
    """The words of ``caption`` that may become prompts, in caption order."""
    if tagger == "nltk":
        import nltk

        return [w for w, tag in nltk.pos_tag(nltk.word_tokenize(caption)) if tag in REFERENCE_TAGS]
    if tagger == "words":
        return [w for w in _WORD.findall(caption) if w.lower() not in STOP_WORDS]
    raise ValueError(f"noun tagger {tagger!r}: nltk | words")


def noun_prompts(
    caption: str, n: int, rng: np.random.Generator, templates: list[str], tagger: str = "nltk"
) -> list[str]:
    """``[caption] + n prompts`` as GroupViT builds them."""
    words = caption_words(caption, tagger)
    prompts = []
    if words:
        picked = rng.choice(len(words), min(n, len(words)), replace=False)
        prompts = [templates[rng.integers(len(templates))].format(words[i]) for i in picked]
    return [caption] + prompts + [caption] * (n - len(prompts))
