"""The checkpoint folder rules, on plain folders: retention keeps the newest and never the
`latest` one, a re-saved tag counts as new, and what a killed save leaves is repaired."""

import pytest

from conadv_ds import checkpoint as ckpt
from conadv_ds.errors import ConfigError


def save(d, tag, content, update_latest=True):
    """What every rank does, then rank 0: write into `<tag>.partial`, publish."""
    (d / f"{tag}.partial").mkdir()
    (d / f"{tag}.partial" / "state").write_text(content)
    ckpt.publish(d, tag, update_latest=update_latest)


def folders(d):
    return sorted(p.name for p in d.iterdir() if p.is_dir())


def test_retention_keeps_the_newest(tmp_path):
    for i in range(5):
        save(tmp_path, f"step{i}", str(i))
        ckpt.prune(tmp_path, 2)
    assert folders(tmp_path) == ["step3", "step4"] and ckpt.read_latest(tmp_path) == "step4"
    assert ckpt.listed(tmp_path) == ["step3", "step4"]


def test_retention_never_deletes_the_latest(tmp_path):
    save(tmp_path, "best", "b")
    for i in range(3):
        save(tmp_path, f"step{i}", str(i), update_latest=False)
        ckpt.prune(tmp_path, 1)
    assert folders(tmp_path) == ["best", "step2"] and ckpt.read_latest(tmp_path) == "best"


def test_a_resaved_tag_is_the_newest(tmp_path):
    save(tmp_path, "a", "1")
    save(tmp_path, "b", "2")
    save(tmp_path, "a", "3")
    ckpt.prune(tmp_path, 1)
    assert folders(tmp_path) == ["a"] and (tmp_path / "a" / "state").read_text() == "3"


def test_no_limit_keeps_everything_and_a_bad_limit_is_one_line(tmp_path):
    for i in range(3):
        save(tmp_path, f"s{i}", "x")
    assert ckpt.prune(tmp_path, None) == [] and len(folders(tmp_path)) == 3
    with pytest.raises(ConfigError, match="save_total_limit=0: must be >= 1"):
        ckpt.prune(tmp_path, 0)


def test_recover_restores_a_tag_moved_aside_and_clears_partials(tmp_path):
    """A kill between `<tag>` → `<tag>.old` and `<tag>.partial` → `<tag>`: the old complete
    checkpoint comes back, the new partial one goes, and so do stale partials of other tags."""
    save(tmp_path, "t", "old")
    (tmp_path / "t").rename(tmp_path / "t.old")
    (tmp_path / "t.partial").mkdir()
    (tmp_path / "t.partial" / "state").write_text("new")
    (tmp_path / "u.partial").mkdir()
    ckpt.recover(tmp_path)
    assert folders(tmp_path) == ["t"] and (tmp_path / "t" / "state").read_text() == "old"


def test_recover_drops_an_old_folder_once_its_replacement_is_in(tmp_path):
    save(tmp_path, "t", "new")
    (tmp_path / "t.old").mkdir()
    ckpt.recover(tmp_path)
    assert folders(tmp_path) == ["t"] and (tmp_path / "t" / "state").read_text() == "new"


def test_recover_leaves_folders_it_did_not_publish_alone(tmp_path):
    save(tmp_path, "t", "x")
    (tmp_path / "data.old").mkdir()
    ckpt.recover(tmp_path)
    assert folders(tmp_path) == ["data.old", "t"]


class _RunsCode:
    """A pickle whose loading runs a command (creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_state_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    import torch

    marker, path = tmp_path / "ran", tmp_path / "conadv_rank0.pt"
    torch.save({"step": 3, "payload": _RunsCode(marker)}, path)
    with pytest.raises(ConfigError, match=r"conadv_rank0\.pt: not a checkpoint file that loads safely") as e:
        ckpt.load_state(path)
    assert "\n" not in str(e.value) and not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()


def test_a_truncated_state_file_is_one_line(tmp_path):
    path = tmp_path / "conadv_rank1.pt"
    ckpt.atomic_save({"step": 3, "rng": ckpt.rng_state(), "schedule": {"pending": None}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"conadv_rank1\.pt: not a checkpoint file") as e:
        ckpt.load_state(path)
    assert "\n" not in str(e.value)


def test_state_files_hold_plain_types_and_restore_every_random_stream(tmp_path):
    import random

    import numpy as np
    import torch
    from transformers import BatchEncoding

    np.random.seed(1), random.seed(2), torch.manual_seed(3)
    state = {"rng": ckpt.rng_state(), "batch": BatchEncoding({"input_ids": torch.arange(4)}), "mask": np.ones(2)}
    ckpt.atomic_save(state, tmp_path / "s.pt")
    draws = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(9), random.seed(9), torch.manual_seed(9)
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)  # torch's own safe loader accepts the file
    ckpt.set_rng_state(loaded["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == draws
    assert type(loaded["batch"]) is dict and torch.equal(loaded["batch"]["input_ids"], torch.arange(4))
    assert torch.equal(loaded["mask"], torch.ones(2, dtype=torch.float64))
