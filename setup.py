"""Build the C extensions (one per concern); everything else is in pyproject.toml.

_chunker: the content-defined chunkers' scan loops (buzhash, CAFS); _siphash: SipHash-2-4 for
catar goodbye tables; _filewriter: untar's batched file writer.
"""

import os
import tempfile

from setuptools import Extension, setup

COMPILE_ARGS = ["-O3", "-std=c11", "-Wall"]
# Build products (object files, egg-info) go to a folder of their own outside the source tree, so
# `pip install .` leaves the clone as it was.
BUILD = os.path.join(tempfile.gettempdir(), f"pydesync-build-{os.getuid()}")
os.makedirs(BUILD, exist_ok=True)


def extension(name: str, depends: tuple[str, ...] = ()) -> Extension:
    """pydesync.<name>, built from src/pydesync/<name>.c with the flags every extension shares."""
    return Extension(
        f"pydesync.{name}",
        sources=[f"src/pydesync/{name}.c"],
        depends=[f"src/pydesync/{d}" for d in depends],
        extra_compile_args=COMPILE_ARGS,
    )


setup(
    ext_modules=[
        extension("_chunker", depends=("_buzhash_table.h",)),
        extension("_siphash"),
        extension("_filewriter"),
    ],
    options={"build": {"build_base": os.path.join(BUILD, "build")}, "egg_info": {"egg_base": BUILD}},
)
