"""RepVGG fuser: variants, layouts (official and timm), dtypes, detection and the pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn, rel_diff
from torch import nn

from repfuse_cli.checkpoint import Checkpoint, load_strict
from repfuse_cli.errors import BadInput, KeyMismatch
from repfuse_cli.fuser import Fuser, NotThisArch, Options, Plan
from repfuse_cli.fusers.repvgg import (
    CUSTOM,
    LAYOUTS,
    TIMM_MODELS,
    VARIANTS,
    RepVGG,
    RepVGGBlock,
    RepVGGFuser,
    build_repvgg,
    lookup_variant,
    merge_block,
)
from repfuse_cli.registry import get_fuser

FUSER = RepVGGFuser()
SHRINK = 8  # widths / 8: e.g. A0 -> 6, 6, 12, 24, 160 channels; B1g4 -> 16, 16, 32, 64, 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add sync cost (5x the CPU time on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(variant: str, deploy: bool = False, seed: int = 0, **kw) -> RepVGG:
    """A shrunken, seeded ``variant`` with random BN statistics (eval mode)."""
    torch.manual_seed(seed)
    wm = tuple(w / SHRINK for w in VARIANTS[variant].width_multiplier)
    kw.setdefault("num_classes", 10)
    model = build_repvgg(variant, deploy, width_multiplier=wm, **kw)
    return randomize_bn(model, seed).eval()


def ckpt_of(sd: dict, extras: dict | None = None) -> Checkpoint:
    return Checkpoint(Path("mem.pth"), "torch", dict(sd), None, extras=dict(extras or {}))


def meta_state(variant: str, deploy: bool = False, layout: str = "official", **kw) -> dict:
    cfg = dataclasses.replace(VARIANTS[variant], **kw).resolve()
    with torch.device("meta"):
        return RepVGG(cfg, deploy=deploy, layout=layout).state_dict()


def fuse_state(sd: dict, extras: dict | None = None, options: Options | None = None):
    """detect -> build_train -> fuse -> build_deploy + strict load, as the pipeline does."""
    plan = FUSER.detect(ckpt_of(sd, extras), options or Options())
    train = FUSER.build_train(plan, sd)
    fused = FUSER.fuse(plan, sd, train)
    deploy = load_strict(FUSER.build_deploy(plan), fused.tensors, "deploy")
    return plan, train, fused, deploy


def x_in(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- contract, table


def test_registered_class_and_contract():
    fuser = get_fuser("repvgg")
    assert type(fuser) is RepVGGFuser and isinstance(fuser, Fuser) and fuser.name == "repvgg"


PARAMS = {  # REFERENCE §2: millions, train -> deploy
    "RepVGG-A0": (9.11, 8.31),
    "RepVGG-A1": (14.09, 12.79),
    "RepVGG-A2": (28.21, 25.50),
    "RepVGG-B0": (15.82, 14.34),
    "RepVGG-B1": (57.42, 51.83),
    "RepVGG-B1g2": (45.78, 41.36),
    "RepVGG-B1g4": (39.97, 36.13),
    "RepVGG-B2": (89.02, 80.32),
    "RepVGG-B2g2": (70.85, 63.96),
    "RepVGG-B2g4": (61.76, 55.78),
    "RepVGG-B3": (123.09, 110.96),
    "RepVGG-B3g2": (96.91, 87.40),
    "RepVGG-B3g4": (83.83, 75.63),
    "RepVGG-D2se": (133.33, 120.39),
}


def test_variant_table_is_complete():
    assert set(VARIANTS) == set(PARAMS)


@pytest.mark.parametrize("variant", list(PARAMS))
def test_params_match_reference_table(variant):
    cfg = VARIANTS[variant].resolve()
    with torch.device("meta"):
        counts = [sum(p.numel() for p in RepVGG(cfg, deploy=d).parameters()) / 1e6 for d in (False, True)]
    assert [round(c, 2) for c in counts] == list(PARAMS[variant])


def test_a0_keys_and_shapes_are_the_official_ones():
    train, deploy = meta_state("RepVGG-A0"), meta_state("RepVGG-A0", deploy=True)
    assert (len(train), len(deploy)) == (351, 46)
    assert tuple(train["stage0.rbr_dense.conv.weight"].shape) == (48, 3, 3, 3)
    assert tuple(train["stage0.rbr_1x1.conv.weight"].shape) == (48, 3, 1, 1)
    assert "stage1.1.rbr_identity.running_var" in train and "stage1.0.rbr_identity.running_var" not in train
    assert tuple(train["linear.weight"].shape) == (1000, 1280)
    assert tuple(deploy["stage0.rbr_reparam.weight"].shape) == (48, 3, 3, 3)
    assert tuple(deploy["stage4.0.rbr_reparam.bias"].shape) == (1280,)
    assert all(k.endswith(("rbr_reparam.weight", "rbr_reparam.bias")) or k.startswith("linear.") for k in deploy)
    d2 = meta_state("RepVGG-D2se", deploy=True)
    assert tuple(d2["stage0.se.down.weight"].shape) == (4, 64, 1, 1)
    assert tuple(d2["stage3.0.se.up.weight"].shape) == (640, 40, 1, 1)


# --------------------------------------------------------------------------- fusion


def _blocks_and_identities(cfg: dict) -> tuple[int, int]:
    n = 1 + sum(cfg["num_blocks"])
    return n, sum(b - 1 for b in cfg["num_blocks"])  # every block but a stage's first has one


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fusion_matches_training_model(variant):
    model = small(variant)
    sd = model.state_dict()
    plan, train, fused, deploy = fuse_state(sd)
    x = x_in()
    with torch.no_grad():
        ref, out, via_train = model(x), deploy(x), train(x)
    assert torch.equal(ref, via_train)  # build_train holds exactly the checkpoint's function
    assert rel_diff(ref, out) < 1e-5
    blocks, idents = _blocks_and_identities(plan.config)
    assert fused.counts == {"bn_folded": 2 * blocks + idents, "branch_merges": blocks, "chain_merges": 0}
    assert plan.layout == "official" and plan.config["use_se"] == VARIANTS[variant].use_se
    assert sum(p.numel() for p in deploy.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_identity_branch(groups):
    torch.manual_seed(groups)
    block = randomize_bn(RepVGGBlock(8, 8, 1, groups, 0, False, LAYOUTS["official"]))
    block.eval()
    kernel, bias = merge_block(block)
    assert kernel.dtype == torch.float64 and kernel.shape == (8, 8 // groups, 3, 3)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    block64 = block.double()
    with torch.no_grad():
        ref = block64(x)
        out = torch.relu(nn.functional.conv2d(x, kernel, bias, padding=1, groups=groups))
    assert rel_diff(ref, out) < 1e-12


def test_se_is_kept_and_passes_through():
    model = small("RepVGG-D2se")
    sd = model.state_dict()
    plan, _, fused, deploy = fuse_state(sd)
    se_keys = [k for k in sd if ".se." in k]
    assert se_keys and all(torch.equal(fused.tensors[k], sd[k]) for k in se_keys)
    assert len(fused.unfused) == 1 + sum(plan.config["num_blocks"])
    assert fused.unfused[0][0] == "stage0.se"
    assert all(c > 0 for c in plan.config["se_channels"])


def test_custom_config_fuses_and_is_recognized_as_custom():
    torch.manual_seed(3)
    model = build_repvgg(
        "RepVGG-A0",
        False,
        num_blocks=(1, 3, 2, 2),
        width_multiplier=(0.25, 0.375, 0.25, 0.125),
        override_groups_map={2: 2, 6: 4},
        use_se=True,
        num_classes=5,
    )
    model = randomize_bn(model, 3).eval()
    sd = model.state_dict()
    plan, _, fused, deploy = fuse_state(sd)
    assert plan.variant == CUSTOM
    assert plan.config["num_blocks"] == [1, 3, 2, 2]
    assert plan.config["widths"] == [16, 16, 48, 64, 64]
    assert plan.config["groups"] == [1, 1, 2, 1, 1, 1, 4, 1, 1]
    assert plan.config["num_classes"] == 5 and plan.num_classes == 5
    x = x_in(48)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


def test_fuse_is_pure_deterministic_and_contiguous():
    model = small("RepVGG-B1g4")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    plan = FUSER.detect(ckpt_of(sd), Options())
    train = FUSER.build_train(plan, sd)
    train_before = {k: v.clone() for k, v in train.state_dict().items()}
    a = FUSER.fuse(plan, sd, train)
    b = FUSER.fuse(plan, sd, train)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    assert all(torch.equal(v, train_before[k]) for k, v in train.state_dict().items())
    assert list(a.tensors) == list(b.tensors) == list(FUSER.build_deploy(plan).state_dict())
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in a.tensors.values())
    json.dumps(a.config)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
def test_half_precision_checkpoints_keep_their_dtype(dtype, tol):
    model = small("RepVGG-B1g4")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    plan, _, fused, deploy = fuse_state(sd)
    assert all(t.dtype == dtype for t in fused.tensors.values())
    assert all(t.is_contiguous() for t in fused.tensors.values())
    # The checkpoint's function, computed in float32 (float64) from its (rounded) weights ...
    up = torch.float64 if dtype == torch.float64 else torch.float32
    ref_model = small("RepVGG-B1g4").to(up)
    ref_model.load_state_dict({k: v.to(up) if v.is_floating_point() else v for k, v in sd.items()})
    x = x_in(32)
    with torch.no_grad():
        ref, out = ref_model(x.to(up)), deploy.to(up)(x.to(up))
    # ... matches the deploy model up to one rounding of the fused weights.
    assert rel_diff(ref, out) < tol
    # The deploy model runs natively in its dtype (the official identity kernel stayed float32).
    with torch.no_grad():
        native = FUSER.build_deploy(plan)
        native = load_strict(native, fused.tensors, "native")(x.to(dtype))
    assert native.dtype == dtype and torch.isfinite(native).all()


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_full_size_official_variants(variant):
    sd = meta_state(variant)
    plan = FUSER.detect(ckpt_of(sd), Options())
    assert (plan.arch, plan.variant, plan.layout) == ("repvgg", variant, "official")
    assert plan.config == VARIANTS[variant].resolve()
    assert plan.num_classes == 1000 and plan.input_size == (3, 224, 224)
    back = Plan.from_metadata(plan.to_metadata())
    assert back.config == plan.config and back.layout == "official"
    with torch.device("meta"):
        rebuilt = RepVGG(back.config, deploy=False).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


def test_variant_names_are_looked_up_loosely():
    assert lookup_variant("a0") == lookup_variant("repvgg_a0") == lookup_variant("RepVGG-A0") == "RepVGG-A0"
    assert lookup_variant("RepVGG-B1g4") == "RepVGG-B1g4" and lookup_variant("d2se") == "RepVGG-D2se"
    with pytest.raises(BadInput, match="unknown RepVGG variant"):
        lookup_variant("C9")


def test_known_backbone_with_other_head_keeps_its_name():
    sd = meta_state("RepVGG-B0", num_classes=10)
    plan = FUSER.detect(ckpt_of(sd), Options())
    assert plan.variant == "RepVGG-B0" and plan.num_classes == 10
    assert any("10 classes" in n for n in plan.notes)


def test_recorded_arch_is_compared_with_the_tensors():
    sd = meta_state("RepVGG-A0")
    same = FUSER.detect(ckpt_of(sd, {"arch": "RepVGG-A0"}), Options())
    assert not any("records arch" in n for n in same.notes)
    other = FUSER.detect(ckpt_of(sd, {"arch": "RepVGG-B0"}), Options())
    assert other.variant == "RepVGG-A0" and any("records arch `RepVGG-B0`" in n for n in other.notes)


def test_custom_configs_detected_from_shapes():
    cfg = dataclasses.replace(
        VARIANTS["RepVGG-B1"],
        num_blocks=(3, 1, 5, 2),
        override_groups_map={1: 2, 4: 4, 9: 2},
        use_se=True,
        in_chans=1,
        num_classes=3,
    ).resolve()
    with torch.device("meta"):
        sd = RepVGG(cfg).state_dict()
    plan = FUSER.detect(ckpt_of(sd), Options())
    assert plan.variant == CUSTOM and plan.config == cfg and plan.input_size == (1, 224, 224)
    assert plan.config["groups"][:5] == [1, 2, 1, 1, 4] and plan.config["use_se"]


def test_g2_and_g4_maps_are_distinguished():
    for v in ("RepVGG-B2", "RepVGG-B2g2", "RepVGG-B2g4"):
        assert FUSER.detect(ckpt_of(meta_state(v)), Options()).variant == v


def test_variant_override_is_checked_against_the_tensors():
    sd = meta_state("RepVGG-A0")
    assert FUSER.detect(ckpt_of(sd), Options(variant="a0")).variant == "RepVGG-A0"
    with pytest.raises(BadInput, match="num_blocks"):
        FUSER.detect(ckpt_of(sd), Options(variant="B0"))


def _timm():
    return pytest.importorskip("timm")


def test_foreign_state_dicts_are_not_this_arch():
    timm = _timm()
    with torch.device("meta"):
        resnet = timm.create_model("resnet18", pretrained=False).state_dict()
        mobileone = timm.create_model("mobileone_s0", pretrained=False).state_dict()
    vanilla = {
        "stem1.0.weight": torch.zeros(8, 3, 4, 4),
        "stem1.0.bias": torch.zeros(8),
        "stages.0.conv1.0.weight": torch.zeros(8, 8, 1, 1),
        "cls2.0.weight": torch.zeros(10, 10, 1, 1),
    }
    for sd in (resnet, mobileone, vanilla, {"weight": torch.zeros(3)}):
        with pytest.raises(NotThisArch, match="no RepVGG branch keys"):
            FUSER.detect(ckpt_of(sd), Options())


def test_deploy_mode_and_extended_dicts_are_refused():
    with pytest.raises(NotThisArch, match="already in deploy form"):
        FUSER.detect(ckpt_of(meta_state("RepVGG-A0", deploy=True)), Options())
    with pytest.raises(NotThisArch, match="already in deploy form"):
        FUSER.detect(ckpt_of(meta_state("RepVGG-A0", deploy=True, layout="timm")), Options())
    sd = meta_state("RepVGG-A0")
    sd["aux_head.weight"] = torch.zeros(3)
    with pytest.raises(NotThisArch, match="aux_head.weight"):
        FUSER.detect(ckpt_of(sd), Options())


def test_broken_repvgg_checkpoints_name_the_key():
    sd = meta_state("RepVGG-A0")
    holed = {k: v for k, v in sd.items() if not k.startswith("stage3.5.")}
    with pytest.raises(KeyMismatch, match=r"stage3\.5\.rbr_dense\.conv\.weight"):
        FUSER.detect(ckpt_of(holed), Options())
    model = small("RepVGG-A0")
    partial = {k: v for k, v in model.state_dict().items() if k != "stage2.1.rbr_1x1.bn.running_var"}
    plan = FUSER.detect(ckpt_of(partial), Options())
    with pytest.raises(KeyMismatch, match="stage2.1.rbr_1x1.bn.running_var"):
        FUSER.build_train(plan, partial)
    bad = dict(model.state_dict())
    bad["stage2.1.rbr_1x1.bn.running_var"] = -bad["stage2.1.rbr_1x1.bn.running_var"]
    plan = FUSER.detect(ckpt_of(bad), Options())
    with pytest.raises(BadInput, match=r"stage2\.1\.rbr_1x1\.bn.*negative"):
        FUSER.fuse(plan, bad, FUSER.build_train(plan, bad))


# --------------------------------------------------------------------------- timm layout


@pytest.mark.parametrize("name", sorted(TIMM_MODELS.values()))
def test_detects_timm_layouts(name):
    timm = _timm()
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
    plan = FUSER.detect(ckpt_of(sd, {"arch": name}), Options())
    variant = next(v for v, t in TIMM_MODELS.items() if t == name)
    assert (plan.variant, plan.layout, plan.config["timm_model"]) == (variant, "timm", name)
    assert not any("records arch" in n for n in plan.notes)


def _check_timm(model: nn.Module, size: int, extras: dict | None = None) -> Plan:
    from timm.utils.model import reparameterize_model

    model = randomize_bn(model, 5).eval()
    sd = model.state_dict()
    plan, _, fused, deploy = fuse_state(sd, extras)
    assert plan.layout == "timm"
    timm_deploy = reparameterize_model(model)  # timm's own deploy model (a copy)
    assert {k: (v.shape, v.dtype) for k, v in timm_deploy.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in fused.tensors.items()
    }
    timm_deploy.load_state_dict(fused.tensors, strict=True)
    x = x_in(size, batch=2)
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, timm_deploy(x)) < 1e-5
        assert rel_diff(ref, deploy(x)) < 1e-5
    return plan


def test_timm_repvgg_a0_full_size():
    timm = _timm()
    torch.manual_seed(0)
    plan = _check_timm(timm.create_model("repvgg_a0", pretrained=False), 64, {"arch": "repvgg_a0"})
    assert plan.variant == "RepVGG-A0"


def timm_reduced(name: str, max_depth: int | None = None, **kw) -> nn.Module:
    """timm's own ByobNet for ``name`` with widths / SHRINK (and depths capped): same code, less work."""
    from timm.models.byobnet import ByobNet, model_cfgs

    base = model_cfgs[name]
    blocks = tuple(dataclasses.replace(b, d=min(b.d, max_depth or b.d), c=b.c / SHRINK) for b in base.blocks)
    stem = min(64, int(blocks[0].c))  # RepVGG's stage0 width rule
    return ByobNet(dataclasses.replace(base, blocks=blocks, stem_chs=stem), **kw)


