"""Raw rows of a dataset in any common format, each with where it came from, for ``data`` to validate.

``data.path`` / ``data.eval_path`` may be:
  - a JSON Lines file (``.jsonl``, or ``.json`` holding one object per line): read here line by line, so a broken
    line is one row's problem (``file:LINE``), not the file's;
  - a JSON file holding one array of objects (``.json`` starting with ``[``): ``file row INDEX``;
  - a parquet file (read with pyarrow, the engine of the ``datasets`` library, without writing a cache copy) or an
    arrow file (``datasets.Dataset.from_file``: the files ``save_to_disk`` writes; plain Arrow IPC files too):
    ``file row INDEX``;
  - a folder written by ``datasets.save_to_disk`` (``datasets.load_from_disk``): a Dataset, or a DatasetDict whose
    split ``split`` names (needed when it holds several): ``folder[split] row INDEX``;
  - a glob pattern (``data/train-*.parquet``): its files in sorted order, each located on its own.
INDEX counts from 0, as ``dataset[INDEX]`` does. Arrow rows share one schema, so a field a row lacks reads as null:
a null field counts as absent (then e.g. ``chosen: missing``).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSON_LINES = (".jsonl", ".json")
TABULAR = (".parquet", ".arrow")
FORMATS = "a .jsonl/.json file, a .parquet or .arrow file, a glob of such files, or a datasets.save_to_disk folder"


@dataclass(frozen=True)
class SourceRow:
    """One record of the input: ``fields`` (as read: a dict, or any JSON value; None when it cannot be read:
    ``problem`` says why, a problem of its ``line``), ``where`` it is
    (``file:LINE`` or ``file row INDEX``), ``label`` how another row's problem refers to it (``line N`` or
    ``row N`` within one file, else ``where``), ``key`` its position in reading order (a JSON Lines file's line
    number: the order problems are listed in) and ``default_id`` (the row's id when it has no ``id`` field)."""

    key: int
    where: str
    label: str
    default_id: int | str
    fields: object
    problem: str | None = None


class DataFileError(ValueError):
    """The input as a whole cannot be read (a missing file, an unknown format, a split to choose)."""


def _json_lines(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line, row or None, problem) for every non-blank line."""
    for line, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as error:
            yield line, None, f"not valid UTF-8 (byte {error.start})"
        except json.JSONDecodeError as error:
            yield line, None, f"not valid JSON ({error.msg} at column {error.colno})"
        except (ValueError, RecursionError) as error:  # e.g. an integer of 5000 digits, nesting 10000 deep
            yield line, None, f"not usable JSON ({type(error).__name__}: {str(error)[:80]})"


def _without_nulls(row: dict) -> dict:
    """An Arrow row with its null fields dropped: in a shared schema, null is how a row lacks a field."""
    return {name: value for name, value in row.items() if value is not None}


def _arrow_rows(path: Path) -> list[dict]:
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path)).to_list()  # the stream format save_to_disk writes
    except (pa.ArrowInvalid, OSError):
        with pa.memory_map(str(path)) as source:  # an Arrow IPC file written by pyarrow itself
            return pa.ipc.open_file(source).read_all().to_pylist()


def _table_rows(path: Path) -> list[dict]:
    """The rows of one parquet / arrow / JSON-array file; raises DataFileError naming the file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".arrow":
            return _arrow_rows(path)
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFileError(f"{path}: not valid JSON ({error})") from None
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types; the file is unreadable either way
        raise DataFileError(f"{path}: cannot be read as {suffix[1:]} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(rows, list):
        raise DataFileError(f"{path}: a .json file holds JSON lines or one array of rows, not a "
                            f"{type(rows).__name__}")
    return rows


def _folder_rows(path: Path, split: str | None) -> tuple[list[dict], str]:
    """The rows of a ``save_to_disk`` folder and how to name it in problems."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataFileError(f"{path}: a folder, but not one written by datasets.save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            choice = f"data.split={split!r} is not one of them" if split else "set data.split (data.eval_split)"
            raise DataFileError(f"{path} holds the splits {splits}: {choice}")
        return loaded[split].to_list(), f"{path}[{split}]"
    if split is not None:
        raise DataFileError(f"{path} holds one dataset, no splits: data.split={split!r} has nothing to choose")
    return loaded.to_list(), str(path)


def _files(path: str) -> list[Path]:
    if glob.has_magic(path):
        files = sorted(Path(name) for name in glob.glob(path))
        if not files:
            raise DataFileError(f"{path}: no file matches")
        return files
    return [Path(path)]


def read_source_rows(path: str | Path, *, split: str | None = None) -> list[SourceRow]:
    """Every record of ``path`` (module docstring), in order. Raises DataFileError when the input as a whole cannot
    be read; a record that cannot is a ``SourceRow`` with its ``problem``."""
    path = str(path)
    if Path(path).is_dir():
        records, name = _folder_rows(Path(path), split)
        return [_tabular_row(fields, key=index, where=f"{name} row {index}", label=f"row {index}", default_id=index)
                for index, fields in enumerate(records)]
    if split is not None:
        raise DataFileError(f"{path}: data.split={split!r} chooses a split of a datasets.save_to_disk folder; "
                            "this is not one")
    files = _files(path)
    several = len(files) > 1
    rows: list[SourceRow] = []
    offset = 0  # keys keep increasing across files
    for file in files:
        if not file.is_file():
            raise DataFileError(f"{file}: file not found")
        suffix = file.suffix.lower()
        if suffix not in JSON_LINES + TABULAR:
            raise DataFileError(f"{file}: unknown format {suffix or '(no extension)'}; expected {FORMATS}")
        if suffix == ".jsonl" or (suffix == ".json" and not _starts_an_array(file)):  # a .jsonl is never an array
            last = 0
            for line, fields, problem in _json_lines(file):
                # one file: the line number is the key and the default id, as it always has been
                where = f"{file}:{line}"
                rows.append(SourceRow(key=offset + line, where=where, label=where if several else f"line {line}",
                                      fields=fields, problem=problem,
                                      default_id=f"{file.name}:{line}" if several else line))
                last = line
        else:
            records = _table_rows(file)
            rows += [_tabular_row(fields, key=offset + index, where=f"{file} row {index}",
                                  label=f"{file} row {index}" if several else f"row {index}",
                                  default_id=f"{file.name}:{index}" if several else index)
                     for index, fields in enumerate(records)]
            last = len(records)
        offset += last
    return rows


def _tabular_row(fields: object, *, key: int, where: str, label: str, default_id: int | str) -> SourceRow:
    """An element of a JSON array may be anything (``data`` refuses what is not an object); Arrow rows are dicts."""
    fields = _without_nulls(fields) if isinstance(fields, dict) else fields
    return SourceRow(key=key, where=where, label=label, default_id=default_id, fields=fields)


def _starts_an_array(path: Path) -> bool:
    """A .json file whose first non-blank byte opens an array holds one array of rows (else: JSON lines)."""
    with path.open("rb") as file:
        while chunk := file.read(4096):
            if stripped := chunk.lstrip():
                return stripped[:1] == b"["
    return False
