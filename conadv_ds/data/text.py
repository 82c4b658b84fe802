"""Masked-LM text pipeline: corpus, an offline WordPiece tokenizer, packed examples, collation.

The embedded default corpus is real English that ships with Python itself: the help-topic
documentation in the standard library's `pydoc_data.topics` (about 80,000 words).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def embedded_corpus() -> list[str]:
    """Paragraphs of the Python help topics, in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        paragraphs += [" ".join(p.split()) for p in topics[key].split("\n\n") if len(p.split()) >= 4]
    return paragraphs


class Corpus(NamedTuple):
    texts: list[str]
    skipped: int
    """Empty lines (or rows) left out."""


def read_corpus(train_files: Optional[Sequence[str]] = None, dataset_dir: Optional[str] = None,
                text_column: str = "text", strict: bool = False) -> Corpus:
    """Lines of text files, the `text_column` of a `datasets` dataset saved with `save_to_disk`,
    or the embedded corpus. Empty lines are counted and left out; with `strict`, the first one
    is a one-line error naming the file and line (or row)."""

    def keep(items, where) -> Corpus:
        texts, skipped = [], 0
        for i, t in enumerate(items, 1):
            if t and t.strip():
                texts.append(t.strip())
            elif strict:
                raise ConfigError(f"{where(i)}: empty text; remove it or run without strict_data to skip empty lines")
            else:
                skipped += 1
        return Corpus(texts, skipped)

    if dataset_dir:
        if not Path(dataset_dir).is_dir():
            raise ConfigError(f"--dataset_dir={dataset_dir!r}: not found")
        from datasets import load_from_disk

        ds = load_from_disk(dataset_dir)
        if hasattr(ds, "keys"):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        if text_column not in ds.column_names:
            raise ConfigError(f"--dataset_dir={dataset_dir!r}: no column '{text_column}'; has {ds.column_names}")
        return keep(ds[text_column], lambda i: f"{dataset_dir} row {i - 1}")
    if train_files:
        for f in train_files:
            if not Path(f).is_file():
                raise ConfigError(f"--train_files: {f!r} not found")
        parts = [keep(Path(f).read_text(errors="replace").splitlines(), lambda i, f=f: f"{f}:{i}")
                 for f in train_files]
        return Corpus([t for p in parts for t in p.texts], sum(p.skipped for p in parts))
    return Corpus(embedded_corpus(), 0)


def train_tokenizer(texts: Sequence[str], vocab_size: int, save_dir: Optional[Path] = None):
    """A BERT-style uncased WordPiece tokenizer trained offline on `texts` (seconds)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                 ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


class PackedExamples(Dataset):
    """Consecutive texts packed greedily into sequences of at most `max_len` tokens
    ([CLS] a [SEP] b [SEP] ...); a text longer than a sequence is cut."""

    def __init__(self, texts: Sequence[str], tokenizer, max_len: int):
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.examples: list[list[int]] = []
        current = [cls]
        for piece in ids:
            piece = piece[:max_len - 2]
            if len(current) + len(piece) + 1 > max_len:
                self.examples.append(current)
                current = [cls]
            current += piece + [sep]
        if len(current) > 1:
            self.examples.append(current)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.examples[i]}


def collator(tokenizer, mlm_probability: float = 0.15):
    """Pads to the longest sequence (attention mask 0 on padding) and masks 15% of the tokens."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                           return_tensors="pt")


def mlm_stream(dataset: Dataset, micro_batch: int, rank: int, world: int, seed: int, collate) -> Iterator[dict]:
    """This rank's micro-batches, epoch after epoch, as one iterator (exact lookahead across epochs)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, collate_fn=collate, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_heldout_split(texts: Sequence[str], held_out: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: every k-th text is held out."""
    k = max(2, round(1 / held_out))
    return [t for i, t in enumerate(texts) if i % k], [t for i, t in enumerate(texts) if not i % k]


def masked_batches(dataset: Dataset, batch_size: int, collate, seed: int) -> list[dict]:
    """The held-out set, masked once with a fixed seed so every evaluation sees the same masks."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    batches = [collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
               for i in range(0, len(dataset), batch_size)]
    torch.set_rng_state(state)
    return batches
