"""conadv_ds.syncs.SyncCounter, the instrument of every host-sync test: what it counts and what not."""

import torch


def test_sync_counter_counts_host_reads_and_synchronize_not_device_work(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from conadv_ds.syncs import SyncCounter

    accelerator = type(get_accelerator())
    x = torch.arange(4.0)
    with SyncCounter("cpu") as pure:
        y = (x * 2).sum() + x.to(torch.float64).mean()
        x.add_(y)
    assert pure.count == 0, pure.calls
    # a synchronize that itself reads a tensor to the host, as DeepSpeed's calls torch's: counted once
    monkeypatch.setattr(accelerator, "synchronize", lambda self, device_index=None: x.cpu(), raising=False)
    with SyncCounter("cpu") as syncs:
        x.cpu()
        x[0].item()
        x.to("cpu")
        x.to(torch.device("cpu"))  # on the CPU, the same call as a move to the engine's device: not counted
        get_accelerator().synchronize()
    assert syncs.calls == {"Tensor.cpu": 1, "Tensor.item": 1, "Tensor.to": 1,
                           f"{accelerator.__name__}.synchronize": 1}, syncs.calls
    with SyncCounter("cuda") as elsewhere:  # tensors on another device do not wait for this one
        x.cpu()
        x[0].item()
    assert elsewhere.count == 0
    assert not {"item", "cpu", "to"} & set(vars(torch.Tensor))  # the wrappers are gone
    with SyncCounter("cpu", outside=("test_syncs.py",)) as here:
        x.cpu()
    assert here.count == 0  # made from an excluded file
