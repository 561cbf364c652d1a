"""MobileOne fuser: variants, the official and timm layouts, routing, dtypes and the pipeline.

The official inference-mode keys and shapes come from ``fixtures/apple_official_layouts.json``
(written once from apple/ml-mobileone's ``mobileone(variant=..., inference_mode=True)``): the
suite does not need the official code.
"""

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
from repfuse_cli.fusers.mobileone import (
    CUSTOM,
    TIMM_MODELS,
    VARIANTS,
    MobileOne,
    MobileOneBlock,
    MobileOneFuser,
    build_mobileone,
    fold_block,
    lookup_variant,
)
from repfuse_cli.registry import BUILTIN, get_fuser

FUSER = MobileOneFuser()
SHRINK = 8
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "apple_official_layouts.json").read_text())["mobileone"]
SHORT = {v: v.split("-")[1].lower() for v in VARIANTS}  # "MobileOne-S0" -> "s0" (the official variant=)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(variant: str, deploy: bool = False, seed: int = 0, **kw) -> MobileOne:
    """``variant`` with widths / SHRINK, seeded, random BN statistics, eval mode."""
    torch.manual_seed(seed)
    wm = tuple(w / SHRINK for w in VARIANTS[variant].width_multipliers)
    kw.setdefault("num_classes", 10)
    return randomize_bn(build_mobileone(variant, deploy, width_multipliers=wm, **kw), seed).eval()


def ckpt_of(sd: dict, extras: dict | None = None) -> Checkpoint:
    return Checkpoint(Path("mem.pth"), "torch", dict(sd), None, extras=dict(extras or {}))


def meta_state(variant: str, deploy: bool = False, layout: str = "official", **kw) -> dict:
    cfg = dataclasses.replace(VARIANTS[variant], **kw).resolve()
    with torch.device("meta"):
        return MobileOne(cfg, deploy=deploy, layout=layout).state_dict()


def fuse_state(sd: dict, extras: dict | None = None, options: Options | None = None, fuser: Fuser = FUSER):
    plan = fuser.detect(ckpt_of(sd, extras), options or Options())
    train = fuser.build_train(plan, sd)
    fused = fuser.fuse(plan, sd, train)
    deploy = load_strict(fuser.build_deploy(plan), fused.tensors, "deploy")
    return plan, train, fused, deploy


