"""Peak memory of image-folder verification does not grow with the folder (issue 15).

    python bench/bench_images_rss.py [SMALL BIG] [--json PATH]      (default 50 5000)

Writes SMALL and BIG random 320x240 JPEGs to a temporary folder, then in a fresh process per size
runs ``repfuse_cli.imagecheck.evaluate_images`` on a small conv-BN network with the ImageNet
transform (resize 256, crop 224), batch 32, and reports each process's peak RSS. Were the images
held in memory, BIG of them would take BIG x 3 x 224 x 224 x 4 bytes (3 GB for 5000).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
from repfuse_cli.fuser import EvalTransform
from repfuse_cli.imagecheck import evaluate_images
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
t0 = time.perf_counter()
r = evaluate_images(net, net, sys.argv[1], EvalTransform(), batch=32, limit=int(sys.argv[2]))
print(json.dumps({"images": r.images, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    argv = sys.argv[1:]
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    small, big = (int(a) for a in argv[:2]) if len(argv) > 1 else (50, 5000)
    import torch
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 256, (240, 320, 3), generator=g, dtype=torch.uint8).numpy()
        for i in range(big):
            Image.fromarray(base).save(Path(d) / f"{i:05d}.jpg", quality=85)
        rows = []
        for n in (small, big):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, d, str(n)], cwd=ROOT, capture_output=True, text=True, check=True
            )
            rows.append({**json.loads(out.stdout), "wall_s": round(time.perf_counter() - t0, 1)})
    for r in rows:
        print(f"{r['images']:6d} images: peak RSS {r['peak_rss_mb']:.0f} MB, {r['images'] / r['seconds']:.0f} images/s")
    print(f"growth: {rows[1]['peak_rss_mb'] - rows[0]['peak_rss_mb']:+.0f} MB for {big - small} more images")
    if json_path:
        Path(json_path).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
