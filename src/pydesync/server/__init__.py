"""HTTP servers: chunk-server and index-server, with desync's paths, status codes and options."""

from .chunks import ChunkServer
from .common import ServerOptions
from .indexes import IndexServer

__all__ = ["ChunkServer", "IndexServer", "ServerOptions"]
