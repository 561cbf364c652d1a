"""VanillaNet fuser: layout, detection, deep-training checks and numerical equivalence."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_diff
from torch import nn

from repfuse_cli.checkpoint import Checkpoint, load_strict
from repfuse_cli.errors import AnnealingUnfinished, BadInput, KeyMismatch
from repfuse_cli.fuser import NotThisArch, Options, Plan
from repfuse_cli.fusers.vanillanet import (
    CUSTOM,
    EPS,
    VARIANTS,
    SeriesAct,
    VanillaCfg,
    VanillaNet,
    VanillaNetDeploy,
    VanillaNetFuser,
    act_learn_at,
    build_vanillanet,
    fuse_tensors,
)

FUSER = VanillaNetFuser()
ADA = "vanillanet_13_x1_5_ada_pool"


# --------------------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random conv weights/biases (variance-preserving) and random BN statistics, in place."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, SeriesAct)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return randomize_bn(model, seed)


def trained(cfg: VanillaCfg, seed: int = 0) -> VanillaNet:
    return randomize(build_vanillanet(cfg, deploy=False), seed)


def meta_state_dict(cfg: VanillaCfg, deploy: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict layout (shapes only) of a full-size model, at no memory cost."""
    with torch.device("meta"):
        return build_vanillanet(cfg, deploy=deploy).state_dict()


def ckpt_of(sd, extras=None) -> Checkpoint:
    return Checkpoint(Path("ckpt.pth"), "torch", sd, "model", ["model"], dict(extras or {}))


def run_fuser(sd, extras=None, options=None):
    """detect -> build_train -> fuse -> build_deploy + strict load, as the pipeline does."""
    plan = FUSER.detect(ckpt_of(sd, extras), options or Options())
    train = FUSER.build_train(plan, sd)
    fused = FUSER.fuse(plan, sd, train)
    deploy = load_strict(FUSER.build_deploy(plan), fused.tensors, "deploy")
    return plan, train, fused, deploy


def small(name: str, unit: int = 8, **overrides) -> VanillaCfg:
    return replace(VARIANTS[name].shrink(unit), **overrides)


# --------------------------------------------------------------------------- layout facts (REFERENCE §1)


def test_vanillanet_5_keys_and_shapes_match_the_official_layout():
    bn5 = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    exp: dict[str, tuple[int, ...]] = {
        "stem1.0.weight": (512, 3, 4, 4),
        "stem1.0.bias": (512,),
        "stem2.0.weight": (512, 512, 1, 1),
        "stem2.0.bias": (512,),
        "stem2.2.weight": (512, 1, 7, 7),
        "cls1.2.weight": (1000, 4096, 1, 1),
        "cls1.2.bias": (1000,),
        "cls2.0.weight": (1000, 1000, 1, 1),
        "cls2.0.bias": (1000,),
    }

    def bn(prefix, n):
        exp.update({f"{prefix}.{s}": (() if s == "num_batches_tracked" else (n,)) for s in bn5})

    bn("stem1.1", 512), bn("stem2.1", 512), bn("stem2.2.bn", 512), bn("cls1.3", 1000)
    dims = [512, 1024, 2048, 4096]
    for i in range(3):
        d, do = dims[i], dims[i + 1]
        exp[f"stages.{i}.conv1.0.weight"], exp[f"stages.{i}.conv1.0.bias"] = (d, d, 1, 1), (d,)
        exp[f"stages.{i}.conv2.0.weight"], exp[f"stages.{i}.conv2.0.bias"] = (do, d, 1, 1), (do,)
        exp[f"stages.{i}.act.weight"] = (do, 1, 7, 7)
        bn(f"stages.{i}.conv1.1", d), bn(f"stages.{i}.conv2.1", do), bn(f"stages.{i}.act.bn", do)
    got = {k: tuple(v.shape) for k, v in meta_state_dict(VARIANTS["vanillanet_5"]).items()}
    assert len(exp) == 89 and got == exp

    dep_exp = {"stem.0.weight": (512, 3, 4, 4), "stem.0.bias": (512,), "stem.1.weight": (512, 1, 7, 7)}
    dep_exp["stem.1.bias"] = (512,)
    for i in range(3):
        do = dims[i + 1]
        dep_exp[f"stages.{i}.conv.weight"], dep_exp[f"stages.{i}.conv.bias"] = (do, dims[i], 1, 1), (do,)
        dep_exp[f"stages.{i}.act.weight"], dep_exp[f"stages.{i}.act.bias"] = (do, 1, 7, 7), (do,)
    dep_exp["cls.2.weight"], dep_exp["cls.2.bias"] = (1000, 4096, 1, 1), (1000,)
    dep = {k: tuple(v.shape) for k, v in meta_state_dict(VARIANTS["vanillanet_5"], deploy=True).items()}
    assert len(dep_exp) == 18 and dep == dep_exp


