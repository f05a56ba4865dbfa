"""The row store: the resumable, sharded per-image results every harness loop writes.

A run directory holds
- rows.rank<r>.jsonl: the rows of rank r, appended and flushed after every batch;
- rows.jsonl: all rows, merged by rank 0 at the end (`merge_run`); a results directory may
  keep it gzipped (rows.jsonl.gz), which `read_run` reads too;
- manifest.json: what produced the rows ({"settings": {label: description}}, or a run's
  whole settings for `pin_settings`), so that a resumed run with other settings under the
  same labels is refused rather than mixed in.

The loops (`runner.evaluate`, `suite.run_suite`, `suite.autoattack_check`,
`convergence.run_convergence`) keep only their inner step: they open a `RowStore`, skip
what its `done` holds, `append` each batch's rows, and merge at the end.

    store = open_shard(out_dir, manifest)       # resumes: store.done holds the rows on disk
    with store:
        store.append(rows_of_a_batch)           # written and flushed
    rows = merge_run(out_dir, order)            # rank 0, after `gather`

Also the data access the loops share: `take` (images and labels at indices), `data_size`,
`check_indices`, and the torch.distributed helpers `rank_world`, `barrier`, `gather`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

ROWS = "rows.jsonl"
MANIFEST = "manifest.json"
SHARDS = "rows.rank*.jsonl"


# ------------------------------------------------------------------------------ torch.distributed

def rank_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """torch.distributed's barrier when a process group is up; nothing otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather(values: list[int]) -> list[list[int]]:
    """values of every rank, [rank][i]; also the barrier after which rank 0 may merge the shards."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return [values]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.zeros((world, len(values)), dtype=torch.int64, device=dev)
    t[rank] = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------ data

def take(data, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of `data` at `indices`: data is (images, labels) tensors or a dataset of (image, label)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return data[0][idx], torch.as_tensor(data[1])[idx]
    items = [data[i] for i in indices]
    return torch.stack([torch.as_tensor(it[0]) for it in items]), torch.as_tensor([int(it[1]) for it in items])


def data_size(data) -> int:
    """The number of samples of `data` (ValueError when images and labels differ in length)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        if len(data[0]) != len(data[1]):
            raise ValueError(f"data images and labels differ in length: {len(data[0])} vs {len(data[1])}")
        return len(data[0])
    return len(data)


def check_indices(data, indices) -> list[int]:
    """The dataset indices to evaluate (None: all), checked distinct and in range."""
    size = data_size(data)
    indices = list(range(size)) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < size]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"indices must be distinct and in [0, {size}), got bad entries {bad[:5]}")
    return indices


# ------------------------------------------------------------------------------ reading

def row_key(row: Mapping) -> tuple[str, str, int]:
    """The identity of an evaluation row: (defence, attack, index)."""
    return row["defence"], row["attack"], int(row["index"])


