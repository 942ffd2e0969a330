"""--ignore and --ignore-chunks: chunk ids a command should leave alone."""

from __future__ import annotations

from collections.abc import Sequence

from ..digest import ChunkId
from ..errors import UsageError
from ..indexstore import read_index_at


def ignored_ids(indexes: Sequence[str], id_files: Sequence[str], digest: str | None = None) -> set[ChunkId]:
    ids: set[ChunkId] = set()
    for location in indexes:
        ids.update(c.id for c in read_index_at(location, digest))
    for path in id_files:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read chunk list {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    ids.add(ChunkId(line.strip()))
                except ValueError:
                    raise UsageError(f"{path}:{n}: invalid chunk id '{line.strip()}'") from None
    return ids