# (deploy M, train M) from REFERENCE §1
PARAMS = {
    "vanillanet_5": (15.52, 22.33),
    "vanillanet_6": (32.51, 56.12),
    "vanillanet_7": (32.80, 56.67),
    "vanillanet_8": (37.10, 65.18),
    "vanillanet_9": (41.40, 73.68),
    "vanillanet_10": (45.69, 82.19),
    "vanillanet_11": (49.99, 90.69),
    "vanillanet_12": (54.29, 99.20),
    "vanillanet_13": (58.59, 107.70),
    "vanillanet_13_x1_5": (127.80, 236.94),
    ADA: (127.80, 236.94),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_param_counts_match_the_reference_table(name):
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_vanillanet(name, deploy=d).parameters()) for d in (True, False)]
    assert [round(c / 1e6, 2) for c in counts] == list(PARAMS[name])


def test_variant_table_structure():
    assert len(VARIANTS) == 11
    for name, cfg in VARIANTS.items():
        unit = 768 if "x1_5" in name else 512
        assert cfg.dims[0] == unit and cfg.dims[-1] == 8 * unit and len(cfg.dims) == len(cfg.strides) + 1
        assert len(cfg.strides) == int(name.split("_")[1]) - 2
    assert VARIANTS[ADA].ada_pool == (0, 38, 19, 0, 0, 0, 0, 0, 0, 10, 0)
    assert VARIANTS[ADA].stem_stride_padding == (3, 1) and VARIANTS["vanillanet_13"].stem_stride_padding == (
        4,
        0,
    )


def test_ada_pool_spatial_sizes_at_224():
    model = build_vanillanet(small(ADA, 4), deploy=True)
    sizes = []
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        x = model.stem(x)
        sizes.append(x.shape[-1])
        for block in model.stages:
            x = block(x)
            sizes.append(x.shape[-1])
    assert sizes == [75, 75, 38, 19, 19, 19, 19, 19, 19, 19, 10, 10]


# --------------------------------------------------------------------------- numerical equivalence


def reference_forward(sd, cfg: VanillaCfg, x: torch.Tensor, act_learn: float = 1.0) -> torch.Tensor:
    """The official training-mode computation (REFERENCE §1), written functionally from the keys."""

    def bn(x, p):
        w, b, m, v = (sd[f"{p}.{s}"] for s in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(x, m, v, w, b, training=False, eps=1e-6)

    def conv(x, p, **kw):
        return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], **kw)

    def act(x, p):
        y = F.conv2d(F.relu(x), sd[f"{p}.weight"], None, padding=cfg.act_num, groups=x.shape[1])
        return bn(y, f"{p}.bn")

    stride, padding = (3, 1) if cfg.ada_pool else (4, 0)
    x = F.leaky_relu(bn(conv(x, "stem1.0", stride=stride, padding=padding), "stem1.1"), act_learn)
    x = act(bn(conv(x, "stem2.0"), "stem2.1"), "stem2.2")
    for i, s in enumerate(cfg.strides):
        p = f"stages.{i}"
        x = F.leaky_relu(bn(conv(x, f"{p}.conv1.0"), f"{p}.conv1.1"), act_learn)
        x = bn(conv(x, f"{p}.conv2.0"), f"{p}.conv2.1")
        ada = cfg.ada_pool[i] if cfg.ada_pool else 0
        if s != 1:
            x = F.adaptive_max_pool2d(x, (ada, ada)) if ada else F.max_pool2d(x, s)
        x = act(x, f"{p}.act")
    x = F.leaky_relu(bn(conv(F.adaptive_avg_pool2d(x, 1), "cls1.2"), "cls1.3"), act_learn)
    return conv(x, "cls2.0").flatten(1)


