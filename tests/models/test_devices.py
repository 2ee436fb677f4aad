import pytest
import torch
from torch import nn

from nodeflow.models import devices


def test_device_and_precision_choice(monkeypatch):
    monkeypatch.setattr(devices, "_device", None)
    monkeypatch.setattr(devices, "_precision", None)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert devices.get_device().type == "cpu"
    assert devices.compute_dtype(torch.device("cpu")) == torch.float32
    assert devices.compute_dtype(torch.device("cuda", 0)) == torch.float16
    devices.set_device("cpu")
    assert devices.get_device() == torch.device("cpu")
    devices.set_precision("bf16")
    assert devices.compute_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        devices.set_precision("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            devices.set_device("cuda")
    devices.set_device(None)
    devices.set_precision(None)


class Fake(nn.Linear):
    """A 4 MiB 'model' whose moves are only recorded."""
    def __init__(self):
        super().__init__(1024, 1024, bias=False)
        self.where = "cpu"

    def to(self, device, *args, **kwargs):
        self.where = torch.device(device).type
        return self


def test_manager_offloads_least_recently_used(monkeypatch):
    gpu = torch.device("cuda", 0)
    manager = devices.ModelManager(reserve=0)
    capacity = 10 * 2**20

    def free(device):
        return capacity - sum(devices.module_bytes(m) for m, _ in manager.loaded.values())

    monkeypatch.setattr(devices, "free_memory", free)
    a, b, c = Fake(), Fake(), Fake()
    manager.load(a, gpu)
    manager.load(b, gpu)
    assert (a.where, b.where) == ("cuda", "cuda")
    manager.load(a, gpu)                                # a used again: b is now the least recent
    manager.load(c, gpu)                                # 12 MiB > 10: something must go
    assert (a.where, b.where, c.where) == ("cuda", "cpu", "cuda")
    manager.offload_all()
    assert (a.where, c.where) == ("cpu", "cpu") and not manager.loaded


def test_manager_is_a_no_op_on_cpu():
    m = Fake()
    devices.ModelManager().load(m, torch.device("cpu"))
    assert m.where == "cpu"
