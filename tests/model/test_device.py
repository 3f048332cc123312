"""The one device resolver: names to devices, and clear errors for devices that cannot be used."""

from __future__ import annotations

import pytest
import torch
from vvireid.model.device import resolve_device


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device().type == expected


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "", "meta"])
def test_unknown_or_unsupported_devices_are_errors(name: str) -> None:
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_gpu_names_the_device(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' requested, but torch sees no CUDA GPU"):
        resolve_device(name)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device(name, local_rank=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_rank_picks_a_gpu_only_for_unnumbered_cuda() -> None:
    count = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("auto", local_rank=count + 1) == torch.device("cuda", 1 % count)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:0", local_rank=5) == torch.device("cuda", 0)
