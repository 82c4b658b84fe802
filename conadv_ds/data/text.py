"""Masked-LM text pipeline on `datasets`: the corpus, an offline WordPiece tokenizer,
tokenization and packing (cached by `datasets`, so the main process does it once and every
other rank and every later run reads the cache), masking, and each rank's micro-batch stream.

The embedded default corpus is real English that ships with Python itself: the help-topic
documentation in the standard library's `pydoc_data.topics` (about 80,000 words).
"""

from __future__ import annotations

import hashlib
import os
import re
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import DistributedSampler

from ..errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
"""Python's full documentation as reStructuredText (Debian's python3.11-doc; scripts/setup_debian.sh)."""


class Document(NamedTuple):
    name: str
    """Path under the documentation root, e.g. 'library/os.rst.txt'."""
    part: str
    """The part of the documentation it belongs to: its top folder ('library', 'c-api', ...) or 'top'."""
    paragraphs: list[str]


_ROLE = re.compile(r":[\w:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_MARKUP = re.compile(r"``|\*\*|(?<![\w*])\*(?=\w)|(?<=\w)\*(?![\w*])|`_{0,2}|\|")
_WORD = re.compile(r"^[(\"']?[A-Za-z][a-z'-]*[)\"',.;:?!]*$")


def _prose(block: str) -> Optional[str]:
    """A reST paragraph as one line of plain text, or None when it is not prose (headings,
    directives, code, tables, lists of names)."""
    lines = [ln.strip() for ln in block.splitlines()]
    if not lines or lines[0].startswith(("..", ">>>", "$", "+", "|", "=", "-" * 3)) or block.startswith(" " * 4):
        return None
    text = _MARKUP.sub("", _LINK.sub(r"\1", _ROLE.sub(r"\1", " ".join(lines))))
    words = text.split()
    if not words or sum(bool(_WORD.match(w)) for w in words) < 0.7 * len(words):
        return None
    return " ".join(words)


def python_docs(root: Path = PYTHON_DOCS, min_words: int = 8) -> list[Document]:
    """Every document of Python's documentation sources under `root` (sorted by name) with its
    prose paragraphs of at least `min_words` words; code blocks (after '::'), directives,
    headings and tables are left out, inline markup is reduced to its text."""
    root = Path(root)
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise ConfigError(f"{root}: no documentation sources (*.txt); install them with "
                          "`sudo bash scripts/setup_debian.sh` (Debian package python3.11-doc)")
    docs = []
    for f in files:
        name = f.relative_to(root).as_posix()
        paragraphs, code = [], False
        for block in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")):
            if not block.strip():
                continue
            if code and block[:1].isspace():  # the indented literal block after '::'
                continue
            code = block.rstrip().endswith("::")
            para = _prose(block.rstrip().removesuffix(":") if code else block)
            if para is not None and len(para.split()) >= min_words:
                paragraphs.append(para)
        docs.append(Document(name, name.split("/")[0] if "/" in name else "top", paragraphs))
    return docs


def help_topics(min_words: int = 4) -> list[Document]:
    """The embedded corpus as documents: one per help topic (sorted by key), its paragraphs with
    whitespace collapsed; part 'help'."""
    from pydoc_data.topics import topics

    return [Document(key, "help", [" ".join(p.split()) for p in topics[key].split("\n\n")
                                   if len(p.split()) >= min_words]) for key in sorted(topics)]


def embedded_corpus() -> list[str]:
    """Paragraphs of the Python help topics, in a fixed order (one line each: whitespace collapsed)."""
    return [p for doc in help_topics() for p in doc.paragraphs]


def split_documents(docs: Sequence[Document], every: int = 10) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: every `every`-th document (in the given order) is held out,
    so no paragraph of a held-out document is ever trained on."""
    return ([d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every])


class Corpus(NamedTuple):
    dataset: Any
    """A `datasets.Dataset` with one column, 'text', empty rows left out."""
    skipped: int
    """Empty lines (or rows) left out."""


def _nonempty(texts: list) -> list[bool]:
    return [bool(t and t.strip()) for t in texts]


def read_corpus(train_files: Optional[Sequence[str]] = None, dataset_dir: Optional[str] = None,
                text_column: str = "text", strict: bool = False, cache_dir: Optional[str] = None) -> Corpus:
    """Text files through `load_dataset("text", …)` (one text a line), the `text_column` of a
    dataset saved with `save_to_disk`, or the embedded corpus (written once as a text file under
    `cache_dir`, so it takes the same cached path). Empty lines are counted and left out; with
    `strict`, the first one is a one-line error naming the file and line (or row)."""
    import datasets

    if dataset_dir:
        if not Path(dataset_dir).is_dir():
            raise ConfigError(f"--dataset_dir={dataset_dir!r}: not found")
        ds = datasets.load_from_disk(dataset_dir)
        if hasattr(ds, "keys"):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
        if text_column not in ds.column_names:
            raise ConfigError(f"--dataset_dir={dataset_dir!r}: no column '{text_column}'; has {ds.column_names}")
        parts = [(ds.select_columns([text_column]), lambda i: f"{dataset_dir} row {i}")]
    else:
        files = list(train_files or [])
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"--train_files: {f!r} not found")
        if not files:
            files = [str(_embedded_file(Path(cache_dir or datasets.config.HF_DATASETS_CACHE)))]
        loaded = datasets.load_dataset("text", data_files={f"file{i}": f for i, f in enumerate(files)},
                                       cache_dir=cache_dir)
        parts = [(loaded[f"file{i}"], lambda i, f=f: f"{f}:{i + 1}") for i, f in enumerate(files)]
    kept, total = [], 0
    for ds, where in parts:
        full, total = ds, total + len(ds)
        ds = ds.filter(_nonempty, input_columns=text_column, batched=True, desc="drop empty lines")
        if strict and len(ds) < len(full):
            first = _nonempty(full[text_column]).index(False)
            raise ConfigError(f"{where(first)}: empty text; remove it or run without strict_data to skip empty lines")
        kept.append(ds)
    dataset = datasets.concatenate_datasets(kept) if len(kept) > 1 else kept[0]
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return Corpus(dataset, total - len(dataset))


def _embedded_file(cache_dir: Path) -> Path:
    """The embedded corpus as a text file named by its content (written atomically, once)."""
    body = "\n".join(embedded_corpus()) + "\n"
    path = cache_dir / "conadv_ds" / f"pydoc_topics_{hashlib.sha256(body.encode()).hexdigest()[:16]}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(body)
        os.replace(tmp, path)
    return path


def train_heldout_split(dataset, held_out: float = 0.05) -> tuple[Any, Any]:
    """Deterministic train / held-out split of a `datasets.Dataset`: every k-th text is held out."""
    k = max(2, round(1 / held_out))
    keep = lambda _, indices, held: [(i % k == 0) == held for i in indices]  # noqa: E731
    return (dataset.filter(keep, with_indices=True, batched=True, fn_kwargs={"held": False}, desc="train split"),
            dataset.filter(keep, with_indices=True, batched=True, fn_kwargs={"held": True}, desc="held-out split"))


def train_tokenizer(texts: Iterable, vocab_size: int, save_dir: Optional[Path] = None):
    """A BERT-style uncased WordPiece tokenizer built offline (seconds) from `texts`: strings, or a
    `datasets.Dataset` with a 'text' column (read in batches).

    The same texts always give the same tokenizer, in any process or folder (the WordPiece
    trainer of `tokenizers` breaks ties between equally frequent pairs in hash-map order, which
    changes from one process to the next). The vocabulary is the special tokens, every character
    of the corpus alone and as a `##` continuation (so no word is ever unknown), then the most
    frequent whole words, ties broken alphabetically (the `tokenizers` word-level trainer's order):
    frequent words are one token, rare ones are spelled out."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if hasattr(texts, "iter"):
        texts = [t for batch in texts.iter(batch_size=1000) for t in batch["text"]]
    texts = list(texts)
    counter = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    counter.normalizer = normalizers.BertNormalizer(lowercase=True)
    counter.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counter.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=1 << 30, show_progress=False))
    words = sorted(counter.get_vocab().items(), key=lambda kv: kv[1])  # the trainer's rank: count, then word
    alphabet = sorted({c for w, _ in words for c in w})
    vocab = SPECIAL_TOKENS + alphabet + ["##" + c for c in alphabet]
    if len(vocab) > vocab_size:
        raise ConfigError(f"vocab_size={vocab_size}: smaller than the corpus' {len(alphabet)} characters (each alone "
                          f"and as a continuation) and {len(SPECIAL_TOKENS)} special tokens; allowed: >= {len(vocab)}")
    known = set(vocab)
    vocab += [w for w, _ in words if w not in known][:vocab_size - len(vocab)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                 ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    if save_dir is not None:
        fast.save_pretrained(str(save_dir))
    return fast


def group_texts(examples: dict, block_size: int) -> dict:
    """transformers' run_mlm.py packing: a batch of tokenized texts concatenated and cut into
    blocks of `block_size` tokens, the remainder dropped."""
    joined = {k: list(chain(*examples[k])) for k in examples}
    total = (len(joined["input_ids"]) // block_size) * block_size
    return {k: [t[i:i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}


def _tokenize(examples: dict, tokenizer) -> dict:
    return tokenizer(examples["text"], return_special_tokens_mask=True)


def tokenize_and_group(dataset, tokenizer, max_len: int, num_proc: Optional[int] = None):
    """Tokenize every text ([CLS] … [SEP], with the special-tokens mask so masking never picks
    them) and pack into `max_len`-token blocks (`group_texts`), both with `map(batched=True)`.
    `datasets` caches each map next to the corpus' own cache files, under a fingerprint of the
    corpus, the tokenizer's JSON and `max_len` (its own hash of a tokenizer object differs from
    one instance to the next): a second call (another rank, a later run) reads the cache."""
    key = hashlib.sha256(f"{dataset._fingerprint} {tokenizer.backend_tokenizer.to_str()}".encode()).hexdigest()[:16]
    tokenized = dataset.map(_tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                            fn_kwargs={"tokenizer": tokenizer}, new_fingerprint=f"tokenize-{key}", desc="tokenize")
    return tokenized.map(group_texts, batched=True, num_proc=num_proc, fn_kwargs={"block_size": max_len},
                         new_fingerprint=f"pack{max_len}-{key}", desc=f"pack into {max_len}-token blocks")


def _rows(dataset, indices: Sequence[int]) -> list[dict]:
    columns = dataset[list(indices)]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class MaskedLM:
    """transformers' `DataCollatorForLanguageModeling` (15% of the tokens picked; of those 80%
    [MASK], 10% a random token, 10% kept), with at most `max_predictions` picked per sequence
    (BERT's max_predictions_per_seq: 20 at sequence 128, 80 at 512): a sequence with more keeps
    a random `max_predictions` of them, the others get their token back and no label."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, max_predictions: Optional[int] = None):
        from transformers import DataCollatorForLanguageModeling

        self.collate = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                                       return_tensors="pt")
        self.max_predictions = max_predictions

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        if self.max_predictions is not None:
            ids, labels = batch["input_ids"], batch["labels"]
            for row in range(labels.shape[0]):
                picked = (labels[row] != -100).nonzero().flatten()
                if len(picked) > self.max_predictions:
                    back = picked[torch.randperm(len(picked))[self.max_predictions:]]
                    ids[row, back] = labels[row, back]
                    labels[row, back] = -100
        return batch


class MLMStream:
    """This rank's micro-batches as one endless iterator: DistributedSampler's order (shuffled
    anew each epoch from `seed`), every batch masked from a seed of its own (seed, rank,
    position). The stream is a function of its position alone, so `state_dict()` is that
    position and a resumed stream continues exactly without replaying or collating the batches
    before it. `phases` is [(dataset, collate, first position), …]: the dataset (sequence length)
    changes inside the one iterator, so batches a schedule pulls ahead cross a switch exactly."""

    def __init__(self, phases: Sequence[tuple[Any, Any, int]], micro_batch: int, rank: int, world: int, seed: int):
        self.phases, self.micro, self.rank, self.world = list(phases), micro_batch, rank, world
        self.seed, self.position = seed, 0
        self._order: tuple[tuple[int, int], list[int]] = ((-1, -1), [])

    def __iter__(self) -> "MLMStream":
        return self

    def __next__(self) -> dict:
        phase = max(i for i, (*_, first) in enumerate(self.phases) if first <= self.position)
        dataset, collate, first = self.phases[phase]
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.seed,
                                     drop_last=True)
        epoch, batch = divmod(self.position - first, len(sampler) // self.micro)
        if self._order[0] != (phase, epoch):
            sampler.set_epoch(epoch)
            self._order = ((phase, epoch), list(sampler))
        indices = self._order[1][batch * self.micro:(batch + 1) * self.micro]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.position) % (1 << 63))
            out = collate(_rows(dataset, indices))
        self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def masked_batches(dataset, batch_size: int, collate, seed: int) -> list[dict]:
    """The held-out set, masked once with a fixed seed so every evaluation sees the same masks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [collate(_rows(dataset, range(i, min(i + batch_size, len(dataset)))))
                for i in range(0, len(dataset), batch_size)]
