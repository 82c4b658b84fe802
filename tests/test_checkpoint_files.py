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
