"""Regenerate the sample checkpoints: data, training, and the held-out batch, deterministically.

    .venv/bin/python sample_checkpoints/make_samples.py          (about a minute or two on 2 cores)

The data is generated here (no downloads): 32x32 RGB images of six shape classes (disc, square,
triangle, horizontal bar, vertical bar, cross) with random position, size, colours and noise.
Three small networks are trained for real on it, one per fuser, and written the way their real
training scripts write checkpoints:

- vanillanet_tiny.pth  VanillaNet (vanillanet_5 layout at 1/16 width) with deep training:
                       leaky_relu slope annealed 0 -> 1 over `decay_epochs`, then trained on;
                       layout of huawei-noah/VanillaNet main.py ({model, model_ema, optimizer,
                       epoch, scaler, args}).
- repvgg_tiny.pth.tar  RepVGG (4 stages, blocks 1,2,2,1) saved as DingXiaoH/RepVGG's DDP
                       train.py does ({epoch, arch, state_dict with `module.` prefixes,
                       best_acc1, optimizer}).
- test_efficientnet.pth.tar  timm's test_efficientnet (BatchNormAct2d, depthwise, SE) saved as
                       timm's train.py does ({epoch, arch, state_dict, state_dict_ema, optimizer,
                       version, args, metric}).
- heldout.safetensors  256 held-out images (normalized, float16) and their labels, for
                       `repfuse verify --inputs`.
- heldout_images/      the same 256 held-out images as 8-bit PNG files in class folders named so
                       that they sort in training order (`0_disc` ... `5_cross`), for
                       `repfuse verify --inputs DIR` with each model's own evaluation transform.

Each checkpoint records in `args` how it was trained, including its evaluation transform (32 px,
no resize margin, mean 0.5 / std 0.25), so that repfuse's "the model's own preprocessing" is right
for the samples too: VanillaNet main.py's `input_size`, `crop_pct` and `imagenet_default_mean_and_std`
(main.py has no mean/std flags: those are recorded in timm train.py's names `mean`/`std`), timm
train.py's `img_size`, `crop_pct`, `interpolation`, `mean`, `std`, and the same names for RepVGG.

The recipe and the accuracies reached are written to sample_checkpoints/RECIPE.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from repfuse_cli.fusers.repvgg import RepVGGCfg, build_repvgg  # noqa: E402
from repfuse_cli.fusers.vanillanet import VARIANTS as VANILLA  # noqa: E402
from repfuse_cli.fusers.vanillanet import act_learn_at, build_vanillanet  # noqa: E402

CLASSES = ("disc", "square", "triangle", "hbar", "vbar", "cross")
SIZE = 32
N_TRAIN, N_HELDOUT = 3072, 256
SEED = 0
VN_EPOCHS, VN_DECAY = 30, 15  # VanillaNet: act_learn annealed 0 -> 1 over the first VN_DECAY epochs
RV_EPOCHS = 30
TM_EPOCHS, TM_LR = 30, 0.1


def make_shapes(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """n images (n, 3, 32, 32) in [0, 1] and labels, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    images = torch.empty(n, 3, SIZE, SIZE)
    for i in range(n):
        r = 7 + 6 * torch.rand((), generator=g).item()  # half-size 7..13 px
        cy, cx = (r + (SIZE - 2 * r) * torch.rand(2, generator=g)).tolist()
        dy, dx = ys - cy, xs - cx
        c = int(labels[i])
        if c == 0:
            mask = dy**2 + dx**2 <= r**2
        elif c == 1:
            mask = (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
        elif c == 2:
            mask = (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.55)
        elif c == 3:
            mask = (dy.abs() <= r * 0.3) & (dx.abs() <= r)
        elif c == 4:
            mask = (dx.abs() <= r * 0.3) & (dy.abs() <= r)
        else:
            mask = ((dy.abs() <= r * 0.25) & (dx.abs() <= r)) | ((dx.abs() <= r * 0.25) & (dy.abs() <= r))
        fg, bg = torch.rand(3, generator=g), torch.rand(3, generator=g)
        while (fg - bg).abs().sum() < 0.6:  # keep the shape visible
            fg = torch.rand(3, generator=g)
        img = torch.where(mask, fg[:, None, None], bg[:, None, None])
        images[i] = (img + 0.08 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1)
    return images, labels


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def normalize(x: Tensor) -> Tensor:
    return (x - 0.5) / 0.25


def quantize(x: Tensor) -> Tensor:
    """[0, 1] images as the 8-bit PNG files hold them (uint8)."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def write_image_folder(images: Tensor, labels: Tensor, root: Path) -> None:
    """The held-out images as PNG files under root/<i>_<class>/<index>.png (sorted = training order)."""
    import shutil

    from PIL import Image

    if root.exists():
        shutil.rmtree(root)
    for c, name in enumerate(CLASSES):
        (root / f"{c}_{name}").mkdir(parents=True)
    for i, (img, c) in enumerate(zip(quantize(images), labels.tolist(), strict=True)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / f"{c}_{CLASSES[c]}" / f"{i:03d}.png", optimize=True)


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    lr: float,
    seed: int,
    on_epoch=None,
    ema_decay: float | None = None,
):
    """SGD (momentum 0.9, wd 5e-5, batch 64) with a cosine schedule; random horizontal flips."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    steps = epochs * math.ceil(len(x) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    ema = copy.deepcopy(model) if ema_decay else None
    for epoch in range(epochs):
        if on_epoch:
            on_epoch(model, epoch)
            if ema is not None:
                on_epoch(ema, epoch)
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
                        if pe.is_floating_point():
                            pe.mul_(ema_decay).add_(pm, alpha=1 - ema_decay)
                        else:
                            pe.copy_(pm)
    return opt, ema


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    t0 = time.time()
    raw, y_all = make_shapes(N_TRAIN + N_HELDOUT, SEED)
    x_all = normalize(raw)
    x, y = x_all[:N_TRAIN], y_all[:N_TRAIN]
    xh, yh = x_all[N_TRAIN:], y_all[N_TRAIN:]
    write_image_folder(raw[N_TRAIN:], yh, HERE / "heldout_images")
    xq = normalize(quantize(raw[N_TRAIN:]).float() / 255)  # what the PNG folder gives at 32 px, no resize
    results = {}

    # VanillaNet with deep training: act_learn = epoch / decay_epochs until decay_epochs, then 1.
    epochs, decay = VN_EPOCHS, VN_DECAY
    torch.manual_seed(SEED + 1)
    cfg = VANILLA["vanillanet_5"].shrink(32)
    vnet = build_vanillanet(cfg, deploy=False, num_classes=len(CLASSES))
    opt, ema = train(
        vnet,
        x,
        y,
        epochs,
        0.05,
        SEED + 1,
        ema_decay=0.99,
        on_epoch=lambda m, e: m.set_act_learn(act_learn_at(e, decay)),
    )
    assert vnet.act_learn == 1.0
    results["vanillanet_tiny.pth"] = (
        "vanillanet",
        evaluate(vnet, xh, yh),
        evaluate(ema, xh, yh),
        evaluate(vnet, xq, yh),
    )
    args = argparse.Namespace(
        model="vanillanet_tiny",
        epochs=epochs,
        decay_epochs=decay,
        decay_linear=True,
        batch_size=64,
        lr=0.05,
        opt="sgd",
        input_size=SIZE,
        crop_pct=1.0,  # evaluate at 32 px without a resize margin
        imagenet_default_mean_and_std=False,
        mean=list(MEAN),  # main.py has no mean/std flags: timm train.py's names
        std=list(STD),
        nb_classes=len(CLASSES),
        model_ema=True,
        model_key="model|module",
        data_set="shapes6",
    )
    torch.save(
        {
            "model": vnet.state_dict(),
            "model_ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epochs - 1,
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 0,
            },
            "args": args,
        },
        HERE / "vanillanet_tiny.pth",
    )

    # RepVGG: DDP training writes `module.`-prefixed keys under `state_dict`.
    torch.manual_seed(SEED + 2)
    rcfg = RepVGGCfg((1, 2, 2, 1), (0.25, 0.25, 0.25, 0.25), num_classes=len(CLASSES))
    rnet = build_repvgg(rcfg, deploy=False)
    opt, _ = train(rnet, x, y, RV_EPOCHS, 0.05, SEED + 2)
    acc = evaluate(rnet, xh, yh)
    results["repvgg_tiny.pth.tar"] = ("repvgg", acc, None, evaluate(rnet, xq, yh))
    rargs = argparse.Namespace(
        arch="RepVGG-custom",
        epochs=RV_EPOCHS,
        batch_size=64,
        lr=0.05,
        input_size=SIZE,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=list(MEAN),
        std=list(STD),
    )
    torch.save(
        {
            "epoch": RV_EPOCHS - 1,
            "arch": "RepVGG-custom",
            "best_acc1": torch.tensor(acc * 100),
            "state_dict": {f"module.{k}": v for k, v in rnet.state_dict().items()},
            "optimizer": opt.state_dict(),
            "args": rargs,
        },
        HERE / "repvgg_tiny.pth.tar",
    )

    # timm network with BatchNormAct2d, saved as timm's train.py does.
    import timm

    torch.manual_seed(SEED + 3)
    tnet = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    opt, ema = train(tnet, x, y, TM_EPOCHS, TM_LR, SEED + 3, ema_decay=0.99)
    acc, acc_ema = evaluate(tnet, xh, yh), evaluate(ema, xh, yh)
    results["test_efficientnet.pth.tar"] = ("conv-bn", acc, acc_ema, evaluate(tnet, xq, yh))
    targs = argparse.Namespace(
        model="test_efficientnet",
        num_classes=len(CLASSES),
        epochs=TM_EPOCHS,
        lr=TM_LR,
        opt="momentum",
        batch_size=64,
        model_ema=True,
        model_ema_decay=0.99,
        img_size=SIZE,
        input_size=None,
        crop_pct=1.0,
        crop_mode=None,
        interpolation="bilinear",
        mean=list(MEAN),
        std=list(STD),
    )
    torch.save(
        {
            "epoch": TM_EPOCHS - 1,
            "arch": "test_efficientnet",
            "state_dict": tnet.state_dict(),
            "state_dict_ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "version": 2,
            "args": targs,
            "metric": acc * 100,
        },
        HERE / "test_efficientnet.pth.tar",
    )

    from safetensors.torch import save_file

    save_file(
        {"images": xh.half().contiguous(), "labels": yh.contiguous()},
        str(HERE / "heldout.safetensors"),
        metadata={"classes": ",".join(CLASSES), "normalization": "(x - 0.5) / 0.25", "seed": str(SEED)},
    )
    write_recipe(results, time.time() - t0)
    for name, (fuser, a, e, _) in results.items():
        print(f"{name}: {fuser}, held-out top-1 {a * 100:.1f}%" + (f" (EMA {e * 100:.1f}%)" if e else ""))


