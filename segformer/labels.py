"""Class names of the two benchmark datasets SegFormer was trained on, and ADE20K's label reduction.

Plain data, no imports: the index of a name is its training id (ADE20K after label reduction, i.e. the
150 SceneParse150 classes without "other"; Cityscapes ``labelTrainIds``).

- ``ADE20K_CLASSES``: 150 names, the order of the published ``*-finetuned-ade-*`` checkpoints.
- ``CITYSCAPES_CLASSES``: 19 names, the order of the published ``*-finetuned-cityscapes-*`` checkpoints.
"""

from __future__ import annotations

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)  # fmt: skip

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)  # fmt: skip

assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
assert len(CITYSCAPES_CLASSES) == 19 and len(set(CITYSCAPES_CLASSES)) == 19


def reduce_labels(labels, ignore_index: int = 255):
    """ADE20K's label reduction on a numpy array or a torch tensor: 0 ("other") → ``ignore_index``, k → k - 1,
    ``ignore_index`` stays. Returns a new int64 array / tensor (the dtype of labels everywhere: a loss takes
    them as they are); the input is untouched."""
    wide = labels.long() if hasattr(labels, "long") else labels.astype("int64")  # torch / numpy; no uint8 wrap
    out = wide - 1
    out[(wide == 0) | (wide == ignore_index)] = ignore_index
    return out
