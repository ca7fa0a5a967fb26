"""Sample order: which image each rank reads at each position of its stream. Pure, seeded, no I/O.

The contract (docs/determinism.md states it in full):

* A *pass* is one permutation of all images of the split. Per pass, shards are shuffled with
  ``(seed, pass)``; the concatenated sample sequence is cut into ``world`` equal contiguous ranges, one
  per rank (shards on a boundary are split at a sample, read as a byte range), so every rank has exactly
  ``per_rank = total // world`` images per pass; ``total % world`` images sit out that pass (different
  ones each pass).
* A rank's range is cut into *windows* of ``window`` consecutive samples (a few MB to a few hundred MB
  of one or two shards), each emitted in its own seeded permutation: a shuffle buffer whose output does not
  depend on how many loader threads fetch windows.
* A rank's stream is pass 0, pass 1, ... without gaps; a position is a count of images consumed, so the
  loader's whole state is ``(seed, position)`` and resuming at a position yields exactly the images the
  uninterrupted stream would have yielded next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Consecutive samples ``[start, stop)`` (indices within the shard) of one shard."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    pass_index: int
    index: int  # window number within the rank's pass
    pieces: tuple[Piece, ...]
    order: np.ndarray  # emission order: a permutation of range(len(self))

    def __len__(self) -> int:
        return sum(len(p) for p in self.pieces)


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & 0xFFFFFFFF for w in words])))


def shard_order(num_shards: int, seed: int, pass_index: int) -> np.ndarray:
    return _rng(seed, pass_index, 0x5A4D).permutation(num_shards)


def per_rank(counts: list[int] | np.ndarray, world: int) -> int:
    """Images each rank reads per pass."""
    return int(np.sum(counts)) // world


def rank_pieces(counts: list[int] | np.ndarray, seed: int, pass_index: int, world: int,
                rank: int) -> list[Piece]:
    """The pieces of shards that make up ``rank``'s range in ``pass_index``, in reading order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    n = per_rank(counts, world)
    if n == 0:
        raise ValueError(f"{int(np.sum(counts))} samples cannot be split over {world} ranks")
    first, last = rank * n, (rank + 1) * n  # positions in the pass's concatenated sequence
    pieces: list[Piece] = []
    position = 0
    for shard in shard_order(len(counts), seed, pass_index):
        count = int(counts[shard])
        lo, hi = max(first, position), min(last, position + count)
        if lo < hi:
            pieces.append(Piece(int(shard), lo - position, hi - position))
        position += count
        if position >= last:
            break
    return pieces


def windows_of(pieces: list[Piece], window: int) -> list[list[Piece]]:
    """Cut a rank's pieces into consecutive groups of ``window`` samples (the last may be shorter)."""
    groups: list[list[Piece]] = [[]]
    room = window
    for piece in pieces:
        start = piece.start
        while start < piece.stop:
            take = min(room, piece.stop - start)
            groups[-1].append(Piece(piece.shard, start, start + take))
            start += take
            room -= take
            if room == 0:
                groups.append([])
                room = window
    return [g for g in groups if g]


def rank_windows(counts: list[int] | np.ndarray, seed: int, pass_index: int, world: int, rank: int,
                 window: int) -> list[Window]:
    groups = windows_of(rank_pieces(counts, seed, pass_index, world, rank), window)
    out = []
    for j, group in enumerate(groups):
        size = sum(len(p) for p in group)
        out.append(Window(pass_index, j, tuple(group), _rng(seed, pass_index, rank, j, 0x0DE5).permutation(size)))
    return out


def window_samples(window: Window, shard_starts: np.ndarray) -> np.ndarray:
    """Global sample indices (manifest rows) of a window, in emission order."""
    rows = np.concatenate([np.arange(p.start, p.stop) + shard_starts[p.shard] for p in window.pieces])
    return rows[window.order]


def locate(position: int, n_per_rank: int, window: int) -> tuple[int, int, int]:
    """Stream position -> (pass, window within the pass, offset within the window)."""
    pass_index, offset = divmod(position, n_per_rank)
    return pass_index, offset // window, offset % window


def stream_rows(counts: list[int] | np.ndarray, seed: int, world: int, rank: int, window: int,
                start: int, count: int) -> np.ndarray:
    """Manifest rows at stream positions ``[start, start + count)`` of ``rank``: the reference the
    loader is tested against (it computes the same thing window by window while reading)."""
    counts = np.asarray(counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    n = per_rank(counts, world)
    out: list[np.ndarray] = []
    position = start
    while position < start + count:
        pass_index, j, offset = locate(position, n, window)
        w = rank_windows(counts, seed, pass_index, world, rank, window)[j]
        rows = window_samples(w, starts)[offset:offset + (start + count - position)]
        out.append(rows)
        position += len(rows)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