def write_recipe(results, seconds: float) -> None:
    rows = "\n".join(
        f"| `{n}` | {f} | {a * 100:.1f}% | {'' if e is None else f'{e * 100:.1f}%'} | {q * 100:.1f}% |"
        for n, (f, a, e, q) in results.items()
    )
    (HERE / "RECIPE.md").write_text(f"""# Sample checkpoints

Regenerate with `.venv/bin/python sample_checkpoints/make_samples.py` (deterministic: seeded data, seeded
initialisation and shuffling, 2 CPU threads; took {seconds:.0f} s here).

## Data
"shapes6", generated by `make_shapes` (no downloads): {N_TRAIN} training and {N_HELDOUT} held-out 32x32 RGB
images of six classes ({", ".join(CLASSES)}), each a shape of random size (half-size 7-13 px), position and
colours on a random background, plus Gaussian noise (sigma 0.08); normalized as (x - 0.5) / 0.25. Chance is
{100 / len(CLASSES):.1f}%. `heldout.safetensors` holds the held-out images (float16) and labels;
`heldout_images/` the same images as 8-bit PNG files in one folder per class, named so that the folders
sort in training order (`0_disc`, `1_square`, `2_triangle`, `3_hbar`, `4_vbar`, `5_cross`).

## Evaluation transform, as each checkpoint records it
32 px images, no resize margin (`crop_pct` 1.0, so resizing a 32 px image is a no-op), scaled to [0, 1] and
normalized with mean 0.5 / std 0.25 per channel. Each checkpoint records this in its `args`, the way its
training script records arguments, so that `repfuse verify --inputs heldout_images` uses it:
- `vanillanet_tiny.pth`: VanillaNet main.py's `input_size` 32, `crop_pct` 1.0,
  `imagenet_default_mean_and_std` False, plus `mean`/`std` in timm train.py's names (main.py has no flags
  for them; repfuse honors recorded `mean`/`std` for every family).
- `repvgg_tiny.pth.tar`: `args` with `input_size` 32, `crop_pct` 1.0, `interpolation` bilinear, `mean`, `std`.
- `test_efficientnet.pth.tar`: timm train.py's `img_size` 32, `crop_pct` 1.0, `interpolation` bilinear,
  `mean`, `std`.

## Training
SGD, momentum 0.9, weight decay 5e-5, batch 64, cosine learning-rate schedule (from 0.05 unless said),
random horizontal flips. EMA weights (decay 0.99) where the real script keeps them.

- VanillaNet: `vanillanet_5` layout at 1/16 width (dims 32, 64, 128, 256), 6 classes, {VN_EPOCHS} epochs with
  deep training: `act_learn = epoch / {VN_DECAY}` for epochs 0-{VN_DECAY}, 1 afterwards (annealing finished at
  epoch {VN_DECAY}; the checkpoint records `epoch` {VN_EPOCHS - 1} and `args.decay_epochs` {VN_DECAY}).
- RepVGG: 4 stages of 1, 2, 2, 1 blocks, width multipliers 0.25 (widths 16, 16, 32, 64, 128),
  {RV_EPOCHS} epochs.
- timm `test_efficientnet`, 6 classes, {TM_EPOCHS} epochs from learning rate {TM_LR}.

## Held-out top-1 accuracy

| file | fuser | top-1 | EMA top-1 | top-1 on `heldout_images/` |
|---|---|---|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
