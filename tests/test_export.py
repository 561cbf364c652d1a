"""ONNX export (issue 16): the graph onnxruntime runs computes the training model's function.

Exports are the slow part (seconds each on a busy machine): the RepVGG sample is exported once
per module and shared; the remaining tests use tiny toy networks.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_bn
from safetensors.torch import load_file
from torch import nn

from repfuse_cli import convert, load_deploy
from repfuse_cli.errors import BadInput, RepfuseError, VerifyFailed
from repfuse_cli.export import export, export_file, export_model
from repfuse_cli.onnxbench import bench_onnxruntime
from repfuse_cli.onnxcheck import prove
from repfuse_cli.onnxgraph import MissingExtra, StagedOnnx, check_opset, op_counts, require_onnx
from repfuse_cli.verification import run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
REPVGG = SAMPLES / "repvgg_tiny.pth.tar"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_out(path: Path, x: torch.Tensor) -> torch.Tensor:
    (y,) = session(path).run(["output"], {"input": x.numpy()})
    return torch.from_numpy(y)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def leftovers(d: Path) -> list[str]:
    """Hidden staging directories or files an export may have left behind."""
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


class Toy(nn.Module):
    """conv-BN-ReLU, a second conv-BN and a classifier: small enough to export in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(Toy(), seed).eval()


# --- the RepVGG sample, from its training checkpoint (shared) ------------------------------------


@pytest.fixture(scope="module")
def repvgg_export(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("repvgg") / "repvgg.onnx"
    return out, export_file(REPVGG, out, resolution=32)


@pytest.fixture(scope="module")
def repvgg_json(repvgg_export) -> tuple[Path, dict]:
    out, result = repvgg_export
    return out, result.to_dict()


def test_checkpoint_export_dynamic_batch_matches_training_model(repvgg_json):
    out, res = repvgg_json
    assert res["output"] == str(out) and out.is_file()
    assert not out.with_name(out.name + ".data").exists() and leftovers(out.parent) == []
    assert res["input_shape"] == ["batch", 3, 32, 32] and res["dynamic_batch"] and res["opset"] == 20
    assert res["input_name"] == "input" and res["output_name"] == "output"
    assert res["bytes"] == out.stat().st_size
    v = res["verify"]
    assert v["passed"] and v["diverges_at"] is None and v["runtime"].startswith("onnxruntime 1.")
    assert [c["batch"] for c in v["checks"]] == [1, 3]

    # the file itself, at batch 1 and 3, against the training model of the checkpoint
    from repfuse_cli.commands import load_pair
    from repfuse_cli.pipeline import Source

    train = load_pair(Source.of(REPVGG, resolution=32), None).train
    for n in (1, 3):
        x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(10 + n))
        y = ort_out(out, x)
        assert y.shape == (n, 6)
        assert rel(run(train, x, torch.float32), y) < 1e-4


def test_checkpoint_export_graph_and_op_counts(repvgg_json):
    out, res = repvgg_json
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["output"]
    ops = op_counts(model)
    assert ops == res["ops_after"]
    assert "BatchNormalization" not in ops  # fully folded
    # the training graph keeps the identity-branch BNs the exporter cannot fold (2 blocks of this
    # sample have one); re-parameterization removes them, one 1x1 Conv per block and every Add
    before, after = res["ops_before"], res["ops_after"]
    assert before["BatchNormalization"] == 2 and after.get("BatchNormalization", 0) == 0
    assert before["Conv"] == 14 and after["Conv"] == 7
    assert before["Add"] == 9 and "Add" not in after
    assert res["nodes_before"] == sum(before.values()) and res["nodes_after"] == sum(after.values())
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["arch"] == "repvgg" and meta["key"] == "state_dict" and meta["repfuse_version"]
    assert meta["source_sha256"] == __import__("hashlib").sha256(REPVGG.read_bytes()).hexdigest()
    assert meta == res["metadata"]


