"""FastViT fuser: variants, the official and timm layouts, routing, dtypes and the pipeline.

The official inference-mode keys and shapes come from ``fixtures/apple_official_layouts.json``
(written once from apple/ml-fastvit's ``fastvit_XX(inference_mode=True)``): the suite does not
need the official code. Full-size variants are built on the meta device; numerical checks use
the same structure with fewer channels (and, for SA36/MA36, fewer blocks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn, rel_diff
from torch import nn

from repfuse_cli.checkpoint import Checkpoint, load_strict
from repfuse_cli.errors import BadInput, KeyMismatch
from repfuse_cli.fuser import NotThisArch, Options, Plan
from repfuse_cli.fusers.fastvit import (
    CUSTOM,
    LAYOUTS,
    TIMM_MODELS,
    VARIANTS,
    FastViT,
    FastViTFuser,
    LargeKernelConv,
    RepCPE,
    RepMixer,
    build_fastvit,
    fold_cpe,
    fold_large,
    fold_repmixer,
    lookup_variant,
)
from repfuse_cli.registry import BUILTIN, get_fuser

FUSER = FastViTFuser()
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "apple_official_layouts.json").read_text())["fastvit"]
SHORT = {v: v.split("-")[1].lower() for v in VARIANTS}  # "FastViT-SA24" -> "sa24"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, and layer scales of order 1 (their 1e-5
    initial value would hide a wrong RepMixer fold below any tolerance), eval mode."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"layer_scale(_\d)?(\.gamma)?$", name):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
    return model.eval()


def reduced(variant: str) -> dict:
    """``variant``'s structure (mixers, RepCPE, MLP ratios) with fewer channels, and at most
    (2, 2, 4, 2) blocks for the 36-block variants."""
    cfg = VARIANTS[variant]
    dims = (16, 32, 64, 128) if variant != "FastViT-T8" else (8, 16, 32, 64)
    layers = tuple(min(n, m) for n, m in zip(cfg.layers, (2, 2, 4, 2), strict=True)) if "36" in variant else cfg.layers
    return {"embed_dims": dims, "layers": layers, "num_classes": 10}


def small(variant: str, deploy: bool = False, seed: int = 0, layout: str = "official") -> FastViT:
    torch.manual_seed(seed)
    return randomize(build_fastvit(variant, deploy, layout=layout, **reduced(variant)), seed)


def ckpt_of(sd: dict, extras: dict | None = None) -> Checkpoint:
    return Checkpoint(Path("mem.pth"), "torch", dict(sd), None, extras=dict(extras or {}))


def meta_state(variant: str, deploy: bool = False, layout: str = "official", **kw) -> dict:
    cfg = dataclasses.replace(VARIANTS[variant], **kw).resolve()
    with torch.device("meta"):
        return FastViT(cfg, deploy=deploy, layout=layout).state_dict()


def fuse_state(sd: dict, extras: dict | None = None, options: Options | None = None):
    plan = FUSER.detect(ckpt_of(sd, extras), options or Options())
    train = FUSER.build_train(plan, sd)
    fused = FUSER.fuse(plan, sd, train)
    deploy = load_strict(FUSER.build_deploy(plan), fused.tensors, "deploy")
    return plan, train, fused, deploy


def x_in(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def shapes(sd: dict) -> dict:
    return {k: list(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- registry, tables


def test_registered_before_conv_bn():
    assert type(get_fuser("fastvit")) is FastViTFuser
    names = list(BUILTIN)
    assert names.index("mobileone") < names.index("fastvit") < names.index("conv-bn")


PARAMS = {  # millions, train -> deploy, as the official code builds them (the paper lists T8 at 3.6M)
    "FastViT-T8": (4.03, 4.00),
    "FastViT-T12": (7.55, 7.51),
    "FastViT-S12": (9.47, 9.43),
    "FastViT-SA12": (11.58, 11.55),
    "FastViT-SA24": (21.55, 21.50),
    "FastViT-SA36": (31.53, 31.46),
    "FastViT-MA36": (44.07, 43.98),
}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_params_match_table_and_official_code(variant):
    cfg = VARIANTS[variant].resolve()
    with torch.device("meta"):
        counts = [sum(p.numel() for p in FastViT(cfg, deploy=d).parameters()) for d in (False, True)]
    assert [round(c / 1e6, 2) for c in counts] == list(PARAMS[variant])
    ref = FIXTURE[SHORT[variant]]
    assert counts == [ref["params_train"], ref["params_deploy"]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keys_and_shapes_are_the_official_ones(variant):
    ref = FIXTURE[SHORT[variant]]
    assert shapes(meta_state(variant, deploy=True)) == ref["deploy"]
    train = meta_state(variant)
    assert len(train) == ref["train_keys"]
    lines = "\n".join(f"{k} {list(v.shape)}" for k, v in train.items())
    assert hashlib.sha256(lines.encode()).hexdigest() == ref["train_digest"]


def test_variant_names_are_looked_up_loosely():
    assert lookup_variant("sa24") == lookup_variant("fastvit_sa24") == lookup_variant("FastViT-SA24") == "FastViT-SA24"
    with pytest.raises(BadInput, match="unknown FastViT variant"):
        lookup_variant("xl99")


# --------------------------------------------------------------------------- fusion


def _expected_unfused(cfg: dict) -> tuple[int, int, int]:
    blocks = sum(cfg["layers"])
    attn = sum(n for n, t in zip(cfg["layers"], cfg["token_mixers"], strict=True) if t == "attention")
    return blocks, attn, blocks + attn  # FFN BNs, attention norms, layer scales (1 or 2 per block)


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
    assert plan.variant == CUSTOM and plan.layout == "official"
    cfg = plan.config
    assert cfg["token_mixers"] == list(VARIANTS[variant].token_mixers) and cfg["pos_embs"] == list(
        VARIANTS[variant].pos_embs
    )
    ffn, attn, scales = _expected_unfused(cfg)
    why = [m for m, _ in fused.unfused]
    assert sum(m.endswith(".convffn.conv.bn") for m in why) == ffn
    assert sum(m.endswith(".norm") for m in why) == attn
    assert sum(".layer_scale" in m or m.endswith("layer_scale") for m in why) == scales
    assert "conv_exp.se" in why
    floats = [t for t in fused.tensors.values() if t.is_floating_point()]  # kept BNs count batches in int64
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in floats)
    # What stays unfused is the training model's own tensors, unchanged.
    kept = [k for k in fused.tensors if ".convffn." in k or "layer_scale" in k or ".token_mixer.q" in k]
    assert kept and all(torch.equal(fused.tensors[k], sd[k]) for k in kept)


def test_parts_fold_exactly_in_float64():
    torch.manual_seed(0)
    n = LAYOUTS["official"]
    x = torch.randn(2, 8, 11, 11, dtype=torch.float64)
    mixer = randomize(RepMixer(8, 3, True, False, n).double(), 3)
    k, b = fold_repmixer(mixer, "m")
    with torch.no_grad():
        assert rel_diff(mixer(x), nn.functional.conv2d(x, k, b, padding=1, groups=8)) < 1e-12
    large = randomize(LargeKernelConv(8, 16, 7, 3, 2, False, n).double(), 4)
    k, b = fold_large(large, "l")
    with torch.no_grad():
        assert rel_diff(large(x), nn.functional.conv2d(x, k, b, stride=2, padding=3, groups=8)) < 1e-12
    cpe = RepCPE(8, 7, False, n).double()
    k, b = fold_cpe(cpe)
    with torch.no_grad():
        assert rel_diff(cpe(x), nn.functional.conv2d(x, k, b, padding=3, groups=8)) < 1e-12


def test_fuse_is_pure_and_deterministic():
    model = small("FastViT-SA12")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    plan = FUSER.detect(ckpt_of(sd), Options())
    train = FUSER.build_train(plan, sd)
    a, b = FUSER.fuse(plan, sd, train), FUSER.fuse(plan, sd, train)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    json.dumps(a.config)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2), (torch.float64, 1e-12)])
def test_half_precision_checkpoints_keep_their_dtype(dtype, tol):
    model = small("FastViT-SA12")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    plan, _, fused, deploy = fuse_state(sd)
    assert all(t.dtype == dtype and t.is_contiguous() for t in fused.tensors.values() if t.is_floating_point())
    up = torch.float64 if dtype == torch.float64 else torch.float32
    ref_model = small("FastViT-SA12").to(up)
    ref_model.load_state_dict({k: v.to(up) if v.is_floating_point() else v for k, v in sd.items()})
    x = x_in()
    with torch.no_grad():
        assert rel_diff(ref_model(x.to(up)), deploy.to(up)(x.to(up))) < tol


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_full_size_official_variants(variant):
    sd = meta_state(variant)
    plan = FUSER.detect(ckpt_of(sd, {"arch": TIMM_MODELS[variant]}), Options())
    assert (plan.arch, plan.variant, plan.layout) == ("fastvit", variant, "official")
    assert plan.config == VARIANTS[variant].resolve()
    assert plan.num_classes == 1000 and plan.input_size == (3, 256, 256) and not plan.notes
    back = Plan.from_metadata(plan.to_metadata())
    FUSER.check_config(back, None, "meta")
    with torch.device("meta"):
        assert shapes(FastViT(back.config, deploy=True).state_dict()) == FIXTURE[SHORT[variant]]["deploy"]


def test_recorded_arch_is_not_trusted():
    sd = meta_state("FastViT-SA12")
    plan = FUSER.detect(ckpt_of(sd, {"arch": "fastvit_sa24"}), Options())
    assert plan.variant == "FastViT-SA12" and any("records arch `fastvit_sa24`" in n for n in plan.notes)


def test_variant_override_and_other_heads():
    sd = meta_state("FastViT-T12", num_classes=0)
    plan = FUSER.detect(ckpt_of(sd), Options(variant="t12"))
    assert plan.variant == "FastViT-T12" and plan.num_classes is None
    with pytest.raises(BadInput, match="mlp_hidden"):
        FUSER.detect(ckpt_of(sd), Options(variant="s12"))


def test_foreign_deploy_and_broken_state_dicts():
    for sd in (meta_state("FastViT-T8", deploy=True), meta_state("FastViT-T8", deploy=True, layout="timm")):
        with pytest.raises(NotThisArch, match="already in deploy form"):
            FUSER.detect(ckpt_of(sd), Options())
    from repfuse_cli.fusers.mobileone import VARIANTS as MOBILEONE
    from repfuse_cli.fusers.mobileone import MobileOne

    with torch.device("meta"):
        mobileone = MobileOne(MOBILEONE["MobileOne-S0"].resolve()).state_dict()
    with pytest.raises(NotThisArch, match="no FastViT stem keys"):
        FUSER.detect(ckpt_of(mobileone), Options())
    sd = meta_state("FastViT-SA12")
    sd["dist_head.weight"] = torch.zeros(3)
    with pytest.raises(NotThisArch, match="dist_head.weight"):
        FUSER.detect(ckpt_of(sd), Options())
    feat = {k: v for k, v in meta_state("FastViT-T8").items() if not k.startswith(("conv_exp.", "head."))}
    feat["norm0.weight"] = torch.zeros(48)
    with pytest.raises(NotThisArch, match="fork_feat"):
        FUSER.detect(ckpt_of(feat), Options())
    holed = {k: v for k, v in meta_state("FastViT-SA12").items() if not k.startswith("network.6.")}
    with pytest.raises(KeyMismatch, match="not numbered"):
        FUSER.detect(ckpt_of(holed), Options())
    model = small("FastViT-T8")
    partial = {k: v for k, v in model.state_dict().items() if k != "network.2.1.token_mixer.mixer.rbr_skip.running_var"}
    plan = FUSER.detect(ckpt_of(partial), Options())
    with pytest.raises(KeyMismatch, match=r"network\.2\.1\.token_mixer\.mixer\.rbr_skip\.running_var"):
        FUSER.build_train(plan, partial)


# --------------------------------------------------------------------------- timm layout


def _timm():
    return pytest.importorskip("timm")


def timm_small(variant: str, seed: int = 0) -> nn.Module:
    """timm's own FastVit with ``reduced(variant)``'s shape: the same code, less work."""
    timm = _timm()
    kw = reduced(variant)
    torch.manual_seed(seed)
    return randomize(timm.create_model(TIMM_MODELS[variant], pretrained=False, **kw), seed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_timm_layouts_when_named(variant):
    timm = _timm()
    with torch.device("meta"):
        sd = timm.create_model(TIMM_MODELS[variant], pretrained=False).state_dict()
    plan = FUSER.detect(ckpt_of(sd), Options())
    assert (plan.variant, plan.layout) == (variant, "timm")
    assert plan.config == {**VARIANTS[variant].resolve(), "timm_model": TIMM_MODELS[variant]}
    with pytest.raises(NotThisArch, match=f"leaves it to conv-bn --model timm:{TIMM_MODELS[variant]}"):
        FastViTFuser().detect(ckpt_of(sd), Options(under_auto=True))


@pytest.mark.parametrize("variant", ["FastViT-T8", "FastViT-SA12", "FastViT-MA36"])
def test_timm_layout_matches_timms_reparameterized_model(variant):
    _timm()
    from timm.utils.model import reparameterize_model

    model = timm_small(variant)
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


def test_official_and_timm_layouts_compute_the_same():
    """The same weights under both layouts (through the name map) give the same outputs."""
    _timm()
    from repfuse_cli.fusers.fastvit import official_names

    theirs = timm_small("FastViT-SA12")
    names = official_names(list(theirs.state_dict()))
    ours = build_fastvit("sa12", **reduced("FastViT-SA12")).eval()
    ours.load_state_dict({names[k]: v for k, v in theirs.state_dict().items()}, strict=True)
    x = x_in()
    with torch.no_grad():
        assert rel_diff(theirs(x), ours(x)) < 1e-6


# --------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("arch", ["fastvit", "auto"])
def test_pipeline_official_saver_format(tmp_path, arch):
    """ml-fastvit's train.py (timm's CheckpointSaver): state_dict, state_dict_ema, arch = the
    model name, which is also a timm model name with other keys."""
    from safetensors.torch import load_file

    from repfuse_cli import convert, load_deploy

    torch.manual_seed(0)
    model = randomize(build_fastvit("t8"), 3)
    sd = model.state_dict()
    src = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"epoch": 3, "arch": "fastvit_t8", "state_dict": sd, "state_dict_ema": sd, "version": 2}, src)
    out = tmp_path / "t8.safetensors"
    res = convert(src, out, arch=arch, resolution=64, batch=2)
    assert (res["arch"], res["variant"], res["layout"]) == ("fastvit", "FastViT-T8", "official")
    assert res["verify"]["passed"] and res["verify"]["max_rel_diff"] < 1e-5
    deploy = build_fastvit("t8", deploy=True).eval()
    deploy.load_state_dict(load_file(str(out)), strict=True)
    loaded = load_deploy(out)
    x = x_in()
    with torch.no_grad():
        ref = model(x)
        assert rel_diff(ref, deploy(x)) < 1e-5 and rel_diff(ref, loaded(x)) < 1e-5


def test_pipeline_timm_checkpoint(tmp_path):
    _timm()
    from timm.utils.model import reparameterize_model

    from repfuse_cli import convert, load_deploy
    from repfuse_cli.pipeline import detect

    model = timm_small("FastViT-SA12")
    src = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "fastvit_sa12", "epoch": 1}, src)
    fuser, _ = detect(ckpt_of(model.state_dict(), {"arch": "fastvit_sa12"}), "auto")
    assert fuser.name == "conv-bn"  # under auto a timm layout keeps going to conv-bn
    res = convert(src, tmp_path / "sa12.safetensors", arch="fastvit", resolution=64)
    assert (res["arch"], res["layout"]) == ("fastvit", "timm") and res["verify"]["passed"]
    timm_deploy = reparameterize_model(model)
    timm_deploy.load_state_dict(load_deploy(res["output"]).state_dict(), strict=True)
    x = x_in()
    with torch.no_grad():
        assert rel_diff(model(x), timm_deploy(x)) < 1e-5


def test_eval_transform():
    plan = FUSER.detect(ckpt_of(meta_state("FastViT-T8")), Options())
    t = FUSER.eval_transform(plan, ckpt_of({}))
    assert (t.size, t.interpolation, t.crop_pct) == (256, "bicubic", 0.9)
    plan = FUSER.detect(ckpt_of(meta_state("FastViT-SA36")), Options())
    assert FUSER.eval_transform(plan, ckpt_of({})).crop_pct == 0.95
    args = {"args": {"crop_pct": 0.875, "input_size": None, "img_size": 224, "interpolation": "bilinear"}}
    t = FUSER.eval_transform(plan, ckpt_of({}, args))
    assert (t.size, t.interpolation, t.crop_pct) == (224, "bilinear", 0.875) and "args" in t.source


# --------------------------------------------------------------------------- extra folds (optional)


@pytest.mark.parametrize("variant, layout", [("FastViT-SA12", "official"), ("FastViT-T8", "timm")])
def test_extra_folds_leave_no_batchnorm_or_layer_scale(variant, layout):
    model = small(variant, layout=layout)
    sd = model.state_dict()
    plan, _, fused, deploy = fuse_state(sd, options=Options(extra_folds=True))
    assert plan.config["extra_folds"] is True and plan.layout == layout
    assert any("load_deploy" in n for n in plan.notes)
    assert not any("running_var" in k or "layer_scale" in k for k in fused.tensors)
    assert [m for m, _ in fused.unfused] == [f"{'conv_exp' if layout == 'official' else 'final_conv'}.se"]
    ffn, attn, scales = _expected_unfused(plan.config)
    assert fused.counts["layer_scales_folded"] == scales
    default = fuse_state(sd)[2]
    assert fused.counts["bn_folded"] == default.counts["bn_folded"] + ffn + attn
    assert len(fused.tensors) < len(default.tensors)
    x = x_in()
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5
    back = Plan.from_metadata(plan.with_config(fused.config).to_metadata())
    rebuilt = load_strict(FUSER.build_deploy(back), fused.tensors, "rebuilt")
    with torch.no_grad():
        assert rel_diff(model(x), rebuilt(x)) < 1e-5


def test_extra_folds_through_convert_and_load_deploy(tmp_path):
    from repfuse_cli import convert, load_deploy

    model = small("FastViT-SA12")
    src = tmp_path / "sa12.pth.tar"
    torch.save({"state_dict": model.state_dict(), "arch": "fastvit_sa12"}, src)
    res = convert(src, tmp_path / "sa12.safetensors", arch="auto", options=Options(extra_folds=True), resolution=64)
    assert (res["arch"], res["layout"]) == ("fastvit", "official") and res["verify"]["passed"]
    x = x_in()
    with torch.no_grad():
        assert rel_diff(model(x), load_deploy(res["output"])(x)) < 1e-5


def test_extra_folds_flag_on_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from repfuse_cli.cli import app

    src = tmp_path / "sa12.pth.tar"
    torch.save({"state_dict": small("FastViT-SA12").state_dict()}, src)
    runner = CliRunner()
    plain = runner.invoke(
        app, ["convert", str(src), "-o", str(tmp_path / "a.safetensors"), "--resolution", "64", "--json"]
    )
    extra = runner.invoke(
        app,
        ["convert", str(src), "-o", str(tmp_path / "b.safetensors"), "--resolution", "64", "--extra-folds", "--json"],
    )
    assert plain.exit_code == 0 and extra.exit_code == 0, (plain.stderr, extra.stderr)
    p, e = json.loads(plain.stdout), json.loads(extra.stdout)
    assert p["unfused"] and not [u for u in e["unfused"] if "layer_scale" in u["module"] or ".norm" in u["module"]]
    assert e["fused"].get("layer_scales_folded", 0) > 0 and e["bn_folded"] > p["bn_folded"] and e["verify"]["passed"]