@pytest.mark.parametrize(
    ("name", "overrides", "res"),
    [("vanillanet_5", {}, 64), ("vanillanet_8", {"act_num": 4, "in_chans": 2}, 64), (ADA, {}, 224)],
)
def test_train_model_is_the_official_computation(name, overrides, res):
    cfg = small(name, 8, **overrides)
    model = trained(cfg, seed=21)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    sd = model.state_dict()
    x = torch.randn(1 if res > 64 else 2, cfg.in_chans, res, res, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for slope in (1.0, 0.3):
            assert rel_diff(reference_forward(sd, cfg, x, slope), model.set_act_learn(slope)(x)) < 1e-6


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_fuses_exactly_at_small_width(name):
    cfg = small(name, 8)
    model = trained(cfg, seed=len(name))
    sd = model.state_dict()
    plan, train, fused, deploy = run_fuser(sd, {"epoch": 299, "args": {"model": name, "decay_epochs": 100}})
    assert VanillaCfg.from_config(plan.config) == cfg  # structure taken from args.model
    assert plan.variant == CUSTOM  # widths differ from the official ones
    res = 224 if cfg.ada_pool else 64
    x = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out_train, out = model(x), train(x), deploy(x)
    assert torch.equal(ref, out_train)  # build_train holds exactly the checkpoint's weights
    assert ref.shape == (2, 1000)
    assert rel_diff(ref, out) < 1e-5
    depth = cfg.depth
    assert fused.counts == {"bn_folded": 3 * depth + 4, "chain_merges": depth + 2, "branch_merges": 0}
    assert fused.unfused == []
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in fused.tensors.values())


def test_act_num_4_custom_classes_and_channels():
    cfg = small("vanillanet_6", 16, act_num=4, num_classes=10, in_chans=1)
    model = trained(cfg, seed=3)
    plan, _, fused, deploy = run_fuser(model.state_dict())
    got = VanillaCfg.from_config(plan.config)
    assert (got.act_num, got.num_classes, got.in_chans, got.strides) == (4, 10, 1, (2, 2, 2, 1))
    assert plan.input_size == (1, 224, 224) and plan.num_classes == 10
    assert fused.tensors["stages.3.act.weight"].shape == (128, 1, 9, 9)
    assert fused.tensors["stem.0.weight"].shape == (16, 1, 4, 4)
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5
    assert deploy(x).shape == (3, 10)


