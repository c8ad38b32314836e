"""marsseg: the domain library for Mars terrain segmentation.

Data, augmentation, models, losses, metrics, training and prediction. It never imports Ray:
`search/` adapts it to Ray Tune, so everything here also runs standalone.
"""

__version__ = "0.1.0"