def test_existing_output_is_refused_without_force(repvgg_json):
    out, _ = repvgg_json
    before = out.read_bytes()
    with pytest.raises(RepfuseError, match="--force") as e:
        export(REPVGG, out, resolution=32)
    assert e.value.exit_code == 2 and out.read_bytes() == before


# --- the two other sources: a deploy file alone; a checkpoint with a DEPLOY file -----------------


@pytest.fixture(scope="module")
def repvgg_deploy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "repvgg.deploy.safetensors"
    convert(REPVGG, out, report=False)
    return out


def test_deploy_file_alone_exports_against_its_pytorch_model(repvgg_deploy, tmp_path):
    out = tmp_path / "d.onnx"
    res = export(repvgg_deploy, out, resolution=32, static_batch=True, batch=2)
    assert res["source_kind"] == "deploy file" and res["ops_before"] is None
    assert res["verify"]["passed"] and "deploy model" in res["verify"]["device"]
    assert res["input_shape"] == [2, 3, 32, 32] and not res["dynamic_batch"]
    assert [c["batch"] for c in res["verify"]["checks"]] == [2, 2]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["checkpoint_sha256"] == __import__("hashlib").sha256(REPVGG.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 32, 32)
    assert rel(run(load_deploy(repvgg_deploy), x, torch.float32), ort_out(out, x)) < 1e-5
    with pytest.raises(BadInput, match="deploy file"):
        export(repvgg_deploy, tmp_path / "e.onnx", repvgg_deploy)


def test_checkpoint_with_broken_deploy_weights_fails_with_no_file(repvgg_deploy, tmp_path):
    tensors = load_file(repvgg_deploy)
    k = next(k for k in tensors if k.endswith("weight") and tensors[k].dim() == 4)
    tensors[k] = tensors[k] * 1.01  # 1% off: the PyTorch model would fail verify too
    broken = tmp_path / "broken_deploy.pth"
    torch.save(tensors, broken)
    out = tmp_path / "broken.onnx"
    with pytest.raises(VerifyFailed, match="no file written") as e:
        export(REPVGG, out, broken, resolution=32, compare_training=False)
    assert e.value.exit_code == 1
    res = e.value.result
    assert res["output"] is None and not res["verify"]["passed"] and res["verify"]["diverges_at"] is None
    assert not out.exists() and leftovers(tmp_path) == []
    # the same weights, unbroken, through the same path pass
    torch.save(load_file(repvgg_deploy), broken)
    ok = export(REPVGG, out, broken, resolution=32, compare_training=False)
    assert ok["verify"]["passed"] and out.exists() and ok["metadata"]["deploy"] == broken.name


# --- toy models: tolerance, external data, dtypes, opsets, failures ------------------------------


def test_impossible_tolerance_is_exit_1_and_leaves_nothing(tmp_path):
    out = tmp_path / "t.onnx"
    with pytest.raises(VerifyFailed) as e:
        export_model(toy(), out, input_size=(3, 8, 8), atol=0.0, rtol=0.0)
    assert e.value.exit_code == 1 and e.value.result["output"] is None
    assert os.listdir(tmp_path) == []


def test_external_data_above_the_threshold_lands_beside_the_onnx(tmp_path):
    out = tmp_path / "big.onnx"
    model = toy(1)
    extra = torch.randn(4, 3, 8, 8)
    res = export_model(model, out, input_size=(3, 8, 8), external_data_threshold=1, inputs=[extra])
    data = tmp_path / "big.onnx.data"
    assert res.external_data and res.data_file == str(data) and data.is_file() and out.is_file()
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert res.bytes == out.stat().st_size + data.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}  # the final name, not the staging one
    onnx.checker.check_model(str(out), full_check=True)
    assert [c.batch for c in res.verify.checks] == [1, 3, 4]
    assert rel(run(model, extra, torch.float32), ort_out(out, extra)) < 1e-5


