"""RepViT fuser: official keys (fixtures), fusion per variant, timm layout, routing, dtypes, transforms.

``tests/fixtures/repvit/*.json`` hold the keys and shapes of THU-MIG/RepViT's official models
(num_classes=1000, with the distillation head) before and after its own ``replace_batchnorm``,
and their parameter counts: the suite itself never imports the official code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import randomize_bn, rel_diff
from torch import nn

from repfuse_cli.checkpoint import Checkpoint, load_strict
from repfuse_cli.errors import BadInput, KeyMismatch
from repfuse_cli.fold import fold_bn_into_next
from repfuse_cli.fuser import Fused, Fuser, NotThisArch, Options, Plan
from repfuse_cli.fusers.repvit import (
    CUSTOM,
    OFFICIAL_MODELS,
    TIMM_MODELS,
    VARIANTS,
    RepViT,
    RepViTFuser,
    build_repvit,
    check_config,
    config_from_stages,
    lookup_variant,
)
from repfuse_cli.registry import BUILTIN, all_fusers, get_fuser

FIXTURES = Path(__file__).parent / "fixtures" / "repvit"
FUSER = RepViTFuser()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fixture(variant: str) -> dict:
    return json.loads((FIXTURES / f"{OFFICIAL_MODELS[variant]}.json").read_text())


def shapes(sd: dict) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sd.items()}


def official_meta_state(variant: str, distillation: bool = True) -> dict[str, torch.Tensor]:
    """An official training state_dict on the meta device, straight from the fixture."""
    fx = fixture(variant)
    drop = set() if distillation else set(fx["train_distill_only"])
    return {
        k: torch.empty(s, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
        for k, s in fx["train"].items()
        if k not in drop
    }


def ckpt_of(sd: dict, extras: dict | None = None) -> Checkpoint:
    return Checkpoint(Path("mem.pth"), "torch", dict(sd), None, extras=dict(extras or {}))


def fuse_state(
    sd: dict, extras: dict | None = None, fuser: RepViTFuser = FUSER
) -> tuple[Plan, nn.Module, Fused, nn.Module]:
    plan = fuser.detect(ckpt_of(sd, extras), Options())
    train = fuser.build_train(plan, sd)
    fused = fuser.fuse(plan, sd, train)
    deploy = load_strict(fuser.build_deploy(plan), fused.tensors, "deploy")
    return plan, train, fused, deploy


def x_in(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


RESIDUAL_OUT_BN = ("channel_mixer.m.2.bn", "channel_mixer.conv2.bn", "ffn.conv2.bn")


def trained(model: nn.Module, seed: int = 0, damp: float = 0.1) -> nn.Module:
    """``randomize_bn``, then the last BN of every residual MLP scaled by ``damp`` (eval mode).

    RepViT initialises that BN's gamma to 0 (``bn_weight_init=0``), so trained residual branches
    start small. With gamma ~ U(0.5, 1.5) instead, activations of the 40-60 block variants grow to
    1e4 and float32 itself loses 1e-3 against float64 (the official fusion loses the same); in
    float64 the fusion is exact either way. ``damp=1`` leaves ``randomize_bn``'s values alone.
    """
    randomize_bn(model, seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(RESIDUAL_OUT_BN):
                m.weight.mul_(damp)
                m.bias.mul_(damp)
    return model.eval()


# --------------------------------------------------------------------------- registry, table


def test_registered_before_conv_bn() -> None:
    fuser = get_fuser("repvit")
    assert type(fuser) is RepViTFuser and isinstance(fuser, Fuser)
    names = list(BUILTIN)
    assert names.index("repvit") < names.index("conv-bn")
    assert len([f for f in all_fusers() if f.name == "repvit"]) == 1


PARAMS = {  # deploy parameters as the official code counts them after replace_batchnorm (1000 classes)
    "RepViT-M0.6": 2468072,
    "RepViT-M0.9": 5067056,
    "RepViT-M1.0": 6810312,  # the paper's 6.81M
    "RepViT-M1.1": 8244312,
    "RepViT-M1.5": 14049992,
    "RepViT-M2.3": 22926792,
}


def test_variant_table_is_complete() -> None:
    assert set(VARIANTS) == set(PARAMS) == set(OFFICIAL_MODELS)
    assert sorted(p.name for p in FIXTURES.glob("*.json")) == sorted(f"{m}.json" for m in OFFICIAL_MODELS.values())
    assert round(PARAMS["RepViT-M1.0"] / 1e6, 2) == 6.81


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keys_shapes_and_params_are_the_official_ones(variant: str) -> None:
    fx = fixture(variant)
    cfg = config_from_stages(*VARIANTS[variant])
    with torch.device("meta"):
        train = RepViT({**cfg, "distillation": True}).state_dict()
        plain = RepViT(cfg).state_dict()
        deploy = RepViT(cfg, deploy=True)
    assert shapes(train) == fx["train"]
    assert shapes(plain) == {k: s for k, s in fx["train"].items() if k not in fx["train_distill_only"]}
    assert shapes(deploy.state_dict()) == fx["fused"]
    n = sum(p.numel() for p in deploy.parameters())
    assert n == fx["params"]["fused"] == PARAMS[variant]
    with torch.device("meta"):
        counts = [sum(p.numel() for p in RepViT({**cfg, "distillation": d}).parameters()) for d in (False, True)]
    assert counts == [fx["params"]["train"], fx["params"]["train_distill"]]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("distillation", [False, True])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_full_size_official_checkpoints(variant: str, distillation: bool) -> None:
    sd = official_meta_state(variant, distillation)
    plan = FUSER.detect(ckpt_of(sd), Options(under_auto=distillation))  # tried by auto / named
    assert (plan.arch, plan.variant, plan.layout) == ("repvit", variant, "official")
    assert plan.config["distillation"] is distillation and plan.num_classes == 1000
    assert shapes(FUSER.build_deploy(plan).state_dict()) == fixture(variant)["fused"]
    back = Plan.from_metadata(plan.to_metadata())
    assert back.config == plan.config
    with torch.device("meta"):
        assert shapes(RepViT(back.config).state_dict()) == shapes(sd)


def test_variant_names_are_looked_up_loosely() -> None:
    assert lookup_variant("m1_0") == lookup_variant("repvit_m1_0") == lookup_variant("RepViT-M1.0") == "RepViT-M1.0"
    assert lookup_variant("M0.6") == "RepViT-M0.6"
    with pytest.raises(BadInput, match="unknown RepViT variant"):
        lookup_variant("m9_9")


def test_variant_override_and_recorded_model_are_checked() -> None:
    sd = official_meta_state("RepViT-M1.1")
    assert FUSER.detect(ckpt_of(sd), Options(variant="m1_1")).variant == "RepViT-M1.1"
    with pytest.raises(BadInput, match=r"--variant RepViT-M1\.5 does not fit"):
        FUSER.detect(ckpt_of(sd), Options(variant="m1_5"))
    same = FUSER.detect(ckpt_of(sd, {"args": {"model": "repvit_m1_1"}}), Options())
    assert not any("records model" in n for n in same.notes)
    other = FUSER.detect(ckpt_of(sd, {"args": {"model": "repvit_m0_9"}}), Options())
    assert any("records model `repvit_m0_9`" in n for n in other.notes)


def test_foreign_deploy_and_broken_state_dicts() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        resnet = timm.create_model("resnet18").state_dict()
    for sd in (resnet, {"weight": torch.zeros(3)}):
        with pytest.raises(NotThisArch, match="no RepViT keys"):
            FUSER.detect(ckpt_of(sd), Options())
    fused = {k: torch.empty(s, device="meta") for k, s in fixture("RepViT-M0.6")["fused"].items()}
    with pytest.raises(NotThisArch, match="already in deploy form"):
        FUSER.detect(ckpt_of(fused), Options())
    sd = official_meta_state("RepViT-M0.6")
    with pytest.raises(NotThisArch, match="aux.weight"):
        FUSER.detect(ckpt_of({**sd, "aux.weight": torch.zeros(1)}), Options())
    holed = {k: v for k, v in sd.items() if k != "features.3.channel_mixer.m.2.bn.running_var"}
    with pytest.raises(KeyMismatch, match=r"features\.3\.channel_mixer\.m\.2\.bn\.running_var"):
        FUSER.detect(ckpt_of(holed), Options())
    gap = {k: v for k, v in sd.items() if not k.startswith("features.4.")}
    with pytest.raises(KeyMismatch, match="index 4"):
        FUSER.detect(ckpt_of(gap), Options())
    bad = dict(sd)
    bad["features.2.channel_mixer.m.0.c.weight"] = torch.empty(80, 41, 1, 1, device="meta")
    with pytest.raises(KeyMismatch, match="features.2.channel_mixer.m.0.c.weight"):
        FUSER.detect(ckpt_of(bad), Options())


# --------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("variant", ["RepViT-M0.6", "RepViT-M2.3"])
def test_fusion_matches_training_model(variant: str) -> None:
    """Full size, random weights and BN statistics, distillation head, 13 classes. Fused from a
    float64 checkpoint, the deploy model is the training model to 1e-10; both run in float32
    (the weights a float32 checkpoint gets: folded in float64, cast once) agree to 1e-5.
    (Every variant goes through the whole pipeline in float32 below; these two, the smallest
    and the deepest, are also checked for exactness here.)"""
    model = trained(build_repvit(variant, num_classes=13, distillation=True), seed=len(variant)).double()
    sd = model.state_dict()
    plan, train, fused, deploy = fuse_state(sd)
    assert plan.variant == variant and plan.num_classes == 13 and plan.config["distillation"]
    assert all(t.dtype == torch.float64 and t.is_contiguous() for t in fused.tensors.values())
    x = x_in(32).double()
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ref, train(x))
        assert rel_diff(ref, deploy(x)) < 1e-10
        assert rel_diff(model.float()(x.float()), deploy.float()(x.float())) < 1e-5
    fx = fixture(variant)["fused"]
    assert shapes(fused.tensors) == {k: ([13] + s[1:] if k.startswith("classifier.") else s) for k, s in fx.items()}
    mix = sum(b["kind"] == "mix" for b in plan.config["blocks"])
    assert fused.counts["branch_merges"] == mix + 1  # every RepVGGDW, and the two heads
    assert fused.counts["bn_folded"] == len([k for k in sd if k.endswith("running_var")])
    assert len(fused.unfused) == sum(b["se"] > 0 for b in plan.config["blocks"])


@pytest.mark.parametrize("damp", [0.1, 1.0])
def test_fusion_without_distillation_float32(damp: float) -> None:
    model = trained(build_repvit("m0_6", num_classes=1000), seed=1, damp=damp)
    plan, _, fused, deploy = fuse_state(model.state_dict())
    mix = sum(b["kind"] == "mix" for b in plan.config["blocks"])
    assert not plan.config["distillation"] and fused.counts["branch_merges"] == mix
    assert all(t.dtype == torch.float32 for t in fused.tensors.values())
    assert shapes(fused.tensors) == fixture("RepViT-M0.6")["fused"]
    x = x_in(32)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


def test_distillation_heads_are_averaged() -> None:
    model = trained(build_repvit("m0_6", num_classes=5, distillation=True), seed=3)
    feats = torch.randn(4, 320, dtype=torch.float64)
    head = model.classifier.double()
    _, _, fused, _ = fuse_state(model.state_dict())
    w, b = fused.tensors["classifier.weight"], fused.tensors["classifier.bias"]
    with torch.no_grad():
        one, two = head.classifier(feats), head.classifier_dist(feats)
    assert rel_diff((one + two) / 2, feats @ w.double().T + b.double()) < 1e-6
    assert rel_diff(one, feats @ w.double().T + b.double()) > 1e-2  # really two different heads


def test_headless_and_other_inputs() -> None:
    cfg = config_from_stages((16, 32), (2, 1), num_classes=0, in_chans=1)
    model = trained(RepViT(cfg), seed=2)
    plan, _, fused, deploy = fuse_state(model.state_dict())
    assert plan.variant == CUSTOM and plan.num_classes is None and plan.input_size == (1, 224, 224)
    assert not any(k.startswith("classifier") for k in fused.tensors)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


def test_fuse_is_pure_and_deterministic() -> None:
    model = trained(build_repvit("m0_6", num_classes=10, distillation=True), seed=4)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    plan = FUSER.detect(ckpt_of(sd), Options())
    train = FUSER.build_train(plan, sd)
    a, b = FUSER.fuse(plan, sd, train), FUSER.fuse(plan, sd, train)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    assert list(a.tensors) == list(FUSER.build_deploy(plan).state_dict())
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    json.dumps(a.config)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_checkpoints_keep_their_dtype(dtype: torch.dtype, tol: float) -> None:
    model = trained(build_repvit("m0_6", num_classes=10, distillation=True), seed=5)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    plan, _, fused, deploy = fuse_state(sd)
    assert all(t.dtype == dtype and t.is_contiguous() for t in fused.tensors.values())
    ref_model = build_repvit("m0_6", num_classes=10, distillation=True).eval()
    ref_model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    x = x_in(32)
    with torch.no_grad():
        assert rel_diff(ref_model(x), deploy.float()(x)) < tol
        native = load_strict(FUSER.build_deploy(plan), fused.tensors, "native")(x.to(dtype))
    assert native.dtype == dtype and torch.isfinite(native).all()


def test_fold_bn_into_the_next_linear() -> None:
    g = torch.Generator().manual_seed(0)
    bn = randomize_bn(nn.BatchNorm1d(6), 1).eval().double()
    lin = nn.Linear(6, 3).double()
    x = torch.randn(5, 6, generator=g, dtype=torch.float64)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    w, b = fold_bn_into_next(lin.weight, lin.bias, scale.detach(), shift.detach())
    with torch.no_grad():
        assert rel_diff(lin(bn(x)), x @ w.T + b) < 1e-12
    w0, b0 = fold_bn_into_next(lin.weight, None, scale.detach(), shift.detach())
    assert torch.equal(w0, w) and torch.allclose(b0 + lin.bias.double(), b)


def test_bad_configs_are_refused() -> None:
    cfg = config_from_stages((16, 32), (1, 1))
    with pytest.raises(BadInput, match="lacks 'blocks'"):
        check_config({k: v for k, v in cfg.items() if k != "blocks"}, "official")
    broken = json.loads(json.dumps(cfg))
    broken["blocks"][1]["dim"] = 7
    with pytest.raises(BadInput, match="block 1 takes 7 channels"):
        check_config(broken, "official")
    with pytest.raises(BadInput, match="legacy"):
        check_config({**cfg, "legacy": True}, "official")
    with pytest.raises(BadInput, match="unknown RepViT layout"):
        check_config(cfg, "other")
    plan = Plan("repvit", CUSTOM, "official", {**cfg, "stem": "x"})
    with pytest.raises(BadInput, match="deploy.safetensors: RepViT config: stem"):
        FUSER.check_config(plan, None, "deploy.safetensors")


# --------------------------------------------------------------------------- eval transform


def test_eval_transform_follows_deit_main_py() -> None:
    plan = Plan("repvit", "RepViT-M1.0", "official", {})
    default = FUSER.eval_transform(plan, ckpt_of({}))
    assert (default.size, default.interpolation, round(default.size / default.crop_pct)) == (224, "bicubic", 256)
    assert "main.py defaults" in default.source
    big = FUSER.eval_transform(plan, ckpt_of({}, {"args": {"input_size": 384, "finetune": ""}}))
    assert big.size == 384 and round(big.size / big.crop_pct) == int(256 / 224 * 384) == 438
    tuned = FUSER.eval_transform(plan, ckpt_of({}, {"args": {"input_size": 288, "finetune": "m.pth"}}))
    assert (tuned.size, tuned.crop_pct) == (288, None) and "finetune" in tuned.source
    cifar = FUSER.eval_transform(plan, ckpt_of({}, {"args": {"input_size": 32}}))
    assert (cifar.size, cifar.crop_pct) == (32, None)
    assert default.mean == (0.485, 0.456, 0.406) and default.std == (0.229, 0.224, 0.225)


def test_eval_transform_timm_layout() -> None:
    plan = Plan("repvit", "RepViT-M1.0", "timm", {})
    t = FUSER.eval_transform(plan, ckpt_of({}))
    assert (t.size, t.crop_pct, t.interpolation) == (224, 0.95, "bicubic")
    args = {"input_size": [3, 256, 256], "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5] * 3}
    t = FUSER.eval_transform(plan, ckpt_of({}, {"args": args}))
    assert (t.size, t.crop_pct, t.interpolation, t.mean) == (256, 1.0, "bilinear", (0.5, 0.5, 0.5))


def test_plan_input_size_from_recorded_args() -> None:
    sd = official_meta_state("RepViT-M0.6")
    plan = FUSER.detect(ckpt_of(sd, {"args": {"input_size": 256}}), Options())
    assert plan.input_size == (3, 256, 256)


# --------------------------------------------------------------------------- timm layout


def _timm() -> ModuleType:
    return pytest.importorskip("timm")


def test_official_forward_equals_timm_with_the_same_weights() -> None:
    """Our training model (official names) computes what timm's independent RepViT computes with
    the same weights: both lay out their tensors in the same order, so they map one to one."""
    timm = _timm()
    ours = trained(build_repvit("m1_0", num_classes=10, distillation=True), seed=6)
    theirs = timm.create_model("repvit_m1_0", num_classes=10, distillation=True).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    theirs.load_state_dict(dict(zip(b, a.values(), strict=True)), strict=True)
    x = x_in(64)
    with torch.no_grad():
        assert rel_diff(ours(x), theirs(x)) < 1e-6


def _check_timm(name: str, **kw: Any) -> Plan:
    timm = _timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = trained(timm.create_model(name, **kw), seed=7)
    sd = model.state_dict()
    with pytest.raises(NotThisArch, match="--arch auto leaves it to conv-bn"):
        FUSER.detect(ckpt_of(sd), Options(under_auto=True))
    plan, _, fused, deploy = fuse_state(sd, {"arch": name})
    assert plan.layout == "timm"
    timm_deploy = reparameterize_model(model)
    assert shapes(timm_deploy.state_dict()) == shapes(fused.tensors)
    timm_deploy.load_state_dict(fused.tensors, strict=True)
    x = x_in(32)
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, timm_deploy(x)) < 1e-5
        assert rel_diff(ref, deploy(x)) < 1e-5
    return plan


TIMM_NUMERIC = {"RepViT-M0.9": False, "RepViT-M1.0": True}  # variant: distillation (the deep ones: meta below)


@pytest.mark.parametrize("variant", sorted(TIMM_NUMERIC))
def test_timm_layout_with_explicit_arch(variant: str) -> None:
    plan = _check_timm(TIMM_MODELS[variant], num_classes=11, distillation=TIMM_NUMERIC[variant])
    assert (plan.variant, plan.config["timm_model"]) == (variant, TIMM_MODELS[variant])
    assert not plan.config["legacy"] and not any("records model" in n for n in plan.notes)


@pytest.mark.parametrize("variant", sorted(set(TIMM_MODELS) - set(TIMM_NUMERIC)))
def test_timm_layout_keys_of_deep_variants(variant: str) -> None:
    """On the meta device: detection, and our deploy keys/shapes against timm's own
    reparameterize_model output (the numerics of these blocks are checked above)."""
    timm = _timm()
    from timm.utils.model import reparameterize_model

    with torch.device("meta"):
        model = timm.create_model(TIMM_MODELS[variant])
        expected = shapes(reparameterize_model(model).state_dict())
    plan = FUSER.detect(ckpt_of(model.state_dict()), Options())
    assert (plan.variant, plan.layout, plan.config["timm_model"]) == (variant, "timm", TIMM_MODELS[variant])
    assert plan.config["distillation"]  # timm's default
    assert shapes(FUSER.build_deploy(plan).state_dict()) == expected


def test_timm_legacy_layout() -> None:
    plan = _check_timm("repvit_m1", num_classes=7)
    assert plan.config["legacy"] and plan.config["timm_model"] == "repvit_m1" and plan.variant == "RepViT-M0.9"


# --------------------------------------------------------------------------- pipeline


def official_checkpoint(path: Path, model: nn.Module, name: str, size: int = 224) -> None:
    """What THU-MIG/RepViT's main.py saves (model_ema is a copy here)."""
    sd = model.state_dict()
    args = argparse.Namespace(model=name, input_size=size, finetune="", model_ema=True)
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {},
            "epoch": 3,
            "model_ema": {k: v.clone() for k, v in sd.items()},
            "scaler": {},
            "args": args,
        },
        path,
    )


