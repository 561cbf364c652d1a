"""Verification on a folder of images: listing, each family's evaluation transform, figures."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision.transforms as T
from conftest import randomize_bn
from PIL import Image

from repfuse_cli.checkpoint import Checkpoint, load_checkpoint
from repfuse_cli.errors import BadInput
from repfuse_cli.fuser import EvalTransform, Plan, timm_eval_transform
from repfuse_cli.fusers.conv_bn import ConvBnFuser
from repfuse_cli.fusers.repvgg import RepVGGFuser
from repfuse_cli.fusers.vanillanet import VanillaNetFuser
from repfuse_cli.imagecheck import evaluate_images
from repfuse_cli.images import apply_transform, list_images
from repfuse_cli.registry import all_fusers

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
FOLDER = SAMPLES / "heldout_images"


def png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 36)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(path)
    return path


def photo(seed: int = 0, size: tuple[int, int] = (75, 53)) -> Image.Image:
    """A smooth non-square RGB image (resampling filters differ visibly on it)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 6, 5, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size[1], size[0]), mode="bilinear")[0]
    return Image.fromarray((big.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def ckpt(args: dict | None = None, **extras) -> Checkpoint:
    return Checkpoint(Path("x.pth"), "torch", {}, None, extras={"args": args or {}, **extras})


# --------------------------------------------------------------------------- listing


def test_labels_come_from_sorted_class_folders(tmp_path):
    png(tmp_path / "zebra" / "b.PNG")
    png(tmp_path / "zebra" / "sub" / "a.jpeg", 1)
    png(tmp_path / "ant" / "c.WebP", 2)
    png(tmp_path / "ant" / "d.bmp", 3)
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    s = list_images(tmp_path)
    assert s.classes == ["ant", "zebra"]
    assert s.files == ["ant/c.WebP", "ant/d.bmp", "zebra/b.PNG", "zebra/sub/a.jpeg"]
    assert s.labels == [0, 0, 1, 1]
    assert list_images(tmp_path, limit=3).files == s.files[:3] and list_images(tmp_path, limit=3).total == 4


def test_class_map_sets_the_label_order_and_must_match_the_folders(tmp_path):
    png(tmp_path / "n015" / "x.png")
    png(tmp_path / "n002" / "y.png")
    cmap = tmp_path.parent / "classes.txt"
    cmap.write_text("# model order\nn015\nn002\nn999\n")
    s = list_images(tmp_path, class_map=cmap)
    assert s.classes == ["n015", "n002", "n999"] and s.files == ["n002/y.png", "n015/x.png"] and s.labels == [1, 0]
    cmap.write_text("n015\n")
    with pytest.raises(BadInput, match="does not match the folders.*n002"):
        list_images(tmp_path, class_map=cmap)
    cmap.write_text("n015\nn002\nn015\n")
    with pytest.raises(BadInput, match="appears twice"):
        list_images(tmp_path, class_map=cmap)
    with pytest.raises(BadInput, match="3 classes in the class map, but the model has 2 outputs"):
        list_images(tmp_path, class_map=["n015", "n002", "n999"], num_classes=2)


def test_a_flat_folder_has_no_labels(tmp_path):
    png(tmp_path / "b.jpg")
    png(tmp_path / "a.png", 1)
    s = list_images(tmp_path)
    assert s.files == ["a.png", "b.jpg"] and s.labels is None and s.classes is None
    with pytest.raises(BadInput, match="flat folder"):
        list_images(tmp_path, class_map=["a"])


@pytest.mark.parametrize("make", ["empty", "only-text", "missing", "empty-classes"])
def test_a_folder_without_images_is_bad_input(tmp_path, make):
    folder = tmp_path / "imgs"
    if make != "missing":
        folder.mkdir()
    if make == "only-text":
        (folder / "a.txt").write_text("x")
    if make == "empty-classes":
        (folder / "cat").mkdir()
    with pytest.raises(BadInput, match="no images|no such folder"):
        list_images(folder)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    "args",
    [
        {},  # the model's pretrained_cfg: crop_pct 0.95, bicubic
        {"crop_pct": 0.8, "interpolation": "bilinear", "img_size": 64},
        {"crop_pct": 0.7, "interpolation": "nearest", "input_size": [3, 48, 48], "crop_mode": "squash"},
        {"crop_pct": 0.9, "interpolation": "bicubic", "img_size": 40, "crop_mode": "border", "mean": [0.5]},
    ],
)
def test_timm_models_get_timms_own_transform_with_recorded_args_first(args):
    plan = Plan("conv-bn", "resnet18", "timm", {"model": "timm:resnet18", "kwargs": {}})
    t = ConvBnFuser().eval_transform(plan, ckpt(args))
    cfg = timm.data.resolve_data_config(
        args=dict(args), pretrained_cfg=timm.models.get_pretrained_cfg("resnet18").to_dict()
    )
    assert (t.size, t.crop_pct, t.interpolation, t.crop_mode) == (
        cfg["input_size"][-1],
        cfg["crop_pct"],
        cfg["interpolation"],
        cfg["crop_mode"],
    )
    if args:
        assert t.crop_pct == args["crop_pct"] != 0.95 and t.interpolation == args["interpolation"]
        assert "from the checkpoint" in t.source
    else:
        assert (t.size, t.crop_pct, t.interpolation) == (224, 0.95, "bicubic")
    reference = timm.data.create_transform(**cfg)
    for seed, size in ((0, (75, 53)), (1, (40, 90))):
        img = photo(seed, size)
        assert torch.equal(apply_transform(img, t), reference(img)), (args, size)


def test_overrides_replace_the_recorded_transform():
    t = EvalTransform(size=224, crop_pct=0.875).with_overrides(crop_pct=1.0, interpolation="bilinear", mean=(0.5,))
    assert (t.scale_size, t.interpolation, t.mean) == (224, "bilinear", (0.5, 0.5, 0.5))
    assert "command line" in t.source and "crop_pct 1" in t.describe()
    for bad in ({"crop_pct": 0.0}, {"crop_pct": 1.5}, {"interpolation": "cubic"}, {"std": (1, 0, 1)}, {"mean": (1, 2)}):
        with pytest.raises(BadInput):
            EvalTransform().with_overrides(**bad)


def vanillanet_official(size: int, crop_pct: float | None, default_norm: bool) -> T.Compose:
    """VanillaNet datasets.py build_transform(is_train=False), written out from the paper's repo."""
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if default_norm else ((0.5,) * 3, (0.5,) * 3)
    t = []
    if size > 32:
        if size >= 384:
            t.append(T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC))
        else:
            crop_pct = crop_pct or 224 / 256
            t += [T.Resize(int(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*t, T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize(
    "args",
    [{}, {"input_size": 160, "crop_pct": 0.9}, {"input_size": 384}, {"imagenet_default_mean_and_std": False}],
)
def test_vanillanet_transform_is_its_training_codes(args):
    plan = Plan("vanillanet", "vanillanet_5", input_size=(3, 224, 224))
    t = VanillaNetFuser().eval_transform(plan, ckpt(args))
    ref = vanillanet_official(
        args.get("input_size", 224), args.get("crop_pct"), args.get("imagenet_default_mean_and_std", True)
    )
    img = photo(3, (300, 410))
    assert torch.allclose(apply_transform(img, t), ref(img), atol=0, rtol=0)


@pytest.mark.parametrize(
    "extras, resize, interp",
    [
        ({}, 224, "bilinear"),  # data/build.py default: Resize(TEST_SIZE), no margin
        ({"config": {"DATA": {"IMG_SIZE": 256, "INTERPOLATION": "bicubic"}, "TEST": {"CROP": True}}}, 292, "bicubic"),
    ],
)
def test_repvgg_official_transform_follows_data_build(extras, resize, interp):
    plan = Plan("repvgg", "RepVGG-A0", "official", {}, input_size=(3, 224, 224))
    t = RepVGGFuser().eval_transform(plan, ckpt(**extras))
    size = extras.get("config", {}).get("DATA", {}).get("IMG_SIZE", 224)
    ref = T.Compose(
        [T.Resize(resize, interpolation=T.InterpolationMode(interp)), T.CenterCrop(size), T.ToTensor(),
         T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )  # fmt: skip
    img = photo(4, (260, 300))
    assert t.scale_size == resize and torch.equal(apply_transform(img, t), ref(img))
    timm_plan = Plan("repvgg", "RepVGG-A0", "timm", {"timm_model": "repvgg_a0"})
    assert RepVGGFuser().eval_transform(timm_plan, ckpt()) == timm_eval_transform("repvgg_a0", {})


def test_every_registered_family_names_its_transform():
    for fuser in all_fusers():
        t = fuser.eval_transform(Plan(fuser.name, "x", config={"model": "pkg:fn"}), ckpt())
        assert t.size > 0 and t.describe()


# --------------------------------------------------------------------------- evaluation


class Tiny(torch.nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def pair(classes: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = randomize_bn(Tiny(classes)).eval()
    b = Tiny(classes).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_corrupt_images_are_skipped_counted_and_named(tmp_path):
    for i in range(5):
        png(tmp_path / "a" / f"{i}.png", i)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png(tmp_path / "b" / "ok.png", 9)
    train, deploy = pair()
    t = EvalTransform(size=16, crop_pct=1.0)
    r = evaluate_images(train, deploy, tmp_path, t, batch=4)
    assert (r.images, r.skipped, r.classes) == (6, 1, 2) and r.skipped_names[0].startswith("b/broken.jpg")
    assert r.passed and r.top1_agreement == 1.0 and r.top5_agreement == 1.0 and r.accuracy_train is not None
    flat = tmp_path / "a"
    r = evaluate_images(train, deploy, flat, t, batch=2, limit=3)
    assert r.images == 3 and r.classes is None and r.accuracy_train is None and r.top1_agreement == 1.0


def test_more_classes_than_outputs_is_bad_input(tmp_path):
    for c in "abc":
        png(tmp_path / c / "x.png")
    train, deploy = pair(classes=2)
    with pytest.raises(BadInput, match="3 classes, but the model has 2 outputs"):
        evaluate_images(train, deploy, tmp_path, EvalTransform(size=8, crop_pct=1.0))


def sample_models(name: str, key: str | None = None):
    ck = load_checkpoint(SAMPLES / name, key=key)
    for fuser in all_fusers():
        try:
            plan = fuser.detect(ck, __import__("repfuse_cli.fuser").fuser.Options())
            break
        except Exception:  # noqa: BLE001 - the next family
            continue
    train = fuser.build_train(plan, ck.state_dict)
    fused = fuser.fuse(plan, ck.state_dict, train)
    deploy_plan = plan.with_config(fused.config)
    deploy = fuser.build_deploy(deploy_plan).to_empty(device="cpu")
    deploy.load_state_dict(fused.tensors, strict=True)
    return ck, fuser, plan, train, deploy.eval(), fused


def independent_accuracy(model: torch.nn.Module, transform) -> float:
    """Accuracy over the shipped folder with torchvision's ImageFolder (its own label rule)."""
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(FOLDER), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    right = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
    return right / len(data)


def test_shipped_folder_accuracy_equals_an_independent_evaluation():
    # timm sample: timm's own pipeline (its resolve_data_config + create_transform on the train.py args)
    ck, fuser, plan, train, deploy, _ = sample_models("test_efficientnet.pth.tar")
    t = fuser.eval_transform(plan, ck)
    assert (t.size, t.crop_pct, t.interpolation, t.mean, t.std) == (32, 1.0, "bilinear", (0.5,) * 3, (0.25,) * 3)
    r = evaluate_images(train, deploy, FOLDER, t, batch=64, dtype=ck.dtype)
    cfg = timm.data.resolve_data_config(args=ck.args, model=timm.create_model("test_efficientnet", num_classes=6))
    expected = independent_accuracy(train, timm.data.create_transform(**cfg))
    assert r.images == 256 and r.classes == 6 and r.skipped == 0
    assert r.accuracy_train == expected == r.accuracy_deploy and r.accuracy_train > 0.8
    assert r.passed and r.top1_agreement == 1.0 and r.top5_accuracy_train >= r.accuracy_train

    # VanillaNet sample: its datasets.py eval transform (no resize at 32 px), its recorded mean/std
    ck, fuser, plan, train, deploy, _ = sample_models("vanillanet_tiny.pth")
    t = fuser.eval_transform(plan, ck)
    assert (t.size, t.mean, t.std) == (32, (0.5,) * 3, (0.25,) * 3) and "args." in t.source
    r = evaluate_images(train, deploy, FOLDER, t, batch=100, dtype=ck.dtype)
    expected = independent_accuracy(train, T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]))
    assert r.accuracy_train == expected and r.accuracy_train > 0.8 and r.passed


def test_a_perturbed_deploy_weight_fails_and_names_the_images():
    ck, fuser, plan, train, deploy, fused = sample_models("repvgg_tiny.pth.tar")
    t = fuser.eval_transform(plan, ck)
    assert (t.size, t.interpolation, t.scale_size, t.mean) == (32, "bilinear", 32, (0.5,) * 3)
    key = next(k for k in fused.tensors if k.endswith("rbr_reparam.weight") and "stage2" in k)
    with torch.no_grad():
        deploy.state_dict()[key].view(-1)[0] += 0.5
    r = evaluate_images(train, deploy, FOLDER, t, batch=128, dtype=ck.dtype, limit=64, min_agreement=0.99)
    assert not r.passed and r.failure() and r.max_rel_diff > 1e-3
    assert len(r.disagree_most) == 5 and all((FOLDER / d.file).is_file() for d in r.disagree_most)
    assert [d.rel_diff for d in r.disagree_most] == sorted((d.rel_diff for d in r.disagree_most), reverse=True)
    assert r.disagree_most[0].file in r.failure() and r.diverges_at and "stage2" in r.diverges_at
    assert r.images == 64 and not math.isnan(r.cosine)
    ok = evaluate_images(train, deploy, FOLDER, dataclasses.replace(t), batch=64, dtype=ck.dtype, limit=8, atol=1.0)
    assert ok.passed and ok.top1_agreement is not None


# --------------------------------------------------------------------------- the CLI


def cli(*args: object) -> Any:
    from typer.testing import CliRunner

    from repfuse_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def repvgg_deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("img") / "rv.safetensors"
    r = cli("convert", SAMPLES / "repvgg_tiny.pth.tar", "-o", out, "--inputs", FOLDER, "--limit", "16", "-q")
    assert r.exit_code == 0, r.output
    return out


def test_cli_verify_on_the_shipped_folder_reports_agreement_and_accuracy(repvgg_deploy):
    r = cli("verify", SAMPLES / "repvgg_tiny.pth.tar", repvgg_deploy, "--inputs", FOLDER)
    assert r.exit_code == 0, r.output
    assert "transform: resize 32 (bilinear), center crop 32" in r.output and "top-1 100.00%, top-5 100.00%" in r.output
    r = cli("verify", SAMPLES / "repvgg_tiny.pth.tar", repvgg_deploy, "--inputs", FOLDER, "--json")
    v = json.loads(r.stdout)["verify"]
    ck, fuser, plan, train, deploy, _ = sample_models("repvgg_tiny.pth.tar")
    expected = independent_accuracy(train, T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)]))
    assert v["accuracy_train"] == v["images"]["accuracy_train"] == expected > 0.8
    assert v["inputs"] == "256 images from heldout_images in 6 classes" and v["passed"]


def test_cli_perturbed_deploy_file_fails_and_names_images(repvgg_deploy, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(repvgg_deploy), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(repvgg_deploy))
    key = next(k for k in tensors if "stage3" in k and k.endswith("rbr_reparam.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 0.5
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = cli("verify", SAMPLES / "repvgg_tiny.pth.tar", bad, "--inputs", FOLDER, "--limit", "32", "--json")
    assert r.exit_code == 1
    worst = json.loads(r.stdout)["verify"]["images"]["disagree_most"]
    assert len(worst) == 5 and worst[0]["file"] in r.stderr and "stage3" in r.stderr


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--min-agreement", "1.5"], "--min-agreement"),
        (["--interpolation", "cubic"], "--interpolation"),
        (["--mean", "a,b"], "--mean"),
        (["--class-map", "missing.txt"], "--class-map"),
    ],
)
def test_cli_bad_image_flags_exit_2(repvgg_deploy, extra, needle):
    r = cli("verify", SAMPLES / "repvgg_tiny.pth.tar", repvgg_deploy, "--inputs", FOLDER, "--limit", "4", *extra)
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output


def test_cli_image_flags_need_an_image_folder(repvgg_deploy):
    r = cli("verify", SAMPLES / "repvgg_tiny.pth.tar", repvgg_deploy, "--limit", "4")
    assert r.exit_code == 2 and "--limit applies to an image folder" in r.stderr