def read_rows(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """Rows of one JSONL file (or a .gz of one); a truncated last line (a run killed mid-write) is dropped.

    Args:
        path: JSONL file (missing: no rows).
        repair: also cut the truncated last line from the file, so appending continues cleanly.

    Returns:
        The complete rows, in file order.

    Raises:
        ValueError: on a malformed line that is not the last one.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data) and not path.endswith(".gz"):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    rows = []
    for n, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON row: {e}") from None
    return rows


def read_run(out_dir: str | os.PathLike, key: Callable[[Mapping], object] = row_key) -> list[dict]:
    """Every row of a run directory, finished or not: rows.jsonl (or rows.jsonl.gz) and every
    rank's shard, the first row of each key kept."""
    out_dir = os.fspath(out_dir)
    merged = os.path.join(out_dir, ROWS)
    rows = read_rows(merged if os.path.exists(merged) or not os.path.exists(merged + ".gz") else merged + ".gz")
    for p in sorted(glob.glob(os.path.join(out_dir, SHARDS))):
        rows += read_rows(p)
    seen, unique = set(), []
    for r in rows:
        k = key(r)
        if k not in seen:
            seen.add(k)
            unique.append(r)
    return unique


def read_manifest(out_dir: str) -> dict:
    """The run directory's manifest.json ({} when there is none)."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------------------ writing

def jsonable(obj):
    """obj as JSON gives it back (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(obj, default=str, sort_keys=True))


def check_settings(out_dir: str, settings: Mapping[str, object]) -> dict:
    """The manifest's settings with `settings` ({label: description}) added.

    Raises:
        ValueError: when out_dir's manifest holds another description under one of the labels.
    """
    old = read_manifest(out_dir).get("settings", {})
    new = dict(old)
    for label, desc in settings.items():
        if label in old and old[label] != desc:
            raise ValueError(f"out_dir {out_dir!r} holds results of a different setting under {label!r}: "
                             f"stored {old[label]}, now {desc}; use a new out_dir or another name")
        new[label] = desc
    return new


def pin_settings(out_dir: str, settings: Mapping, what: str = "run") -> dict:
    """Write `settings` as out_dir's whole manifest, or check it equals the one there.

    Returns:
        settings as JSON gives them back.

    Raises:
        ValueError: when out_dir holds a manifest of other settings.
    """
    settings = jsonable(dict(settings))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(f"out_dir {out_dir!r} holds a {what} of other settings: {old}; now {settings}")
    with open(path, "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)
    return settings


class RowStore:
    """An append-only JSONL file of rows with the set of rows already done.

    Args:
        path: the file (created; a truncated last line is cut, so appending continues cleanly).
        key: a row's identity (the key of `done`).
        existing: the rows already done (None: the file's own rows).
    """

    def __init__(self, path: str, key: Callable[[Mapping], object] = row_key,
                 existing: Iterable[Mapping] | None = None):
        self.path, self.key = path, key
        on_disk = read_rows(path, repair=True)
        self.done = {key(r): r for r in (on_disk if existing is None else existing)}
        self.written = 0
        self._file = open(path, "a")

    def __contains__(self, key) -> bool:
        return key in self.done

    def append(self, rows: Iterable[Mapping]) -> None:
        """Write the rows, flush, and count them as done."""
        for r in rows:
            self._file.write(json.dumps(r, sort_keys=True) + "\n")
            self.done[self.key(r)] = r
            self.written += 1
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(out_dir: str, settings: Mapping[str, object] | None = None,
               key: Callable[[Mapping], object] = row_key) -> RowStore:
    """This rank's shard of a run directory, resumed: `done` holds every rank's rows on disk.

    Args:
        out_dir: the run directory (created).
        settings: {label: description} for the manifest (checked against it first; written
            by rank 0 after every rank has read the rows); None: no manifest.
        key: a row's identity.

    Raises:
        ValueError: the manifest holds another description under one of the labels.
    """
    os.makedirs(out_dir, exist_ok=True)
    manifest = None if settings is None else check_settings(out_dir, settings)
    existing = read_run(out_dir, key)
    barrier()
    rank, _ = rank_world()
    if rank == 0 and manifest is not None:
        with open(os.path.join(out_dir, MANIFEST), "w") as f:
            json.dump({"settings": manifest}, f, indent=1, sort_keys=True)
    return RowStore(os.path.join(out_dir, f"rows.rank{rank}.jsonl"), key, existing)


def merge_run(out_dir: str, order: Callable[[Mapping], object]) -> list[dict]:
    """Merge every shard into rows.jsonl sorted by `order` (then the shards go); rank 0 only,
    after `gather` saw every shard complete.

    Returns:
        The merged rows.
    """
    rows = read_run(out_dir)
    rows.sort(key=order)
    tmp = os.path.join(out_dir, ROWS + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(out_dir, ROWS))
    for p in glob.glob(os.path.join(out_dir, SHARDS)):
        os.remove(p)
    return rows
