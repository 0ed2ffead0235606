"""Prompts from Hugging Face datasets (through ``datasets``, an optional extra): in memory, or streamed row by row.

A streamed source keeps the contract of every built-in source (:class:`~diffrl.prompts.source.PromptSource`):
draw ``i`` is a pure function of the seed and ``i``, so processes shard it and checkpoints resume it exactly.
Position ``i`` is the ``i``-th row of the stream's passes laid end to end (each pass reshuffled through the
buffer with ``seed + pass`` when ``order`` is ``sample``, as ``IterableDataset.shuffle`` / ``set_epoch`` do).
Every process reads the whole stream and keeps its own rows; a resumed run reads forward to its position.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from diffrl.prompts.source import ORDERS, PromptError, PromptRecords, PromptSource

__all__ = ["StreamedRecords", "hf_dataset"]


def _check_columns(columns: list[str], wanted: list[str], where: str) -> None:
    for needed in wanted:
        if needed not in columns:
            close = difflib.get_close_matches(needed, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PromptError(f"prompt source 'hf_dataset': {where} has no column {needed!r}{hint}; its columns: "
                              f"{', '.join(columns)}")


class StreamedRecords(PromptSource):
    """Prompts (and metadata columns) read row by row from a ``datasets.IterableDataset``, cycling through it.

    Only the current row is in memory. Draws must come in increasing position (as a trainer's do); an earlier
    position restarts the stream. The first row is read when the source is built, to check the columns.
    """

    def __init__(self, dataset: Any, *, column: str, metadata_columns: Sequence[str], order: str, seed: int | None,
                 buffer_size: int, where: str) -> None:
        super().__init__(seed)
        self.dataset, self.column, self.metadata_columns = dataset, column, list(metadata_columns)
        self.order, self.buffer_size, self.where = order, buffer_size, where
        self.pass_length: int | None = None  # rows per pass, known once the stream has ended once
        self._rows: Iterator[dict] | None = None
        self._position = 0  # the stream position of the next row self._rows yields
        self._pass, self._row = 0, 0
        first = self._next_row()
        _check_columns(list(first), [column, *self.metadata_columns], where)
        self._restart(0)

    def _open(self, pass_number: int) -> Iterator[dict]:
        stream = self.dataset
        if self.order == "sample":
            stream = stream.shuffle(seed=self.seed, buffer_size=self.buffer_size)
            stream.set_epoch(pass_number)
        return iter(stream)

    def _restart(self, pass_number: int) -> None:
        self._pass, self._row, self._rows = pass_number, 0, self._open(pass_number)
        self._position = pass_number * (self.pass_length or 0)

    def _next_row(self) -> dict:
        if self._rows is None:
            self._restart(0)
        for _ in range(2):
            try:
                row = next(self._rows)
            except StopIteration:
                if self._row == 0:
                    raise PromptError(f"prompt source 'hf_dataset': {self.where} streamed no rows") from None
                self.pass_length = self._row
                self._restart(self._pass + 1)
                continue
            self._row += 1
            self._position += 1
            return row
        raise AssertionError("unreachable: a pass that had rows yields a row when reopened")

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        if index < self._position:
            self._restart(index // self.pass_length if self.pass_length else 0)
        while self._position < index:
            self._next_row()
        row = self._next_row()
        prompt = row[self.column]
        if not isinstance(prompt, str):
            raise PromptError(f"prompt source 'hf_dataset': column {self.column!r} of {self.where} must hold strings; "
                              f"row {index} holds {type(prompt).__name__}")
        return prompt, {c: row[c] for c in self.metadata_columns}


def hf_dataset(*, path: str | Path, column: str = "prompt", name: str | None = None, split: str = "train",
               metadata_columns: Sequence[str] | None = None, revision: str | None = None,
               data_files: str | Sequence[str] | None = None, order: str = "sample",
               seed: int | None = 0, streaming: bool = False, buffer_size: int = 1000) -> PromptSource:
    """Prompts from a Hugging Face dataset through ``datasets``: a Hub id (``name`` its config, ``revision``), a
    folder written by ``Dataset.save_to_disk``, or a builder with local files (``path="json"``,
    ``data_files=...``; offline from the local cache with ``HF_DATASETS_OFFLINE=1``). ``column`` holds the
    prompts; ``metadata_columns`` (default: none) become each prompt's metadata. The split is read once into
    memory, so draws shard and resume like every built-in source; ``streaming: true`` reads it row by row
    instead (:class:`StreamedRecords`: for sets too large for memory), shuffled through a ``buffer_size``
    buffer when ``order`` is ``sample``."""
    try:
        import datasets
    except ImportError as err:  # an optional extra
        raise PromptError("prompt source 'hf_dataset' needs the datasets package: pip install 'diffrl[datasets]'") \
            from err
    where = str(path)
    if not isinstance(streaming, bool):
        raise PromptError(f"prompt source 'hf_dataset': streaming={streaming!r} must be true or false")
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise PromptError(f"prompt source 'hf_dataset': buffer_size={buffer_size!r} must be a whole number >= 1")
    if order not in ORDERS:
        raise PromptError(f"prompt source 'hf_dataset': order={order!r} must be one of {list(ORDERS)}")
    try:
        folder = Path(where).expanduser()
        if folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise PromptError(f"prompt source 'hf_dataset': {where} has no split {split!r}; its splits: "
                                      f"{', '.join(loaded)}")
                loaded = loaded[split]
            if streaming:
                loaded = loaded.to_iterable_dataset()
        else:
            loaded = datasets.load_dataset(where, name, split=split, revision=revision, data_files=data_files,
                                           streaming=streaming)
        if streaming:
            return StreamedRecords(loaded, column=column, metadata_columns=metadata_columns or [], order=order,
                                   seed=seed, buffer_size=buffer_size, where=where)
    except PromptError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise PromptError(f"prompt source 'hf_dataset': cannot load {where!r} (name={name!r}, split={split!r}): "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    _check_columns(list(loaded.column_names), [column, *(metadata_columns or [])], where)
    texts = loaded[column]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise PromptError(f"prompt source 'hf_dataset': column {column!r} of {where} must hold strings (one prompt "
                          "per row) and must not be empty")
    extra = {c: loaded[c] for c in metadata_columns or []}
    records = [(text, {c: values[i] for c, values in extra.items()}) for i, text in enumerate(texts)]
    return PromptRecords(records, order=order, seed=seed, source="hf_dataset")
