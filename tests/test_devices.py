"""Device selection (`--device auto|cpu|cuda`, the `device` config key). The CUDA paths themselves run in
bench/gpu_check.sh on a GPU machine; here the selection logic and its errors are checked on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leadre.cli import main
from leadre.config import ConfigError, read_config, section
from leadre import devices
from leadre.devices import DeviceError, inference_dtype, resolve_device, train_bf16
from leadre.dpo import DPOSettings
from leadre.sft import TrainSettings

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_cpu_and_auto_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert inference_dtype(resolve_device("auto")) == torch.float32


def test_cpu_training_precision_follows_the_cpus_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: True)
    assert train_bf16(cpu) and train_bf16(cpu, "bf16") and not train_bf16(cpu, "fp32")
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: False)  # emulated bf16 is slower than float32
    assert not train_bf16(cpu) and train_bf16(cpu, "bf16")
    assert inference_dtype(cpu) == torch.float32  # decoding stays float32 on the CPU either way
    with pytest.raises(DeviceError, match="unknown precision 'half'"):
        train_bf16(cpu, "half")


def test_native_cpu_bf16_reads_the_cpus_instruction_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    for amx, avx512_bf16 in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        assert devices.native_cpu_bf16() is (amx or avx512_bf16)


def test_auto_prefers_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("CUDA").type == "cuda"


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="no CUDA device.*--device cpu"):
            resolve_device(name)


def test_unknown_device_is_named() -> None:
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_config_key_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("sft:\n  device: cpu\ndpo:\n  device: cuda\n")
    assert section(read_config(config), "sft", TrainSettings).device == "cpu"
    assert section(read_config(config), "sft", TrainSettings, device="cuda").device == "cuda"  # the flag wins
    assert section(read_config(config), "dpo", DPOSettings).device == "cuda"
    config.write_text("sft:\n  device: 3\n")
    with pytest.raises(ConfigError, match="sft.device"):
        section(read_config(config), "sft", TrainSettings)


@no_cuda
def test_commands_refuse_cuda_without_a_gpu(tiny_sft_dir: Path, tiny_prompts_dir: Path, tiny_sids_dir: Path,
                                            tiny_data_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    commands = {
        "sft": ["train", "sft", "--prompts", str(tiny_prompts_dir), "--sids", str(tiny_sids_dir)],
        "dpo": ["train", "dpo", "--model", str(tiny_sft_dir), "--prompts", str(tiny_prompts_dir),
                "--data", str(tiny_data_dir)],
        "evaluate": ["evaluate", "--model", str(tiny_sft_dir), "--data", str(tiny_data_dir), "--sids",
                     str(tiny_sids_dir)],
        "compile": ["compile", "--model", str(tiny_sft_dir)],
    }
    for name, argv in commands.items():
        out = tmp_path / name
        assert main([*argv, "--out", str(out), "--device", "cuda"]) == 2, name
        err = capsys.readouterr().err
        assert "error: device 'cuda' requested, but PyTorch sees no CUDA device" in err, (name, err)
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / f"{name}.work").exists(), name