def test_external_data_is_moved_first_and_removed_if_the_onnx_cannot_follow(tmp_path, monkeypatch):
    import repfuse_cli.onnxgraph as ex

    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["w"], ["output"])],
            "g",
            [],
            [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [512])],
            [onnx.numpy_helper.from_array(torch.randn(512).numpy(), "w")],
        )
    )
    out = tmp_path / "m.onnx"
    placed: list[str] = []
    real_place = ex._place

    def place(tmp: Path, dest: Path, force: bool) -> None:
        placed.append(dest.name)
        if dest.name.endswith(".onnx"):
            assert (tmp_path / "m.onnx.data").exists()  # the data is already in place
            raise ex.OutputError("simulated failure")
        real_place(tmp, dest, force)

    monkeypatch.setattr(ex, "_place", place)
    staged = StagedOnnx(proto, out, force=False, external_data=True)
    with pytest.raises(ex.OutputError):
        staged.commit()
    assert placed == ["m.onnx.data", "m.onnx"] and os.listdir(tmp_path) == []


def test_half_precision_model_exports_as_float32_with_a_note(tmp_path):
    out = tmp_path / "h.onnx"
    model = toy(2).half()
    res = export_model(model, out, input_size=(3, 8, 8), static_batch=True)  # dtype read from the model
    assert any("float16 weights exported as float32" in n for n in res.notes)
    assert res.dtype == "float16" and res.export_dtype == "float32" and res.verify.rtol == 1e-2
    assert res.input_shape == [1, 3, 8, 8]
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert next(model.parameters()).dtype == torch.float16  # the caller's module is untouched

    # a graph whose batch axis is fixed fails the two-batch-size proof (not a crash: exit 1)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    v, checks = prove(sess, model, (3, 8, 8), dtype=torch.float16, dynamic_batch=True, batch=3)
    assert not v.passed and [c.passed for c in checks] == [True, False] and "(3, 3, 8, 8)" in checks[1].error


def test_opsets_the_exporter_does_not_write_are_refused(tmp_path):
    for bad in (17, 11, 99):
        with pytest.raises(BadInput, match=f"--opset {bad}") as e:
            export_model(toy(), tmp_path / "o.onnx", input_size=(3, 8, 8), opset=bad)
        assert e.value.exit_code == 2
    check_opset(18)
    check_opset(20)
    assert os.listdir(tmp_path) == []


