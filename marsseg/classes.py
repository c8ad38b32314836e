"""The challenge's label set and image geometry, defined once for every module."""

NUM_CLASSES = 5
BACKGROUND = 0
"""Label 0: unlabelled ground, rover parts, far terrain. The metric ignores true-0 pixels."""
SCORED_CLASSES = (1, 2, 3, 4)
BIG_ROCK = 4
"""The rare class (under 1% of pixels) that bounds the score; splits and oversampling key on it."""
CLASS_NAMES = ("background", "soil", "bedrock", "sand", "big rock")
CLASS_COLOURS = ("#000000", "#a0522d", "#7f7f7f", "#f0d264", "#3c78d8")
"""Colour per class for mask overlays (RGB hex): earthy hues, big rock in a blue that stands out."""
IMAGE_HEIGHT = 64
IMAGE_WIDTH = 128
IMAGE_SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH)
