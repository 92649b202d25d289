"""Which torch device a process computes on, from the one spelling every command uses."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "gpu", "cpu")


def check_device_choice(preference: str) -> None:
    if preference not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {preference!r}")


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when it is usable here, else CPU (a logical Ray GPU on a machine without CUDA
    is not usable); ``gpu``: CUDA, refused when it is not usable; ``cpu``: CPU."""
    check_device_choice(preference)
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "gpu":
        raise RuntimeError("device 'gpu' was asked for, but CUDA is not usable on this machine "
                           "(no GPU, or no CUDA build of torch); use 'auto' or 'cpu'")
    return torch.device("cpu")
