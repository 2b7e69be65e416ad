"""Train a reference CIFAR-10 ViT on the CPU: `python -m compress.zoo.train_reference`.

Recipe (chosen for a short CPU budget): AdamW, linear warm-up then cosine decay, label
smoothing 0.1, random crop (reflect pad 4) + horizontal flip applied to whole uint8
batches, bf16 autocast on CPUs that support it. Seeded; checkpoints every epoch and
resumes from the last one; logs train loss and full test-set top-1 per epoch (the final
weights are taken as they are: the test set is never used to pick an epoch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from calibration_data import load_cifar10
from cliutil import atomic_path, write_json
from compress.zoo import reference
from compress.zoo.reference import CIFAR10_MEAN, CIFAR10_STD


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.zoo.train_reference", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_cifar_ref", choices=sorted(reference.ARCHS))
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 even if the CPU has bf16")
    p.add_argument("--work-dir", type=Path, default=Path("runs/reference"),
                   help="checkpoints and the per-epoch log")
    p.add_argument("--out", type=Path, default=None,
                   help="final safetensors (default: compress/zoo/weights/<arch>.safetensors)")
    return p


def _normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the reflect-padded batch and random horizontal flip (NCHW)."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    idx = torch.arange(32)
    rows = (dy[:, None] + idx[None, :])[:, None, :, None].expand(n, 3, 32, 40)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + idx[None, :])[:, None, None, :].expand(n, 3, 32, 32)
    out = torch.gather(out, 3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(_normalize(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _bf16_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    xtr, ytr = (torch.from_numpy(a) for a in load_cifar10("train"))
    xte, yte = (torch.from_numpy(a) for a in load_cifar10("test"))
    model = reference.build(args.arch)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    use_bf16 = _bf16_ok() and not args.no_bf16

    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work_dir / f"{args.arch}.last.pt"
    log_path = args.work_dir / f"{args.arch}.log.json"
    gen = torch.Generator().manual_seed(args.seed)
    history, start_epoch = [], 0
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        print(f"resumed {args.arch} at epoch {start_epoch}", file=sys.stderr)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xtr), generator=gen)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=5)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr)
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(_normalize(xtr[idx]), gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if i % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        acc = evaluate(model, xte, yte)
        history.append(dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), test_top1=acc,
                            seconds=time.perf_counter() - t0))
        print(json.dumps(history[-1]), file=sys.stderr, flush=True)
        with atomic_path(ckpt_path) as tmp:
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), gen=gen.get_state(),
                            history=history, epoch=epoch + 1), tmp)
        write_json(log_path, dict(args={k: str(v) for k, v in vars(args).items()}, bf16=use_bf16, history=history),
                   indent=1)

    out = args.out or reference.weights_path(args.arch)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"arch": args.arch, "epochs": str(args.epochs), "seed": str(args.seed),
                            "test_top1": f"{history[-1]['test_top1']:.4f}"})
    return dict(weights=str(out), history=history)


def main(argv: list[str] | None = None) -> int:
    result = train(get_parser().parse_args(argv))
    print(json.dumps(dict(weights=result["weights"], test_top1=result["history"][-1]["test_top1"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
