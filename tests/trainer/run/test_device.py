"""Device choice, TF32, data-sheet peaks and MFU on unknown GPUs (trainer/run/device.py); CUDA is faked where needed."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer.run import device as device_mod
from trainer.run.config import Device
from trainer.run.device import configure_matmul_precision, gpu_peak, gpu_peak_flops, peak_flops, resolve_device


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA L4", r"\bL4\b"),
        ("NVIDIA L40", r"\bL40\b"),
        ("NVIDIA L40S", r"\bL40S\b"),
        ("NVIDIA H100 80GB HBM3", r"\bH100\b"),
        ("NVIDIA H100 PCIe", r"\bH100 PCIe\b"),
        ("NVIDIA H100 NVL", r"\bH100 NVL\b"),
        ("NVIDIA H200", r"\bH200\b"),
        ("NVIDIA GH200 480GB", r"\bGH200\b"),
        ("NVIDIA A100-SXM4-80GB", r"\bA100\b"),
        ("NVIDIA A100 80GB PCIe", r"\bA100\b"),
        ("NVIDIA A10G", r"\bA10G?\b"),
    ],
)
def test_gpu_names_match_their_own_data_sheet(name, expected):
    assert gpu_peak(name).pattern == expected


def test_unknown_gpu_has_no_peak():
    assert gpu_peak("NVIDIA GeForce RTX 4090") is None
    assert gpu_peak_flops("NVIDIA GeForce RTX 4090", dtype=torch.bfloat16, tf32=True) is None


def test_fp32_peak_follows_tf32():
    # A100: 312 TFLOP/s bf16, TF32 at half that, 19.5 plain fp32.
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype=torch.bfloat16, tf32=False) == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype=torch.float32, tf32=True) == 156e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", dtype=torch.float32, tf32=False) == 19.5e12


class _FakeCuda:
    """Just enough of torch.cuda for the device functions: ``count`` GPUs called ``name``."""

    def __init__(self, monkeypatch, *, count: int = 1, name: str = "NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        self.current = None
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: setattr(self, "current", index))


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    fake = _FakeCuda(monkeypatch, count=2)
    assert resolve_device(Device.auto, local_rank=1) == torch.device("cuda", 1) and fake.current == 1
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2, but only 2 CUDA device\(s\) are visible \(CUDA_VISIBLE_DEVICES=0,1\): start at most 2 processes per node"):
        resolve_device(Device.auto, local_rank=2)


def test_unknown_gpu_warns_and_reports_no_mfu(monkeypatch, caplog):
    _FakeCuda(monkeypatch, name="NVIDIA GeForce RTX 4090")
    with caplog.at_level(logging.WARNING, logger=device_mod.__name__):
        peak = peak_flops(device=torch.device("cuda", 0), dtype=torch.bfloat16, override=None)
    assert peak is None
    assert "no data-sheet peak FLOP/s known for GPU 'NVIDIA GeForce RTX 4090'" in caplog.text
    assert "trainer.peak_flops" in caplog.text
    assert peak_flops(device=torch.device("cuda", 0), dtype=torch.bfloat16, override=5e14) == 5e14


def test_known_gpu_peak_by_dtype_and_tf32(monkeypatch):
    _FakeCuda(monkeypatch, name="NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert peak_flops(device=cuda, dtype=torch.bfloat16, override=None) == 989e12
    assert peak_flops(device=cuda, dtype=torch.float32, override=None, tf32=True) == 989e12 / 2
    assert peak_flops(device=cuda, dtype=torch.float32, override=None, tf32=False) == 67e12


def test_tf32_is_set_explicitly_on_cuda_and_left_alone_on_cpu(monkeypatch):
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        configure_matmul_precision(device=torch.device("cuda", 0), tf32=True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        configure_matmul_precision(device=torch.device("cuda", 0), tf32=False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        mkldnn = torch.backends.mkldnn.matmul.fp32_precision
        configure_matmul_precision(device=torch.device("cpu"), tf32=True)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
