"""Pixel networks with their options bound, as a model's ``pixelcnn`` option takes them in
Python (the CLI builds the same from class_path + init_args)."""

from functools import partial

from lightning_modules.backbone import GatedPixelCNN, LocalPixelCNN, PixelCNNppNet, PlainPixelCNN


def gated(**options):
    return partial(GatedPixelCNN, **options)


def plain(**options):
    return partial(PlainPixelCNN, **options)


def local(**options):
    return partial(LocalPixelCNN, **options)


def pixelcnnpp(**options):
    return partial(PixelCNNppNet, **options)
