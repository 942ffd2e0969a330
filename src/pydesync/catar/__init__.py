"""The catar archive: encoder (tree -> stream), decoder (stream -> nodes) and the format itself."""

from ..streams import IterReader
from .decoder import ArchiveDecoder, ArchiveError, DirectoryEnd, Node
from .encoder import EncodeError, TreeEncoder
from .format import archive_flags, format_flags, normalize_flags

__all__ = [
    "ArchiveDecoder", "ArchiveError", "DirectoryEnd", "EncodeError", "IterReader", "Node", "TreeEncoder",
    "archive_flags", "format_flags", "normalize_flags",
]