def test_timm_reduced_b1g4_with_groups():
    _timm()
    torch.manual_seed(0)
    plan = _check_timm(timm_reduced("repvgg_b1g4", num_classes=10), 32, {"arch": "repvgg_a0"})
    assert plan.variant == CUSTOM and max(plan.config["groups"]) == 4
    assert plan.config["groups"][:5] == [1, 1, 4, 1, 4]  # official map: layers 2, 4, ... (stage0 = 0)
    assert any("records arch `repvgg_a0`" in n for n in plan.notes)


def test_timm_reduced_d2se_with_se():
    _timm()
    torch.manual_seed(0)
    plan = _check_timm(timm_reduced("repvgg_d2se", max_depth=3, num_classes=7), 32)
    assert plan.variant == CUSTOM and plan.config["use_se"] and "timm_model" not in plan.config
    assert all(c > 0 for c in plan.config["se_channels"])


def test_official_forward_equals_timm_under_the_name_map():
    """Our official-layout model computes what timm's repvgg does with the same weights, renamed
    by REFERENCE §2's name map: an independent check of the training forward we verify against."""
    _timm()
    ours = small("RepVGG-B1g4", num_classes=10)
    theirs = timm_reduced("repvgg_b1g4", num_classes=10).eval()
    names = {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity"}
    renamed = {}
    for k, v in ours.state_dict().items():
        head, _, rest = k.partition(".")
        if head == "stage0":
            head = "stem"
        elif head == "linear":
            head = "head.fc"
        else:
            head = f"stages.{int(head[5:]) - 1}"
        for a, b in names.items():
            rest = rest.replace(a, b)
        renamed[f"{head}.{rest}"] = v
    theirs.load_state_dict(renamed, strict=True)
    x = x_in(32)
    with torch.no_grad():
        assert rel_diff(ours(x), theirs(x)) < 1e-6


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("arch", ["repvgg", "auto"])
def test_pipeline_end_to_end(tmp_path, arch):
    from repfuse_cli import load_deploy
    from repfuse_cli.pipeline import convert

    model = small("RepVGG-D2se")
    src = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, src)
    out = tmp_path / "deploy.safetensors"
    res = convert(src, out, arch=arch, resolution=32, batch=2)
    assert res["arch"] == "repvgg" and res["variant"] == CUSTOM and res["layout"] == "official"
    assert res["output"] == str(out) and out.exists()
    assert res["verify"]["passed"] and res["verify"]["max_rel_diff"] < 1e-5
    from safetensors.torch import load_file

    tensors = load_file(str(out))
    deploy = small("RepVGG-D2se", deploy=True)
    deploy.load_state_dict(tensors, strict=True)
    loaded = load_deploy(out)
    x = x_in(32)
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, deploy(x)) < 1e-5
        assert rel_diff(ref, loaded(x)) < 1e-5


def test_pipeline_timm_checkpoint(tmp_path):
    timm = _timm()
    from timm.utils.model import reparameterize_model

    from repfuse_cli import load_deploy
    from repfuse_cli.pipeline import convert

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("repvgg_a0", pretrained=False, num_classes=10), 2).eval()
    src = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "repvgg_a0", "epoch": 1}, src)
    res = convert(src, tmp_path / "a0.safetensors", arch="repvgg", resolution=64)
    assert (res["variant"], res["layout"]) == ("RepVGG-A0", "timm") and res["verify"]["passed"]
    loaded = load_deploy(res["output"])
    timm_deploy = reparameterize_model(model)
    timm_deploy.load_state_dict(loaded.state_dict(), strict=True)
    x = x_in(64)
    with torch.no_grad():
        assert rel_diff(model(x), timm_deploy(x)) < 1e-5
