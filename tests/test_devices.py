"""pick_device: one spelling (auto / gpu / cpu) and CUDA only where it is usable."""
import pytest
import torch

from rae.devices import check_device_choice, pick_device


def test_cpu_is_cpu_whatever_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("preference", ["auto", "gpu"])
def test_auto_and_gpu_take_cuda_when_it_is_usable(monkeypatch: pytest.MonkeyPatch, preference: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(preference) == torch.device("cuda")


def test_auto_falls_back_to_cpu_without_usable_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


def test_gpu_without_usable_cuda_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device 'gpu' was asked for, but CUDA is not usable"):
        pick_device("gpu")


def test_unknown_spelling_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, gpu, cpu; got 'cuda'"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="auto, gpu, cpu; got 'GPU'"):
        check_device_choice("GPU")