def test_merge_is_wrong_when_annealing_unfinished():
    model = trained(small("vanillanet_5", 16), seed=5)
    _, _, _, deploy = run_fuser(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5
        model.set_act_learn(0.5)
        assert rel_diff(model(x), deploy(x)) > 1e-2


def _naive_fp32_fold(sd, depth):
    """The official path: fold and merge in the weights' own dtype (float32 here)."""

    def fold(w, b, bn):
        t = sd[f"{bn}.weight"] / (sd[f"{bn}.running_var"] + EPS).sqrt()
        b = torch.zeros_like(t) if b is None else b
        return w * t.reshape(-1, 1, 1, 1), sd[f"{bn}.bias"] + (b - sd[f"{bn}.running_mean"]) * t

    def merge(wo, bo, wi, bi):
        wo = wo[:, :, 0, 0]
        return torch.einsum("oi,icjk->ocjk", wo, wi), bo + wo @ bi

    def conv_bn(c, bn):
        return fold(sd[f"{c}.weight"], sd[f"{c}.bias"], bn)

    out = {}
    out["stem.0.weight"], out["stem.0.bias"] = merge(*conv_bn("stem2.0", "stem2.1"), *conv_bn("stem1.0", "stem1.1"))
    out["stem.1.weight"], out["stem.1.bias"] = fold(sd["stem2.2.weight"], None, "stem2.2.bn")
    for i in range(depth):
        p = f"stages.{i}"
        out[f"{p}.conv.weight"], out[f"{p}.conv.bias"] = merge(
            *conv_bn(f"{p}.conv2.0", f"{p}.conv2.1"), *conv_bn(f"{p}.conv1.0", f"{p}.conv1.1")
        )
        out[f"{p}.act.weight"], out[f"{p}.act.bias"] = fold(sd[f"{p}.act.weight"], None, f"{p}.act.bn")
    out["cls.2.weight"], out["cls.2.bias"] = merge(sd["cls2.0.weight"], sd["cls2.0.bias"], *conv_bn("cls1.2", "cls1.3"))
    return out


def test_float64_fold_is_at_least_as_accurate_as_a_naive_fp32_fold():
    cfg = small("vanillanet_6", 64, num_classes=100)
    model = trained(cfg, seed=7)
    sd = model.state_dict()
    ref, _ = fuse_tensors({k: v.double() for k, v in sd.items()}, cfg.depth)  # exact, in float64
    ours, _ = fuse_tensors(sd, cfg.depth)
    naive = _naive_fp32_fold(sd, cfg.depth)
    assert ref["stem.0.weight"].dtype == torch.float64 and ours["stem.0.weight"].dtype == torch.float32
    ours_total = naive_total = 0.0
    for k, r in ref.items():
        e_ours, e_naive = (ours[k].double() - r).abs(), (naive[k].double() - r).abs()
        assert (e_ours <= e_naive).all(), k  # ours is the correctly rounded float64 result
        ours_total, naive_total = ours_total + e_ours.sum().item(), naive_total + e_naive.sum().item()
    assert naive_total > 1.5 * ours_total

    # the same holds for the function: deploy outputs against the float64 deploy model
    def outputs(tensors):
        m = load_strict(build_vanillanet(cfg, deploy=True).double(), {k: v.double() for k, v in tensors.items()}, "d")
        with torch.no_grad():
            return m(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

    exact = outputs(ref)
    err_ours, err_naive = rel_diff(exact, outputs(ours)), rel_diff(exact, outputs(naive))
    assert err_ours <= err_naive and err_ours < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_dicts_keep_their_dtype(dtype):
    cfg = small("vanillanet_7", 8)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in trained(cfg, seed=2).state_dict().items()}
    plan, train, fused, deploy = run_fuser(sd)
    assert all(t.dtype == dtype and t.is_contiguous() for t in fused.tensors.values())
    assert train.stem1[0].weight.dtype == dtype and deploy.stem[0].weight.dtype == dtype
    # computed in float64, rounded to the dtype only at the end: no half-precision arithmetic
    exact, _ = fuse_tensors({k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}, cfg.depth)
    for k, v in fused.tensors.items():
        assert torch.equal(v, exact[k].to(dtype)), k


def test_fuse_is_deterministic_and_leaves_inputs_alone():
    cfg = small("vanillanet_8", 8)
    sd = trained(cfg, seed=4).state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    plan = FUSER.detect(ckpt_of(sd), Options())
    train = FUSER.build_train(plan, sd)
    a, b = FUSER.fuse(plan, sd, train), FUSER.fuse(plan, sd, train)
    assert list(a.tensors) == list(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert all(torch.equal(before[k], sd[k]) for k in sd) and list(before) == list(sd)
    assert a.config == plan.config


def test_missing_bn_counters_are_tolerated():
    cfg = small("vanillanet_5", 8)
    model = trained(cfg, seed=6)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    _, _, _, deploy = run_fuser(sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


def test_plan_metadata_round_trip_rebuilds_the_deploy_model():
    cfg = small(ADA, 8, num_classes=7)
    sd = trained(cfg, seed=8).state_dict()
    plan, _, fused, deploy = run_fuser(sd, {"args": {"model": ADA}})
    json.dumps(plan.config)
    again = Plan.from_metadata(plan.to_metadata())
    rebuilt = load_strict(FUSER.build_deploy(again), fused.tensors, "rebuilt")
    assert isinstance(rebuilt, VanillaNetDeploy) and rebuilt.cfg == deploy.cfg
    assert isinstance(rebuilt.stages[1].pool, nn.AdaptiveMaxPool2d) and rebuilt.stem[0].stride == (3, 3)


# --------------------------------------------------------------------------- deep-training records


def _v5_meta():
    return meta_state_dict(VARIANTS["vanillanet_5"])


def test_unfinished_annealing_is_refused_naming_both_numbers():
    ckpt = ckpt_of(_v5_meta(), {"epoch": 42, "args": {"model": "vanillanet_5", "decay_epochs": 100}})
    with pytest.raises(AnnealingUnfinished) as e:
        FUSER.detect(ckpt, Options())
    msg = str(e.value)
    assert "42" in msg and "100" in msg and "--assume-annealed" in msg and "0.420" in msg
    assert e.value.exit_code == 2


def test_annealing_boundary():
    sd = _v5_meta()
    with pytest.raises(AnnealingUnfinished, match="epoch 99"):  # act_learn was 0.99 during epoch 99
        FUSER.detect(ckpt_of(sd, {"epoch": 99, "args": {"decay_epochs": 100}}), Options())
    with pytest.raises(AnnealingUnfinished, match="0.976"):  # cosine schedule (--decay_linear false)
        FUSER.detect(ckpt_of(sd, {"epoch": 90, "args": {"decay_epochs": 100, "decay_linear": False}}), Options())
    FUSER.detect(ckpt_of(sd, {"epoch": 100, "args": {"decay_epochs": 100}}), Options())  # act_learn 1


def test_assume_annealed_goes_on_with_a_note():
    ckpt = ckpt_of(_v5_meta(), {"epoch": 42, "args": {"model": "vanillanet_5", "decay_epochs": 100}})
    plan = FUSER.detect(ckpt, Options(assume_annealed=True))
    assert plan.variant == "vanillanet_5"
    assert any("--assume-annealed" in n and "42" in n for n in plan.notes)


def test_missing_records_add_an_assumption_note():
    for extras in ({}, {"epoch": 10}, {"args": {"decay_epochs": 100}}):
        plan = FUSER.detect(ckpt_of(_v5_meta(), extras), Options())
        assert any("assume" in n and "act_learn == 1" in n for n in plan.notes), extras
    plan = FUSER.detect(ckpt_of(_v5_meta(), {"epoch": 100, "args": {"decay_epochs": 100}}), Options())
    assert not any("assume" in n for n in plan.notes) and any("finished" in n for n in plan.notes)


def test_act_learn_schedule_of_the_official_main():
    assert act_learn_at(0, 100) == 0.0 and act_learn_at(25, 100) == 0.25 and act_learn_at(100, 100) == 1.0
    assert act_learn_at(300, 100) == 1.0 and act_learn_at(5, 0) == 1.0
    assert act_learn_at(50, 100, linear=False) == pytest.approx(0.5)
    assert act_learn_at(25, 100, linear=False) == pytest.approx(0.5 * (1 - 2**-0.5))


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_is_detected_from_its_full_size_layout(name):
    sd = meta_state_dict(VARIANTS[name])
    plan = FUSER.detect(ckpt_of(sd), Options())
    expected = "vanillanet_13_x1_5" if name == ADA else name  # the twins share every weight
    assert (plan.arch, plan.variant, plan.layout) == ("vanillanet", expected, "official")
    assert VanillaCfg.from_config(plan.config) == VARIANTS[expected]
    assert plan.input_size == (3, 224, 224) and plan.num_classes == 1000
    json.dumps(plan.config)


def test_ada_pool_twin_is_told_apart_only_by_args_model():
    sd = meta_state_dict(VARIANTS["vanillanet_13_x1_5"])
    plain = FUSER.detect(ckpt_of(sd), Options())
    assert plain.variant == "vanillanet_13_x1_5" and any("--variant" in n for n in plain.notes)
    for extras, options in (
        ({"epoch": 299, "args": {"model": ADA, "decay_epochs": 100}}, Options()),
        ({}, Options(variant=ADA)),
    ):
        plan = FUSER.detect(ckpt_of(sd, extras), options)
        assert plan.variant == ADA and plan.config["ada_pool"] == [0, 38, 19, 0, 0, 0, 0, 0, 0, 10, 0]
    named = FUSER.detect(ckpt_of(sd, {"args": {"model": "vanillanet_13_x1_5"}}), Options())
    assert named.variant == "vanillanet_13_x1_5" and named.config["ada_pool"] is None
    # --variant overrides args.model
    plan = FUSER.detect(ckpt_of(sd, {"args": {"model": ADA}}), Options(variant="vanillanet_13_x1_5"))
    assert plan.config["ada_pool"] is None


def test_custom_dims_are_converted_with_their_full_config():
    cfg = VanillaCfg(dims=(24, 48, 48, 96), strides=(2, 1, 2), num_classes=5)
    model = trained(cfg, seed=9)
    plan, _, _, deploy = run_fuser(model.state_dict())
    assert plan.variant == CUSTOM
    assert plan.config == {
        "dims": [24, 48, 48, 96],
        "strides": [2, 1, 2],
        "act_num": 3,
        "num_classes": 5,
        "in_chans": 3,
        "ada_pool": None,
        "drop_rate": 0.0,
    }
    assert any("inferred" in n for n in plan.notes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(model(x), deploy(x)) < 1e-5


def test_width_scaled_official_pattern_keeps_the_official_structure():
    plan = FUSER.detect(ckpt_of(meta_state_dict(small("vanillanet_9", 32))), Options())
    assert plan.variant == CUSTOM and plan.config["strides"] == list(VARIANTS["vanillanet_9"].strides)


def test_foreign_state_dicts_are_not_this_arch():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        resnet = timm.create_model("resnet18").state_dict()
    repvgg = {
        "stage0.rbr_dense.conv.weight": torch.empty(48, 3, 3, 3, device="meta"),
        "stage0.rbr_1x1.conv.weight": torch.empty(48, 3, 1, 1, device="meta"),
        "linear.weight": torch.empty(1000, 1280, device="meta"),
    }
    for sd in (resnet, repvgg):
        with pytest.raises(NotThisArch, match="not a VanillaNet"):
            FUSER.detect(ckpt_of(sd), Options())
    with pytest.raises(NotThisArch, match="already a deploy-mode VanillaNet"):
        FUSER.detect(ckpt_of(meta_state_dict(VARIANTS["vanillanet_5"], deploy=True)), Options())


def test_broken_vanillanet_layouts_raise_key_mismatch(tmp_path):
    headless = {k: v for k, v in _v5_meta().items() if not k.startswith(("cls1.", "cls2."))}
    with pytest.raises(KeyMismatch, match=r"without cls1\.2\.weight, cls2\.0\.weight \(a backbone"):
        FUSER.detect(ckpt_of(headless), Options())
    from repfuse_cli.commands import inspect_file

    small_headless = {k: v for k, v in trained(small("vanillanet_5")).state_dict().items() if not k.startswith("cls")}
    torch.save({"model": small_headless}, tmp_path / "backbone.pth")
    info = inspect_file(tmp_path / "backbone.pth")  # describing a file does not fail on what it lacks
    assert info.mode == "unknown" and "without cls1.2.weight" in info.warnings[-1]
    sd = _v5_meta()
    del sd["stages.1.conv2.0.weight"]
    with pytest.raises(KeyMismatch, match=r"stages\.1\.conv2\.0\.weight"):
        FUSER.detect(ckpt_of(sd), Options())
    sd = _v5_meta()
    sd["stages.2.act.weight"] = torch.empty(4096, 1, 9, 9, device="meta")
    with pytest.raises(KeyMismatch, match="act_num"):
        FUSER.detect(ckpt_of(sd), Options())


def test_bad_variant_option():
    with pytest.raises(BadInput, match="unknown"):
        FUSER.detect(ckpt_of(_v5_meta()), Options(variant="vanillanet_99"))
    with pytest.raises(BadInput, match="stages"):
        FUSER.detect(ckpt_of(_v5_meta()), Options(variant="vanillanet_13"))
    with pytest.raises(BadInput, match="unknown VanillaNet variant"):
        build_vanillanet("vanillanet_4", deploy=True)
    damaged = Plan("vanillanet", CUSTOM, config={**VARIANTS["vanillanet_5"].to_config(), "strides": [2, 2]})
    with pytest.raises(BadInput, match="invalid VanillaNet config"):
        FUSER.build_deploy(damaged)


def test_registry_finds_the_fuser():
    from repfuse_cli.fuser import Fuser
    from repfuse_cli.registry import get_fuser

    fuser = get_fuser("vanillanet")
    assert isinstance(fuser, VanillaNetFuser) and isinstance(fuser, Fuser) and fuser.name == "vanillanet"


# --------------------------------------------------------------------------- end to end (library pipeline)


def save_like_main_py(path: Path, sd, ema, epoch: int, model: str = "vanillanet_5") -> Path:
    """A checkpoint as huawei-noah/VanillaNet's main.py writes it (DDP prefixes, Namespace args)."""
    args = argparse.Namespace(model=model, decay_epochs=100, decay_linear=True, epochs=300, act_num=3, drop=0.0)
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in sd.items()},
            "model_ema": ema,
            "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]},
            "epoch": epoch,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": args,
        },
        path,
    )
    return path


def test_end_to_end_main_py_checkpoint(tmp_path):
    pipeline = pytest.importorskip("repfuse_cli.pipeline", reason="repfuse_cli.pipeline not written yet")
    from safetensors.torch import load_file

    from repfuse_cli import load_deploy

    cfg = small("vanillanet_5", 16)
    model, ema_model = trained(cfg, seed=11), trained(cfg, seed=12)
    path = save_like_main_py(tmp_path / "checkpoint-299.pth", model.state_dict(), ema_model.state_dict(), 299)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref_ema = model(x), ema_model(x)
    for arch in ("vanillanet", "auto"):
        out = tmp_path / f"deploy-{arch}.safetensors"
        result = pipeline.convert(path, out, arch=arch, quiet=True)
        assert result["arch"] == "vanillanet" and result["variant"] == CUSTOM and result["key"] == "model"
        assert Path(result["output"]) == out and result["verify"]["passed"]
        assert result["verify"]["max_rel_diff"] < 1e-5
        assert result["fused"] == {"bn_folded": 13, "chain_merges": 5, "branch_merges": 0}
        deployed = load_deploy(out)
        tensors = load_file(str(out))
        assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors.values())
        mine = load_strict(build_vanillanet(cfg, deploy=True), tensors, "deploy file")
        with torch.no_grad():
            assert rel_diff(ref, deployed(x)) < 1e-5
            assert rel_diff(ref, mine(x)) < 1e-5
    out = tmp_path / "deploy-ema.safetensors"
    result = pipeline.convert(path, out, arch="vanillanet", key="model_ema")
    with torch.no_grad():
        assert result["key"] == "model_ema" and rel_diff(ref_ema, load_deploy(out)(x)) < 1e-5