@torch.library.custom_op("repfuse_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice(self.conv(x)).mean((2, 3))


def test_exporter_failure_is_one_line_naming_the_op(tmp_path, capsys):
    with pytest.raises(BadInput) as e:
        export_model(Unexportable().eval(), tmp_path / "u.onnx", input_size=(3, 8, 8))
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and "`repfuse_test.twice`" in msg
    assert os.listdir(tmp_path) == []
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err


def test_missing_extra_is_exit_2_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(MissingExtra) as e:
        require_onnx()
    msg = str(e.value)
    assert e.value.exit_code == 2 and "`onnxruntime`" in msg and "pip install 'repfuse[onnx]'" in msg
    with pytest.raises(MissingExtra):
        export(REPVGG, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_no_module_but_export_imports_onnx():
    import subprocess

    code = (
        "import sys, repfuse_cli.pipeline, repfuse_cli.commands, repfuse_cli.cli, repfuse_cli.report; "
        "import repfuse_cli.export, repfuse_cli.onnxgraph, repfuse_cli.onnxcheck, repfuse_cli.onnxbench; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_bench_onnxruntime_rows(tmp_path):
    rows = bench_onnxruntime(toy(), toy(), (3, 8, 8), batches=(1, 2), warmup=1, repeats=2)
    assert [(r.batch, r.mode) for r in rows] == [(1, "onnxruntime"), (2, "onnxruntime")]
    assert all(r.train_ms > 0 and r.deploy_ms > 0 for r in rows)


def test_report_renders_the_op_table(repvgg_export):
    from rich.console import Console

    from repfuse_cli.report import export_report

    _, res = repvgg_export
    console = Console(file=io.StringIO(), width=140)
    console.print(export_report(res))
    text = console.file.getvalue()
    assert "verification under onnxruntime: PASSED" in text
    row = next(line for line in text.splitlines() if "BatchNormalization" in line)
    assert [c.strip() for c in row.split("│")[1:5]] == ["BatchNormalization", "2", "0", "-2"]


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def toy_ckpt(tmp_path) -> Path:
    from toy_models import ReversedOrder

    path = tmp_path / "toy.pth"
    torch.save({"model": randomize_bn(ReversedOrder(), seed=1).eval().state_dict()}, path)
    return path


def test_cli_export_json_static_batch_inputs_and_mismatch(toy_ckpt, tmp_path):
    import json

    from test_cli import TOY, runner

    from repfuse_cli.cli import app
    from repfuse_cli.results import ExportResult, OnnxVerifyResult

    images = tmp_path / "images.pt"
    torch.save(torch.randn(5, 3, 16, 16), images)
    out = tmp_path / "toy.onnx"
    args = ["export", str(toy_ckpt), "-o", str(out), *TOY, "--static-batch", "--batch", "2", "--inputs", str(images)]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert list(res) == [f.name for f in dataclasses.fields(ExportResult)]
    assert list(res["verify"]) == [f.name for f in dataclasses.fields(OnnxVerifyResult)]
    assert res["output"] == str(out) and out.is_file() and res["input_shape"] == [2, 3, 16, 16]
    # two seeded batches, then the 5 images in static batches of 2 (the last one padded)
    assert [c["batch"] for c in res["verify"]["checks"]] == [2, 2, 2, 2, 2]
    assert res["verify"]["runtime"].startswith("onnxruntime ") and res["verify"]["passed"]

    r = runner.invoke(app, args)  # exists: one line, exit 2, the file untouched
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    before = out.read_bytes()
    r = runner.invoke(app, [*args, "--force", "--atol", "0", "--rtol", "0"])  # mismatch: the old file stays
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "no file written" in r.stderr
    assert out.read_bytes() == before and leftovers(tmp_path) == []
    bad = tmp_path / "bad.onnx"
    r = runner.invoke(app, ["export", str(toy_ckpt), "-o", str(bad), *TOY, "--atol", "0", "--rtol", "0", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["output"] is None and not bad.exists()


def test_cli_export_without_the_extra(monkeypatch, tmp_path):
    from test_cli import runner

    from repfuse_cli.cli import app

    monkeypatch.setitem(sys.modules, "onnx", None)
    r = runner.invoke(app, ["export", str(REPVGG), "-o", str(tmp_path / "m.onnx")])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "`onnx`" in lines[0]
    assert "pip install 'repfuse[onnx]'" in lines[0]
    assert runner.invoke(app, ["export", "--help"]).exit_code == 0
    assert os.listdir(tmp_path) == []


def test_cli_bench_onnxruntime(toy_ckpt):
    import json

    from test_cli import TOY, runner

    from repfuse_cli.cli import app

    args = ["bench", str(toy_ckpt), *TOY, "--runtime", "onnxruntime", "--repeats", "2", "--warmup", "1"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["runtime"].startswith("onnxruntime") and [row["mode"] for row in res["rows"]] == ["onnxruntime"]
    r = runner.invoke(app, [*args, "--compile"])
    assert r.exit_code == 2 and "--compile" in r.stderr


def test_image_folder_inputs_go_through_the_eval_transform(toy_ckpt, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "f.onnx"
    from repfuse_cli.fuser import Options

    res = export_file(toy_ckpt, out, inputs=folder, options=Options(model="toy_models:reversed_order"), resolution=16)
    assert res.verify.passed and "5 images from imgs/" in res.verify.inputs
    assert [c.batch for c in res.verify.checks] == [1, 3, 5]
