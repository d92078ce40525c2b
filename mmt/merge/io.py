"""Checkpoint I/O for ``mmt merge``: a lazy reader of (sharded) safetensors and a streaming, atomic writer.

The reader opens each shard once and hands out one tensor at a time. The writer plans every shard's
header from the output's names, dtypes and shapes before any tensor exists, so each merged tensor is
written at its final offset as soon as it is computed. Outputs appear atomically: everything goes to a
hidden temporary directory next to the output, renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import queue
import shutil
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from mmt.errors import MergeError

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_ST = {v: k for k, v in ST_DTYPES.items()}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TensorPlan = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape) of one output tensor


class _Shard:
    """One safetensors file: its header parsed and checked once, its tensors views of a private memory map.

    A view costs nothing until the merge reads it, and reads come straight from the page cache without a
    copy. :meth:`release` drops a tensor's pages from this process once it is merged, so resident memory
    stays at the tensors in flight instead of growing to every input checkpoint.
    """

    def __init__(self, file: Path):
        self.file = file
        try:
            self.fh = open(file, "rb", buffering=0)  # kept open: the memory map reads through it
            size = os.fstat(self.fh.fileno()).st_size
            head = self.fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(self.fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError) as exc:
            raise MergeError(f"cannot read shard {file}: {exc} (corrupt or truncated?)") from None
        self.data_start = 8 + n
        self.map: mmap.mmap | None = None
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(v) for v in info["data_offsets"])
                shape = tuple(int(v) for v in info["shape"])
                st_dtype = str(info["dtype"])
            except (KeyError, TypeError, ValueError):
                raise MergeError(f"cannot read shard {file}: bad header entry for tensor {name}") from None
            dtype = _FROM_ST.get(st_dtype)
            if dtype is None:
                raise MergeError(f"tensor {name} in {file} has unsupported dtype {st_dtype}")
            if end - begin != nbytes(dtype, shape) or self.data_start + end > size or begin < 0:
                raise MergeError(
                    f"cannot read shard {file}: tensor {name} has offsets {[begin, end]} that do not fit "
                    f"its {st_dtype}{list(shape)} or the file's {size} bytes (corrupt or truncated?)"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def _map(self) -> mmap.mmap:
        if self.map is None:
            # ACCESS_COPY: writable for torch.frombuffer, never written back; unwritten pages stay the file's.
            self.map = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self.map

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        start, size = self.data_start + begin, end - begin
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        if start % torch.empty((), dtype=dtype).element_size() == 0:
            flat = torch.frombuffer(self._map(), dtype=torch.uint8, count=size, offset=start)
            return flat.view(dtype).reshape(shape)
        out = torch.empty(size, dtype=torch.uint8)  # misaligned for its dtype: read a copy
        view = memoryview(out.numpy())
        done = 0
        while done < size:
            got = os.preadv(self.fh.fileno(), [view[done:]], start + done)
            if got <= 0:
                raise MergeError(f"cannot read tensor {name} from {self.file}: file ended early (truncated?)")
            done += got
        return out.view(dtype).reshape(shape)

    def _advise(self, name: str, advice: int) -> None:
        _, _, begin, end = self.entries[name]
        if self.map is None or end == begin:
            return
        page = mmap.PAGESIZE
        lo = (self.data_start + begin) // page * page
        hi = min(len(self.map), -(-(self.data_start + end) // page) * page)
        self.map.madvise(advice, lo, hi - lo)

    def release(self, name: str) -> None:
        """Unmap the tensor's pages (a later read maps them again from the file)."""
        self._advise(name, mmap.MADV_DONTNEED)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read the tensor ahead, for inputs not yet in the page cache."""
        self._map()
        self._advise(name, mmap.MADV_WILLNEED)


class Checkpoint:
    """Tensor-by-tensor access to a safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, path: str | Path, weights_name: str = "model"):
        self.path = Path(path)
        self._shards: dict[Path, _Shard] = {}
        if not self.path.is_dir():
            raise MergeError(f"checkpoint {self.path} is not a directory")
        index = self.path / f"{weights_name}.safetensors.index.json"
        single = self.path / f"{weights_name}.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise MergeError(f"{index}: not a valid safetensors index ({exc})") from None
            self.files = {name: self.path / f for name, f in weight_map.items()}
        elif single.exists():
            self.files = {name: single for name in self._open(single).entries}
        else:
            raise MergeError(
                f"checkpoint {self.path} has neither {single.name} nor {index.name} "
                "(only safetensors checkpoints are streamed; re-save with safe_serialization=True)"
            )

    def _open(self, file: Path) -> _Shard:
        if file not in self._shards:
            if not file.exists():
                raise MergeError(f"shard {file} listed in the index of {self.path} is missing")
            self._shards[file] = _Shard(file)
        return self._shards[file]

    def _entry(self, name: str) -> _Shard:
        file = self.files.get(name)
        if file is None:
            raise MergeError(f"tensor {name} is missing from checkpoint {self.path}")
        shard = self._open(file)
        if name not in shard.entries:
            raise MergeError(f"tensor {name} is listed for {file} in the index of {self.path} but is not in it")
        return shard

    def names(self) -> list[str]:
        return list(self.files)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self._entry(name).entries[name]
        return dtype, shape

    def get(self, name: str) -> torch.Tensor:
        return self._entry(name).read(name)

    def release(self, name: str) -> None:
        """Done with ``name``: its pages leave this process's resident memory (they stay in the page cache)."""
        self._entry(name).release(name)

    def prefetch(self, name: str) -> None:
        self._entry(name).prefetch(name)


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    """Writes a sharded safetensors checkpoint whose layout is planned up front.

    The header of each shard (names, dtypes, shapes, offsets) is known before merging, so every
    tensor is written at its offset as soon as it is computed and then dropped. The writes, and the
    fsync of each shard once its last tensor is in, run on a background thread, overlapped with merging
    the next tensors; at most ``max_pending`` tensors wait for it (they are what the overlap costs in memory).
    An error on that thread is raised by the next ``write`` or by ``close``.
    """

    def __init__(
        self,
        out_dir: Path,
        plan: list[TensorPlan],
        shard_bytes: int,
        weights_name: str = "model",
        max_pending: int = 2,
    ):
        self.dir = out_dir
        self.weights_name = weights_name
        shards: list[list[TensorPlan]] = [[]]
        size = 0
        for item in plan:
            size_of = nbytes(item[1], item[2])
            if shards[-1] and size + size_of > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += size_of
        n = len(shards)
        self.names = (
            [f"{weights_name}.safetensors"]
            if n == 1
            else [f"{weights_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.where: dict[str, tuple[int, int]] = {}  # tensor -> (shard, absolute byte offset)
        self.handles = []
        self.total_bytes = 0
        for i, items in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, dtype, shape in items:
                size_of = nbytes(dtype, shape)
                header[name] = {
                    "dtype": ST_DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + size_of],
                }
                offset += size_of
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
            f = open(out_dir / self.names[i], "wb")
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            start = 8 + len(blob)
            f.truncate(start + offset)
            for name, _, _ in items:
                self.where[name] = (i, start + header[name]["data_offsets"][0])
            self.handles.append(f)
            self.total_bytes += offset
        self.expected = {name: (dtype, shape) for name, dtype, shape in plan}
        self.written: set[str] = set()
        self._left = [len(items) for items in shards]  # tensors still to come, per shard
        self._pending: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="mmt-merge-writer", daemon=True)
        self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.expected[name]
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, (
            f"{name} planned as {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}"
        )
        assert name not in self.written, f"{name} written twice"
        self._raise_pending_error()
        self._pending.put((name, tensor.detach().contiguous().cpu()))
        self.written.add(name)

    def _drain(self) -> None:
        while (item := self._pending.get()) is not None:
            if self._error is not None:
                continue  # keep taking items so that write() never blocks on a dead writer
            name, t = item
            try:
                shard, offset = self.where[name]
                f = self.handles[shard]
                f.seek(offset)
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                self._left[shard] -= 1
                if self._left[shard] == 0:  # the shard is complete: make it durable now, not at the end
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
            except BaseException as exc:  # re-raised on the caller's thread
                self._error = exc

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()

    def abort(self) -> None:
        """Stop the writer thread and close every file (the caller removes the directory)."""
        self._stop()
        for f in self.handles:
            if not f.closed:
                f.close()

    def close(self) -> None:
        self._stop()
        self._raise_pending_error()
        for f in self.handles:  # shards left open had no tensors (an empty shard cannot be planned, but be safe)
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        missing = set(self.expected) - self.written
        assert not missing, f"tensors never written: {sorted(missing)[:5]}"
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.names[self.where[name][0]] for name in self.expected},
            }
            (self.dir / f"{self.weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def atomic_output(output: Path, overwrite: bool) -> Path:
    """A fresh hidden directory next to ``output`` to write into; :func:`commit` renames it into place."""
    if output.exists() and not overwrite:
        raise MergeError(f"output {output} already exists; remove it or set overwrite: true")
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.tmp-*"):  # left by a killed merge
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