PIPELINE = [  # (variant, arch, key, distillation): every variant, both routes
    ("RepViT-M0.6", "repvit", None, True),
    ("RepViT-M0.6", "auto", "model_ema", False),
    ("RepViT-M0.9", "auto", None, True),
    ("RepViT-M1.0", "repvit", "model_ema", True),
    ("RepViT-M1.1", "auto", None, False),
    ("RepViT-M1.5", "repvit", None, True),
    ("RepViT-M2.3", "auto", "model_ema", True),
]


@pytest.mark.parametrize("variant, arch, key, distillation", PIPELINE)
def test_pipeline_official_checkpoint(
    tmp_path: Path, variant: str, arch: str, key: str | None, distillation: bool
) -> None:
    from safetensors.torch import load_file

    from repfuse_cli import convert, load_deploy

    model = trained(build_repvit(variant, num_classes=10, distillation=distillation), seed=8)
    src = tmp_path / "checkpoint_best.pth"
    official_checkpoint(src, model, OFFICIAL_MODELS[variant])
    out = tmp_path / "deploy.safetensors"
    res = convert(src, out, arch=arch, key=key, resolution=32, batch=2, report=variant == "RepViT-M0.6")
    assert (res["arch"], res["variant"], res["layout"]) == ("repvit", variant, "official")
    assert res["verify"]["passed"] and res["verify"]["max_rel_diff"] < 1e-5
    tensors = load_file(str(out))
    fx = fixture(variant)["fused"]
    assert shapes(tensors) == {k: ([10] + s[1:] if k.startswith("classifier.") else s) for k, s in fx.items()}
    loaded = load_deploy(out)
    assert isinstance(loaded, RepViT) and loaded.deploy
    x = x_in(32)
    with torch.no_grad():
        assert rel_diff(model(x), loaded(x)) < 1e-5


def test_pipeline_timm_checkpoint_explicit_and_auto(tmp_path: Path) -> None:
    timm = _timm()
    from timm.utils.model import reparameterize_model

    from repfuse_cli import convert, load_deploy
    from repfuse_cli.pipeline import detect

    model = trained(timm.create_model("repvit_m0_9", num_classes=10), seed=9)
    src = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, src)
    res = convert(src, tmp_path / "m.safetensors", arch="repvit", resolution=32, batch=2)
    assert (res["variant"], res["layout"]) == ("RepViT-M0.9", "timm") and res["verify"]["passed"]
    timm_deploy = reparameterize_model(model)
    timm_deploy.load_state_dict(load_deploy(res["output"]).state_dict(), strict=True)
    x = x_in(32)
    with torch.no_grad():
        assert rel_diff(model(x), timm_deploy(x)) < 1e-5
    fuser, _ = detect(ckpt_of(model.state_dict(), {"arch": "repvit_m0_9"}), "auto")
    assert fuser.name == "conv-bn"
