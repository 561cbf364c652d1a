"""Deploy speed under onnxruntime: the training graph against the deploy graph, both exported by
`repfuse export`'s exporter and run by onnxruntime's CPU provider, next to the same pair in torch eager.

Method: per model, a seeded training checkpoint (RepVGG-A0 in the official layout via
``common.write_checkpoint``; timm mobileone_s0, fastvit_t8 and resnet18 with randomized BN statistics,
saved as timm's train.py saves them) is loaded once; ``repfuse_cli.onnxbench.bench_file_onnxruntime``
exports both models (opset 20, dynamic batch) and times each graph's ``InferenceSession.run`` (median of
``--repeats`` after warm-up, one intra-op thread per core as torch uses), and ``commands.bench_file``
times the torch eager pair on the same inputs. onnxruntime fuses a Conv followed by a
BatchNormalization in its own graph optimizer, so a plain conv-BN network (resnet18) shows what folding
adds there (about nothing); what only structural re-parameterization removes (parallel branches, BNs on
identities) shows in the other rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TIMM = {"timm mobileone_s0": "mobileone_s0", "timm fastvit_t8": "fastvit_t8", "timm resnet18": "resnet18"}


def _timm_checkpoint(name: str, path: Path) -> None:
    import timm
    import torch

    torch.manual_seed(common.SEED)
    model = timm.create_model(name, num_classes=1000)
    g = torch.Generator().manual_seed(common.SEED)
    with torch.no_grad():  # random BN statistics and affine parameters (defaults hide what folding does)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    torch.save({"arch": name, "state_dict": model.state_dict()}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--models", nargs="*", default=["RepVGG-A0", *TIMM])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--resolution", type=int, default=224)
    args = ap.parse_args()

    from repfuse_cli.commands import bench_file
    from repfuse_cli.onnxbench import bench_file_onnxruntime

    rows: list[dict[str, Any]] = []
    runtime = ""
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.models:
            path = Path(tmp) / f"{label.replace(' ', '_')}.pth"
            if label in TIMM:
                _timm_checkpoint(TIMM[label], path)
            else:
                common.write_checkpoint(label, path)
            kw = {"batches": tuple(args.batches), "repeats": args.repeats, "resolution": args.resolution}
            ort = bench_file_onnxruntime(path, **kw)
            eager = bench_file(path, **kw)
            runtime = ort.runtime or runtime
            for o, e in zip(ort.rows, eager.rows, strict=True):
                rows.append(
                    {
                        "model": label,
                        "batch": o.batch,
                        "ort_train_ms": o.train_ms,
                        "ort_deploy_ms": o.deploy_ms,
                        "ort_speedup": o.speedup,
                        "eager_speedup": e.speedup,
                    }
                )
                msg = f"{label} batch {o.batch}: onnxruntime {o.speedup:.2f}x, torch eager {e.speedup:.2f}x"
                print(msg, flush=True)
    common.dump_json(
        {"machine": common.machine(), "runtime": runtime, "resolution": args.resolution, "repeats": args.repeats,
         "rows": rows},
        args.json,
    )  # fmt: skip


if __name__ == "__main__":
    main()