def test_end_to_end_refuses_unfinished_annealing(tmp_path):
    pipeline = pytest.importorskip("repfuse_cli.pipeline", reason="repfuse_cli.pipeline not written yet")
    sd = trained(small("vanillanet_5", 8)).state_dict()
    path = save_like_main_py(tmp_path / "checkpoint-30.pth", sd, sd, 30)
    out = tmp_path / "deploy.safetensors"
    with pytest.raises(AnnealingUnfinished, match="epoch 30.*decay_epochs 100"):
        pipeline.convert(path, out, arch="auto")
    assert not out.exists()
    result = pipeline.convert(path, out, arch="vanillanet", options=Options(assume_annealed=True))
    assert result["verify"]["passed"] and any("--assume-annealed" in n for n in result["notes"])


@pytest.mark.slow
def test_end_to_end_full_size_vanillanet_5(tmp_path):
    pipeline = pytest.importorskip("repfuse_cli.pipeline", reason="repfuse_cli.pipeline not written yet")
    from repfuse_cli import load_deploy

    model = trained(VARIANTS["vanillanet_5"], seed=13)
    sd = model.state_dict()
    path = save_like_main_py(tmp_path / "checkpoint-best.pth", sd, sd, 299)
    out = tmp_path / "vanillanet_5.safetensors"
    result = pipeline.convert(path, out, arch="auto")
    assert result["variant"] == "vanillanet_5" and result["verify"]["max_rel_diff"] < 1e-5
    assert result["params_before"] == 22_328_800 and result["params_after"] == 15_523_304
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(model(x), load_deploy(out)(x)) < 1e-5
