"""Bad data never crashes an epoch: unreadable images and empty text lines are counted and
skipped, or with `strict` stop the run with a one-line error naming the file (and line)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conadv_ds.data import text, vision
from conadv_ds.errors import ConfigError


@pytest.fixture
def folder(tmp_path):
    """An ImageNet-layout folder, 2 classes × 3 readable images, plus in each split a file that is
    not an image and a truncated JPEG."""
    rng = np.random.default_rng(0)
    bad = []
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"img{i}.JPEG")
        (tmp_path / split / "ant" / "img1b.JPEG").write_bytes(b"not an image at all")
        whole = (tmp_path / split / "bee" / "img0.JPEG").read_bytes()
        (tmp_path / split / "bee" / "img0b.JPEG").write_bytes(whole[:len(whole) // 3])
        bad += [str(tmp_path / split / "ant" / "img1b.JPEG"), str(tmp_path / split / "bee" / "img0b.JPEG")]
    return tmp_path, bad


def test_unreadable_images_are_skipped_and_counted(folder):
    from torchvision import datasets
    from torchvision import transforms as T

    root, bad = folder
    data = vision.load("imagenet", str(root), image_size=16)
    plain = datasets.ImageFolder(str(root / "val"), T.Compose([T.Resize(18), T.CenterCrop(16), T.ToTensor()]))
    paths = [p for p, _ in plain.samples]
    assert len(data.val) == len(plain) == 8
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [data.val[i] for i in range(len(data.val))]
    for i, (x, y) in enumerate(items):
        j = i + 1 if paths[i] in bad else i  # the next readable file takes a bad one's place
        ref_x, ref_y = plain[j]
        assert torch.equal(x, ref_x) and y == ref_y
    assert data.val.skipped == {p for p in bad if "/val/" in p}

    with pytest.warns(UserWarning):
        batches = list(DataLoader(data.train, batch_size=4, drop_last=True))
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16)] * 2
    assert data.train.skipped == {p for p in bad if "/train/" in p}


def test_strict_names_the_unreadable_file(folder):
    root, bad = folder
    data = vision.load("imagenet", str(root), image_size=16, strict=True)
    first_bad = sorted(p for p in bad if "/val/" in p)[0]
    i = [p for p, _ in data.val.folder.samples].index(first_bad)
    with pytest.raises(ConfigError) as err:
        data.val[i]
    msg = str(err.value)
    assert msg.startswith(f"{first_bad}: unreadable image (") and "\n" not in msg and "strict_data" in msg


def test_empty_text_lines_are_counted_and_skipped(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first line\n\n   \nsecond line\n")
    b.write_text("\nthird line")
    corpus = text.read_corpus([str(a), str(b)], cache_dir=str(tmp_path / "cache"))
    assert list(corpus.dataset["text"]) == ["first line", "second line", "third line"] and corpus.skipped == 3
    with pytest.raises(ConfigError) as err:
        text.read_corpus([str(a), str(b)], strict=True, cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == f"{a}:2: empty text; remove it or run without strict_data to skip empty lines"


def test_empty_rows_of_a_saved_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["one", "", None, "two"]}).save_to_disk(str(tmp_path / "ds"))
    corpus = text.read_corpus(dataset_dir=str(tmp_path / "ds"))
    assert list(corpus.dataset["text"]) == ["one", "two"] and corpus.skipped == 2
    with pytest.raises(ConfigError, match=r"ds row 1: empty text"):
        text.read_corpus(dataset_dir=str(tmp_path / "ds"), strict=True)


@pytest.mark.parametrize("n,world", [(7, 3), (33, 2), (2, 4), (8, 2)])
def test_eval_shards_are_equal_and_count_every_sample_once(n, world):
    """Compared with the plain index partition: the real samples of all shards are exactly
    range(n); padding is labelled IGNORE_INDEX and makes every shard the same length."""
    from torch.utils.data import TensorDataset

    from conadv_ds.batch import IGNORE_INDEX
    from conadv_ds.data.vision import PaddedShard

    data = TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))
    shards = [PaddedShard(data, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    real = sorted(int(y) for s in shards for _, y in (s[i] for i in range(len(s))) if int(y) != IGNORE_INDEX)
    assert real == list(range(n))


def _arrow_files(folder):
    return sorted(folder.rglob("*.arrow"))


def test_tokenized_blocks_are_run_mlm_packing_and_cached(tmp_path):
    """Blocks equal a plain tokenizer + concatenate-and-cut per 1000-text batch (run_mlm.py); a
    second pass with a reloaded tokenizer writes no new cache file and returns the cached blocks."""
    from transformers import PreTrainedTokenizerFast

    lines = text.embedded_corpus()[:1500]
    (tmp_path / "a.txt").write_text("\n".join(lines[:1200]) + "\n\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[1200:]))
    cache = tmp_path / "cache"
    tok = text.train_tokenizer(lines, 1000, tmp_path / "tok")
    corpus = text.read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], cache_dir=str(cache))
    blocks = text.tokenize_and_group(corpus.dataset, tok, 64)
    expected = []
    for i in range(0, len(lines), 1000):
        ids = [t for seq in tok(lines[i:i + 1000])["input_ids"] for t in seq]
        expected += [ids[j:j + 64] for j in range(0, len(ids) // 64 * 64, 64)]
    assert corpus.skipped == 1 and list(blocks["input_ids"]) == expected
    assert blocks.cache_files and all(str(cache) in f["filename"] for f in blocks.cache_files)
    files = _arrow_files(cache)
    again = text.tokenize_and_group(text.read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                                                     cache_dir=str(cache)).dataset,
                                    PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok")), 64)
    assert _arrow_files(cache) == files and again.cache_files == blocks.cache_files


def test_max_predictions_per_seq_caps_the_masked_tokens(tmp_path):
    """Capped masking keeps a subset of what transformers' collator picks with the same RNG, at most
    the cap per sequence; every other position carries its original token and no label."""
    from transformers import DataCollatorForLanguageModeling

    tok = text.train_tokenizer(text.embedded_corpus()[:400], 1000)
    rows = [{"input_ids": ids} for ids in text.group_texts(tok(text.embedded_corpus()[:400]), 128)["input_ids"][:16]]
    original = torch.tensor([r["input_ids"] for r in rows])
    torch.manual_seed(3)
    plain = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")(rows)
    torch.manual_seed(3)
    capped = text.MaskedLM(tok, max_predictions=5)(rows)
    picked, kept = plain["labels"] != -100, capped["labels"] != -100
    assert (picked.sum(1) > 5).any()  # the cap has something to do
    assert torch.equal(kept.sum(1), picked.sum(1).clamp(max=5)) and not (kept & ~picked).any()
    assert torch.equal(capped["labels"][kept], original[kept])
    assert torch.equal(capped["input_ids"][~kept], original[~kept])
    assert torch.equal(capped["input_ids"][kept], plain["input_ids"][kept])
