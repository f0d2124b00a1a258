"""Pretraining data: text files streamed, tokenized, joined with EOS between documents, packed into blocks.

A document is a run of non-blank lines; blank lines and the end of a file close it. Documents are
tokenized as they are read, an EOS token closes each one, and the token stream is cut into blocks of
``block_size`` tokens, ``batch_size`` blocks per batch — no padding, no document left out (GPT-2 style
packing). Only the current document and one batch of tokens are held in memory, so a corpus larger
than RAM streams.

Batches follow Hugging Face's convention: ``labels`` equal ``input_ids`` and the loss shifts them.
``state_dict()`` after a batch records where the stream stands (epoch, file, byte offset, the
unfinished document, the tokens left over); ``load_state_dict`` continues with exactly the batches
an uninterrupted run would have produced.

A validation split can come from separate files, or from the same ones: ``split="val"`` keeps the
documents whose CRC32 falls in the first ``val_percent`` of 100 buckets, ``split="train"`` the rest.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..tokenizer import Tokenizer


def expand_files(paths: list[str | Path]) -> list[Path]:
    """Files as given, directories as their *.txt files (sorted); every path must exist."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise ValueError(f"{p}: directory has no .txt files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not out:
        raise ValueError("no text files given")
    return out


class PackedTextDataset:
    def __init__(self, files: list[str | Path], tokenizer: Tokenizer, block_size: int, batch_size: int,
                 epochs: int | None = None, split: str | None = None, val_percent: float = 1.0) -> None:
        """epochs: None repeats forever (step-based training). split: None, "train" or "val"."""
        if block_size < 2 or batch_size < 1:
            raise ValueError(f"block_size must be >= 2 and batch_size >= 1, got {block_size} and {batch_size}")
        if split not in (None, "train", "val"):
            raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to separate documents")
        self.files = expand_files(files)
        self.tokenizer, self.block_size, self.batch_size = tokenizer, block_size, batch_size
        self.epochs, self.split, self.val_percent = epochs, split, val_percent
        self.state = {"epoch": 0, "file": 0, "offset": 0, "pending": [], "buffer": []}

    # --- position --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.state
        return {**s, "pending": list(s["pending"]), "buffer": list(s["buffer"]),
                "files": [str(f) for f in self.files]}

    def load_state_dict(self, state: dict) -> None:
        if state["files"] != [str(f) for f in self.files]:
            raise ValueError("this data position belongs to other files: "
                             f"{state['files'][:3]}... vs {[str(f) for f in self.files][:3]}...")
        self.state = {k: (list(v) if isinstance(v, list) else v) for k, v in state.items() if k != "files"}

    # --- the stream ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        s, need = self.state, self.block_size * self.batch_size
        produced_any = False
        while self.epochs is None or s["epoch"] < self.epochs:
            while s["file"] < len(self.files):
                with open(self.files[s["file"]], "rb") as f:
                    f.seek(s["offset"])
                    for raw in f:
                        s["offset"] += len(raw)
                        line = raw.decode("utf-8", errors="replace")
                        if line.strip():
                            s["pending"].append(line)
                            continue
                        self._close_document()
                        while len(s["buffer"]) >= need:
                            produced_any = True
                            yield self._batch()
                self._close_document()  # end of file ends a document
                while len(s["buffer"]) >= need:
                    produced_any = True
                    yield self._batch()
                s["file"], s["offset"] = s["file"] + 1, 0
            s["epoch"], s["file"] = s["epoch"] + 1, 0
            if not produced_any:
                raise ValueError(f"{len(self.files)} file(s) hold fewer than one batch of tokens "
                                 f"({need} = batch_size × block_size) in this split")

    def _close_document(self) -> None:
        s = self.state
        if not s["pending"]:
            return
        text = "".join(s["pending"]).strip()
        s["pending"] = []
        if self.split is not None:
            in_val = zlib.crc32(text.encode()) % 100 < self.val_percent
            if in_val != (self.split == "val"):
                return
        s["buffer"].extend(self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id])

    def _batch(self) -> dict[str, torch.Tensor]:
        s, n = self.state, self.block_size * self.batch_size
        tokens = torch.tensor(s["buffer"][:n], dtype=torch.long).view(self.batch_size, self.block_size)
        s["buffer"] = s["buffer"][n:]
        return {"input_ids": tokens, "labels": tokens.clone(), "attention_mask": torch.ones_like(tokens)}