def x_in(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def shapes(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- registry, tables


def test_registered_before_conv_bn():
    assert type(get_fuser("mobileone")) is MobileOneFuser
    names = list(BUILTIN)
    assert names.index("mobileone") < names.index("conv-bn")


PARAMS = {  # millions, train -> deploy; the paper's table: S0 2.1M ... S4 14.8M deploy
    "MobileOne-S0": (5.29, 2.08),
    "MobileOne-S1": (4.83, 4.76),
    "MobileOne-S2": (7.88, 7.81),
    "MobileOne-S3": (10.17, 10.08),
    "MobileOne-S4": (14.95, 14.84),
}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_params_match_table_and_official_code(variant):
    cfg = VARIANTS[variant].resolve()
    with torch.device("meta"):
        counts = [sum(p.numel() for p in MobileOne(cfg, deploy=d).parameters()) for d in (False, True)]
    assert [round(c / 1e6, 2) for c in counts] == list(PARAMS[variant])
    ref = FIXTURE[SHORT[variant]]
    assert counts == [ref["params_train"], ref["params_deploy"]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_deploy_keys_and_shapes_are_the_official_ones(variant):
    ref = FIXTURE[SHORT[variant]]
    assert shapes(meta_state(variant, deploy=True)) == ref["deploy"]
    train = meta_state(variant)
    assert len(train) == ref["train_keys"]
    import hashlib

    lines = "\n".join(f"{k} {list(v.shape)}" for k, v in train.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == ref["train_digest"]


def test_variant_names_are_looked_up_loosely():
    assert lookup_variant("s0") == lookup_variant("mobileone_s0") == lookup_variant("MobileOne-S0") == "MobileOne-S0"
    with pytest.raises(BadInput, match="unknown MobileOne variant"):
        lookup_variant("s9")


# --------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fusion_matches_training_model(variant):
    model = small(variant)
    sd = model.state_dict()
    plan, train, fused, deploy = fuse_state(sd)
    x = x_in()
    with torch.no_grad():
        ref, out, via_train = model(x), deploy(x), train(x)
    assert torch.equal(ref, via_train)
    assert rel_diff(ref, out) < 1e-5
    assert plan.layout == "official" and plan.variant == CUSTOM  # shrunken widths
    n_blocks = 1 + 2 * sum(plan.config["num_blocks"])
    assert fused.counts["branch_merges"] == n_blocks
    assert fused.counts["bn_folded"] == sum(p.endswith("running_var") for p in sd)
    assert len(fused.unfused) == sum(c > 0 for c in plan.config["se_channels"])
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in fused.tensors.values())


@pytest.mark.parametrize("groups, k", [(1, 3), (4, 3), (8, 3), (1, 1)])
def test_block_fold_is_exact_in_float64(groups, k):
    torch.manual_seed(groups)
    block = MobileOneBlock(8, 8, k, 1, groups, branches=3, se_hidden=0).double()
    block = randomize_bn(block, groups).eval()
    kernel, bias = fold_block(block)
    assert kernel.dtype == torch.float64 and kernel.shape == (8, 8 // groups, k, k)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = block.linear(x)
        out = nn.functional.conv2d(x, kernel, bias, padding=k // 2, groups=groups)
    assert rel_diff(ref, out) < 1e-12


def test_fuse_is_pure_and_deterministic():
    model = small("MobileOne-S0")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    plan = FUSER.detect(ckpt_of(sd), Options())
    train = FUSER.build_train(plan, sd)
    a, b = FUSER.fuse(plan, sd, train), FUSER.fuse(plan, sd, train)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    json.dumps(a.config)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
def test_half_precision_checkpoints_keep_their_dtype(dtype, tol):
    model = small("MobileOne-S1")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    plan, _, fused, deploy = fuse_state(sd)
    assert all(t.dtype == dtype and t.is_contiguous() for t in fused.tensors.values())
    up = torch.float64 if dtype == torch.float64 else torch.float32
    ref_model = small("MobileOne-S1").to(up)
    ref_model.load_state_dict({k: v.to(up) if v.is_floating_point() else v for k, v in sd.items()})
    x = x_in()
    with torch.no_grad():
        assert rel_diff(ref_model(x.to(up)), deploy.to(up)(x.to(up))) < tol
        native = load_strict(FUSER.build_deploy(plan), fused.tensors, "native")(x.to(dtype))
    assert native.dtype == dtype and torch.isfinite(native).all()


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_full_size_official_variants(variant):
    sd = meta_state(variant)
    plan = FUSER.detect(ckpt_of(sd), Options())
    assert (plan.arch, plan.variant, plan.layout) == ("mobileone", variant, "official")
    assert plan.config == VARIANTS[variant].resolve()
    assert plan.num_classes == 1000 and plan.input_size == (3, 224, 224)
    back = Plan.from_metadata(plan.to_metadata())
    FUSER.check_config(back, None, "meta")
    with torch.device("meta"):
        assert shapes(MobileOne(back.config, deploy=True).state_dict()) == FIXTURE[SHORT[variant]]["deploy"]


def test_other_heads_and_variant_override():
    sd = meta_state("MobileOne-S2", num_classes=7)
    plan = FUSER.detect(ckpt_of(sd, {"arch": "mobileone_s3"}), Options())
    assert plan.variant == "MobileOne-S2" and plan.num_classes == 7
    assert any("7 classes" in n for n in plan.notes) and any("records arch `mobileone_s3`" in n for n in plan.notes)
    assert FUSER.detect(ckpt_of(sd), Options(variant="s2")).variant == "MobileOne-S2"
    with pytest.raises(BadInput, match="widths"):
        FUSER.detect(ckpt_of(sd), Options(variant="s1"))


def test_foreign_and_deploy_state_dicts_are_not_this_arch():
    from repfuse_cli.fusers.repvgg import VARIANTS as REPVGG
    from repfuse_cli.fusers.repvgg import RepVGG

    with torch.device("meta"):
        repvgg = RepVGG(REPVGG["RepVGG-A0"].resolve()).state_dict()
    for sd in (repvgg, {"weight": torch.zeros(3)}):
        with pytest.raises(NotThisArch, match="no MobileOne branch keys"):
            FUSER.detect(ckpt_of(sd), Options())
    for layout in ("official", "timm"):
        with pytest.raises(NotThisArch, match="already in deploy form"):
            FUSER.detect(ckpt_of(meta_state("MobileOne-S0", deploy=True, layout=layout)), Options())
    sd = meta_state("MobileOne-S0")
    sd["aux.weight"] = torch.zeros(3)
    with pytest.raises(NotThisArch, match="aux.weight"):
        FUSER.detect(ckpt_of(sd), Options())


def test_broken_checkpoints_name_the_key():
    sd = meta_state("MobileOne-S1")
    holed = {k: v for k, v in sd.items() if not k.startswith("stage2.3.")}
    with pytest.raises(KeyMismatch, match=r"stage2\.3\.rbr_conv\.0\.conv\.weight"):
        FUSER.detect(ckpt_of(holed), Options())
    no_skip = {k: v for k, v in sd.items() if not k.startswith("stage2.2.rbr_skip.")}
    with pytest.raises(KeyMismatch, match=r"`stage2\.2` lacks a skip branch"):
        FUSER.detect(ckpt_of(no_skip), Options())
    model = small("MobileOne-S1")
    bad = dict(model.state_dict())
    bad["stage2.2.rbr_scale.bn.running_var"] = -bad["stage2.2.rbr_scale.bn.running_var"].abs()
    plan = FUSER.detect(ckpt_of(bad), Options())
    with pytest.raises(BadInput, match=r"stage2\.2\.rbr_scale\.bn.*negative"):
        FUSER.fuse(plan, bad, FUSER.build_train(plan, bad))


# --------------------------------------------------------------------------- timm layout


def _timm():
    return pytest.importorskip("timm")


def timm_reduced(name: str, wf: tuple[float, ...] | None = None, **kw) -> nn.Module:
    """timm's own ByobNet for ``name`` with widths / SHRINK (or ``wf``): the same code, less work.
    (timm rounds widths to multiples of 8: S0 / SHRINK would not survive that.)"""
    from timm.models.byobnet import ByobNet, _mobileone_bcfg, model_cfgs

    variant = next(v for v, t in TIMM_MODELS.items() if t == name)
    cfg = VARIANTS[variant]
    wf = wf or tuple(w / SHRINK for w in cfg.width_multipliers)
    se_blocks = (0, 0, 5, 1) if cfg.use_se else ()
    blocks = _mobileone_bcfg(wf=wf, se_blocks=se_blocks, num_conv_branches=cfg.num_conv_branches)
    stem = min(64, int(64 * wf[0]))
    return ByobNet(dataclasses.replace(model_cfgs[name], blocks=blocks, stem_chs=stem), **kw)


@pytest.mark.parametrize("name", sorted(TIMM_MODELS.values()))
def test_detects_timm_layouts_when_named(name):
    timm = _timm()
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
    plan = FUSER.detect(ckpt_of(sd, {"arch": name}), Options())
    variant = next(v for v, t in TIMM_MODELS.items() if t == name)
    assert (plan.variant, plan.layout, plan.config["timm_model"]) == (variant, "timm", name)
    assert plan.config == {**VARIANTS[variant].resolve(), "timm_model": name}


def test_timm_layout_under_auto_is_left_to_conv_bn():
    timm = _timm()
    from repfuse_cli.pipeline import detect

    with torch.device("meta"):
        sd = timm.create_model("mobileone_s1", pretrained=False).state_dict()
    with pytest.raises(NotThisArch, match="leaves it to conv-bn --model timm:mobileone_s1"):
        MobileOneFuser().detect(ckpt_of(sd), Options(under_auto=True))
    fuser, plan = detect(ckpt_of(sd, {"arch": "mobileone_s1"}), "auto")
    assert fuser.name == "conv-bn"
    fuser, plan = detect(ckpt_of(sd, {"arch": "mobileone_s1"}), "mobileone")
    assert (fuser.name, plan.layout) == ("mobileone", "timm")
    fuser, plan = detect(ckpt_of(meta_state("MobileOne-S1"), {"arch": "mobileone_s1"}), "auto")
    assert (fuser.name, plan.layout) == ("mobileone", "official")


@pytest.mark.parametrize("name", ["mobileone_s0", "mobileone_s4"])
def test_timm_reduced_matches_timms_reparameterized_model(name):
    _timm()
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    wf = (0.25, 0.25, 0.25, 0.5) if name == "mobileone_s0" else None
    model = randomize_bn(timm_reduced(name, wf, num_classes=10), 5).eval()
    sd = model.state_dict()
    plan, _, fused, deploy = fuse_state(sd)
    assert plan.layout == "timm" and plan.variant == CUSTOM
    timm_deploy = reparameterize_model(model)
    assert shapes(timm_deploy.state_dict()) == shapes(fused.tensors)
    timm_deploy.load_state_dict(fused.tensors, strict=True)
    x = x_in()
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, timm_deploy(x)) < 1e-5
        assert rel_diff(ref, deploy(x)) < 1e-5


def test_official_forward_equals_timm_under_the_name_map():
    """An independent check of our training forward: timm's MobileOne with our weights renamed."""
    _timm()
    theirs = timm_reduced("mobileone_s4", num_classes=10).eval()
    cfg = FUSER.detect(ckpt_of(theirs.state_dict()), Options()).config  # timm rounds SE widths up to 8
    torch.manual_seed(0)
    ours = randomize_bn(build_mobileone(cfg), 3).eval()
    names = {"rbr_conv": "conv_kxk", "rbr_scale": "conv_scale", "rbr_skip": "identity", "se.reduce": "attn.fc1"}
    names["se.expand"] = "attn.fc2"
    renamed = {}
    for k, v in ours.state_dict().items():
        head, _, rest = k.partition(".")
        head = {"stage0": "stem", "linear": "head.fc"}.get(head) or f"stages.{int(head[5:]) - 1}"
        for a, b in names.items():
            rest = rest.replace(a, b)
        renamed[f"{head}.{rest}"] = v
    theirs.load_state_dict(renamed, strict=True)
    x = x_in()
    with torch.no_grad():
        assert rel_diff(ours(x), theirs(x)) < 1e-6


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("arch", ["mobileone", "auto"])
def test_pipeline_official_bare_state_dict(tmp_path, arch):
    from safetensors.torch import load_file

    from repfuse_cli import convert, load_deploy

    model = small("MobileOne-S0")
    src = tmp_path / "mobileone_s0_unfused.pth.tar"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, src)  # a bare state_dict, DDP prefixes
    out = tmp_path / "s0.safetensors"
    res = convert(src, out, arch=arch, resolution=32, batch=2)
    assert (res["arch"], res["layout"]) == ("mobileone", "official")
    assert res["verify"]["passed"] and res["verify"]["max_rel_diff"] < 1e-5
    deploy = small("MobileOne-S0", deploy=True)
    deploy.load_state_dict(load_file(str(out)), strict=True)
    loaded = load_deploy(out)
    x = x_in()
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, deploy(x)) < 1e-5 and rel_diff(ref, loaded(x)) < 1e-5


def test_pipeline_timm_checkpoint_with_explicit_arch(tmp_path):
    timm = _timm()
    from timm.utils.model import reparameterize_model

    from repfuse_cli import convert, load_deploy

    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("mobileone_s0", pretrained=False, num_classes=10), 2).eval()
    src = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "mobileone_s0", "epoch": 1}, src)
    res = convert(src, tmp_path / "s0.safetensors", arch="mobileone", resolution=64)
    assert (res["variant"], res["layout"]) == ("MobileOne-S0", "timm") and res["verify"]["passed"]
    loaded = load_deploy(res["output"])
    timm_deploy = reparameterize_model(model)
    timm_deploy.load_state_dict(loaded.state_dict(), strict=True)
    x = x_in(64)
    with torch.no_grad():
        assert rel_diff(model(x), timm_deploy(x)) < 1e-5


def test_eval_transform():
    plan = FUSER.detect(ckpt_of(meta_state("MobileOne-S0")), Options())
    t = FUSER.eval_transform(plan, ckpt_of({}))
    assert (t.size, t.interpolation, t.crop_pct) == (224, "bilinear", 0.875)
    plan = FUSER.detect(ckpt_of(meta_state("MobileOne-S3")), Options())
    assert FUSER.eval_transform(plan, ckpt_of({})).crop_pct == 0.9
