"""`leadre compile`: ONNX export of the tiny trained model, its parity with PyTorch, the ONNX Runtime backend behind
the search, the compiled artifact inside a bundle, and the clear refusals where TensorRT or CUDA is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from leadre.artifacts import ArtifactError
from leadre.backends import (BackendUnavailable, DecoderGraph, TensorStepModel, available_backends, choose_backend,
                             load_step_model, tensorrt_missing)
from leadre.bundle import RecallBundle, build_bundle, model_version
from leadre.cli import main
from leadre.decode import HFStepModel, left_pad
from leadre.export import compile_model
from leadre.model import load_model
from leadre.prompts import read_prompts
from leadre.recall import LLMRecaller
from leadre.sid import load_sid_table

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compiled_dir(tiny_sft_dir: Path, tiny_sids_dir: Path, tiny_prompts_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compile") / "compiled"
    compile_model(tiny_sft_dir, out, device="cpu", int8=True, sids_dir=tiny_sids_dir, users=8,
                  prompts_dir=tiny_prompts_dir, quality_users=30)
    return out


def test_decoder_graph_matches_the_hf_model_with_its_cache(tiny_sft_dir: Path) -> None:
    """The graph that is exported computes what the model computes, through prefill and reordered steps."""
    model, tokenizer, _ = load_model(tiny_sft_dir)
    graph = DecoderGraph(model)
    reference, ours = HFStepModel(model), TensorStepModel(graph, graph, CPU, "graph")
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12], [3] * 9], tokenizer.pad_token_id)
    a, state_a = reference.prefill(ids, mask)
    b, state_b = ours.prefill(ids, mask)
    assert torch.allclose(a, b, atol=1e-4)
    # each user's beams continue beams of the same user, in any order, as the search's reordering makes them
    for rows in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 1, 3, 2, 5, 4]), torch.tensor([1, 0, 2, 3, 4, 4])):
        tokens = torch.randint(1, 300, (len(rows),))
        a, state_a = reference.step(tokens, rows, state_a)
        b, state_b = ours.step(tokens, rows, state_b)
        assert torch.allclose(a, b, atol=1e-4)
    # the shared prompt cache needs the rows user by user
    with pytest.raises(ValueError, match="user by user"):
        ours.step(torch.tensor([7, 7, 7]), torch.tensor([2, 0, 4]), state_b)


def test_compile_records_parity_and_choice(compiled_dir: Path, tiny_sft_dir: Path) -> None:
    manifest = json.loads((compiled_dir / "manifest.json").read_text())
    assert manifest["step"] == "compile"
    assert manifest["model_version"] == model_version(tiny_sft_dir, "sft")
    assert {"prefill.onnx", "step.onnx", "prefill.int8.onnx", "step.int8.onnx"} <= set(manifest["files"])
    assert all((compiled_dir / f).is_file() for f in manifest["files"])
    backends = manifest["parity"]["backends"]
    onnx = backends["onnx"]
    assert onnx["max_abs_logit_diff"] < 1e-4
    assert onnx["same_top_n"] and onnx["same_top_n_users"] == onnx["users"] == 8
    assert backends["onnx-int8"]["max_abs_logit_diff"] > 0  # measured, whatever it costs
    cost = manifest["int8_cost"]
    assert cost["users"] == 30 and 0 <= cost["int8"]["recall@10"] <= 1
    assert cost["recall@10_difference"] == pytest.approx(cost["int8"]["recall@10"] - cost["float32"]["recall@10"])
    assert manifest["backend"] in ("onnx", "torch") and manifest["backend_reason"].startswith("fastest measured")
    assert manifest["built"]["tensorrt"].startswith("not built")


def test_ort_backend_recalls_what_pytorch_recalls(compiled_dir: Path, tiny_sft_dir: Path, tiny_sids_dir: Path,
                                                  tiny_prompts_dir: Path) -> None:
    sids = load_sid_table(tiny_sids_dir)
    prompts = [e["prompt"] for e in read_prompts(tiny_prompts_dir, "validation")[:24]]
    eager = LLMRecaller.from_dir(tiny_sft_dir, sids, device="cpu", backend="torch")
    onnx = LLMRecaller.from_dir(tiny_sft_dir, sids, device="cpu", backend="onnx", compiled_dir=compiled_dir)
    assert onnx.backend == "onnx" and eager.backend == "torch"
    expected = eager.recall(prompts, top_n=10, beam_width=20)
    got = onnx.recall(prompts, top_n=10, beam_width=20)
    assert [[ad for ad, _ in r] for r in got] == [[ad for ad, _ in r] for r in expected]
    assert max(abs(s - t) for r, q in zip(got, expected) for (_, s), (_, t) in zip(r, q)) < 1e-3
    # auto on the CPU takes what the compile step measured fastest among the backends that agreed
    auto = LLMRecaller.from_dir(tiny_sft_dir, sids, device="cpu", backend="auto", compiled_dir=compiled_dir)
    assert auto.backend == json.loads((compiled_dir / "manifest.json").read_text())["backend"]


def test_bundle_carries_and_uses_the_compiled_artifact(compiled_dir: Path, tiny_sft_dir: Path, tiny_sids_dir: Path,
                                                       tiny_data_dir: Path, tiny_bundle_dir: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    assert build_bundle(tiny_sft_dir, tiny_sids_dir, tiny_data_dir, out, compiled_dir)["compiled"]
    compiled = RecallBundle.load(out, device="cpu", backend="onnx")
    plain = RecallBundle.load(tiny_bundle_dir, device="cpu")
    assert compiled.recaller.backend == "onnx" and plain.recaller.backend == "torch"
    histories = [plain.history(u, {}, events)[0] for u, events in _some_users(tiny_data_dir)]
    assert [[a for a, _ in r] for r in compiled.recall(histories, k=10)] == \
        [[a for a, _ in r] for r in plain.recall(histories, k=10)]
    # a paused ad leaves the compiled bundle's answers too
    top = compiled.recall(histories[:1], k=1)[0][0][0]
    paused = compiled.with_status(compiled.ads[["ad_id"]].assign(active=compiled.ads["ad_id"] != top))
    assert top not in [a for a, _ in paused.recall(histories[:1], k=10)[0]]
    with pytest.raises(BackendUnavailable, match="no compiled step.onnx"):
        RecallBundle.load(tiny_bundle_dir, device="cpu", backend="onnx")


def _some_users(data_dir: Path, n: int = 6):
    from leadre.schema import read_data_dir

    events = read_data_dir(data_dir).events
    for user, group in list(events.groupby("user_id"))[:n]:
        yield user, group


def test_bundle_refuses_a_compiled_artifact_of_another_model(compiled_dir: Path, tiny_sft_dir: Path,
                                                             tiny_sids_dir: Path, tiny_data_dir: Path,
                                                             tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((compiled_dir / "manifest.json").read_text()) | {"model_version": "sft-000000000000"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="compiled from model sft-000000000000"):
        build_bundle(tiny_sft_dir, tiny_sids_dir, tiny_data_dir, tmp_path / "bundle", other)


@pytest.mark.skipif(tensorrt_missing() is None, reason="checks the refusal where TensorRT is missing")
def test_compile_tensorrt_unavailable_is_a_message(tiny_sft_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compiled"
    assert main(["compile", "--model", str(tiny_sft_dir), "--out", str(out), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backend tensorrt is unavailable here:") and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        load_step_model("tensorrt", CPU, None, tmp_path)


def test_auto_choice() -> None:
    measured = {"torch": {"device_type": "cpu", "ms_per_user": 5.0},
                "onnx": {"device_type": "cpu", "ms_per_user": 2.0, "same_top_n": True},
                "onnx-int8": {"device_type": "cpu", "ms_per_user": 1.0, "same_top_n": True},
                "torch@cuda": {"device_type": "cuda", "ms_per_user": 0.1}}
    compiled = Path(__file__).parent  # no graphs here: only the PyTorch backends can run
    assert choose_backend(CPU, compiled, measured)[0] == "torch"
    assert available_backends(CPU, compiled)["onnx"].startswith("no compiled step.onnx")
    assert choose_backend(CPU, None, None) == ("torch", "default order for cpu (onnx > torch); not measured on this "
                                                        "kind of device")


def test_auto_choice_skips_int8_and_disagreeing_backends(compiled_dir: Path) -> None:
    measured = {"torch": {"device_type": "cpu", "ms_per_user": 5.0},
                "onnx": {"device_type": "cpu", "ms_per_user": 2.0, "same_top_n": False},
                "onnx-int8": {"device_type": "cpu", "ms_per_user": 1.0, "same_top_n": True}}
    assert choose_backend(CPU, compiled_dir, measured)[0] == "torch"
    measured["onnx"]["same_top_n"] = True
    backend, reason = choose_backend(CPU, compiled_dir, measured)
    assert backend == "onnx" and "onnx 2.00 ms/user" in reason
