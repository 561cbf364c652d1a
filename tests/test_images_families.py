"""Image-folder verification on the families that landed with their own fusers (MobileOne, FastViT,
RepViT): each converts from its official training format and verifies on the shipped image folder
through its own evaluation transform, with the agreement and both accuracies reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import runner
from test_fastvit import small as fastvit_small
from test_mobileone import small as mobileone_small
from test_repvit import official_checkpoint, trained

from repfuse_cli.cli import app
from repfuse_cli.fusers.repvit import build_repvit

FOLDER = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "heldout_images"


def checkpoint(family: str, path: Path) -> None:
    if family == "mobileone":  # ml-mobileone releases a bare state_dict
        torch.save(mobileone_small("MobileOne-S0").state_dict(), path)
    elif family == "fastvit":  # ml-fastvit's train.py saver
        sd = fastvit_small("FastViT-T8").state_dict()
        torch.save({"state_dict": sd, "state_dict_ema": sd, "arch": "fastvit_t8", "epoch": 3}, path)
    else:  # RepViT's main.py
        official_checkpoint(path, trained(build_repvit("RepViT-M0.6", num_classes=10), seed=3), "repvit_m0_6", 64)


@pytest.mark.parametrize("family", ["mobileone", "fastvit", "repvit"])
def test_family_verifies_on_the_image_folder(family: str, tmp_path: Path) -> None:
    ckpt, out = tmp_path / f"{family}.pth", tmp_path / f"{family}.safetensors"
    checkpoint(family, ckpt)
    r = runner.invoke(app, ["convert", str(ckpt), "-o", str(out), "--resolution", "64", "--quiet"])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["verify", str(ckpt), str(out), "--inputs", str(FOLDER), "--limit", "12",
                            "--resolution", "64", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["arch"] == family and res["verify"]["passed"]
    images = res["verify"]["images"]
    assert images["images"] == 12 and images["top1_agreement"] == 1.0
    assert images["accuracy_train"] is not None and images["accuracy_train"] == images["accuracy_deploy"]
    assert "64" in images["transform"]  # the family's own transform at the asked resolution
