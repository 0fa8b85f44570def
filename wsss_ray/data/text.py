"""Class prompts for CLIP-based WSSS: class names with synonyms, background word sets, templates,
and text prototypes from a frozen text tower.

CLIP-ES (and VPL after it) prompt each class with its synonyms joined in one sentence
("a clean origami person with clothes, people, human.") and keep a fixed set of background words
("ground", "sky", ...) in every softmax, so a CAM for "boat" is not also a CAM for "water". The
lists below are CLIP-ES's for VOC (25 background words) and COCO (23). The synthetic shapes world
gets its own background words, taken from the phrases its captions use.

The prompt set is chosen by the dataset's class names, so a SegSource's ``class_names`` is all a
caller needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: CLIP-ES's prompt names for the 20 VOC classes, in VOC order, verbatim (``new_class_names``
#: in CLIP-ES ``clip_text.py``: synonyms comma-joined without spaces)
VOC_PROMPTS = [
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat",
    "cow", "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor screen",
]  # fmt: skip

#: CLIP-ES's VOC background words (25, ``BACKGROUND_CATEGORY``)
VOC_BACKGROUND = [
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
]  # fmt: skip

#: CLIP-ES's COCO background words (23, ``BACKGROUND_CATEGORY_COCO``): the VOC set without
#: "keyboard" and "sign", both COCO classes
COCO_BACKGROUND = [w for w in VOC_BACKGROUND if w not in ("keyboard", "sign")]

#: CLIP-ES's prompt names for the 80 COCO classes in COCO order, verbatim
#: (``new_class_names_coco``) but for its one misspelling, "sknowboard", kept in
#: ``COCO_PROMPT_TYPOS`` (``prompts.reference_typos=true`` restores it)
COCO_PROMPTS = [
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus",
    "train", "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter",
    "bench", "bird avian", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack,bag", "umbrella,parasol", "handbag,purse", "necktie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hairdrier,blowdrier", "toothbrush",
]  # fmt: skip

#: CLIP-ES's misspelt COCO prompt names: ours -> theirs
COCO_PROMPT_TYPOS = {"snowboard": "sknowboard"}

#: the synthetic shapes world: its captions call the background "textured"/"patterned"
SYNTHETIC_BACKGROUND = ["background", "textured background", "patterned background"]

#: the CLIP-ES template
DEFAULT_TEMPLATES = ["a clean origami {}."]


def class_prompts(
    class_names: Sequence[str], reference_typos: bool = False
) -> tuple[list[str], list[str]]:
    """(prompt name per foreground class, background words) for a dataset's class names
    (index 0 = background, as every SegSource has them). VOC and COCO get CLIP-ES's lists;
    ``reference_typos`` keeps CLIP-ES's misspelt COCO names."""
    from wsss_ray.data.coco import COCO_CLASSES
    from wsss_ray.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
    from wsss_ray.data.voc import VOC_CLASSES

    names = list(class_names)
    if names == VOC_CLASSES:
        return list(VOC_PROMPTS), list(VOC_BACKGROUND)
    if names == COCO_CLASSES:
        typos = COCO_PROMPT_TYPOS if reference_typos else {}
        return [typos.get(n, n) for n in COCO_PROMPTS], list(COCO_BACKGROUND)
    if names == SYNTHETIC_CLASSES:
        return list(names[1:]), list(SYNTHETIC_BACKGROUND)
    return [n.replace("_", " ") for n in names[1:]], list(VOC_BACKGROUND)


@torch.no_grad()
def text_prototypes(
    model: torch.nn.Module,
    tokenizer,
    names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """len(names) x D: per name, the normalised mean of its normalised template embeddings
    from an open_clip model's ``encode_text``."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a {{}} for the class name: {list(templates)}")
    out = []
    for name in names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        out.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(out)
