"""Build the C extensions (one per concern); everything else is in pyproject.toml.

_chunker: the content-defined chunkers' scan loops (buzhash, CAFS); _siphash: SipHash-2-4 for
catar goodbye tables; _filewriter: untar's batched file writer; _chunkio: per-chunk hashing and
decode-verify-write in one call (OpenSSL and libzstd: built only where their headers are, e.g.
Debian's libssl-dev and libzstd-dev; without it the same work is done from Python, more slowly).
"""

import hashlib
import os
import sys
import tempfile

from setuptools import Extension, setup

COMPILE_ARGS = ["-O3", "-std=c11", "-Wall"]
# Build products (object files, egg-info) go to a folder of their own outside the source tree, so
# `pip install .` leaves the clone as it was.
# One folder per source tree: two clones sharing one would each take the other's newer copies of
# the Python files for up to date (build_py compares times), and install them.
SOURCE = os.path.dirname(os.path.realpath(__file__))
BUILD = os.path.join(tempfile.gettempdir(),
                     f"pydesync-build-{os.getuid()}-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}")
os.makedirs(BUILD, exist_ok=True)


def extension(name: str, depends: tuple[str, ...] = (), libraries: tuple[str, ...] = ()) -> Extension:
    """pydesync.<name>, built from src/pydesync/<name>.c with the flags every extension shares."""
    return Extension(
        f"pydesync.{name}",
        sources=[f"src/pydesync/{name}.c"],
        depends=[f"src/pydesync/{d}" for d in depends],
        extra_compile_args=COMPILE_ARGS,
        libraries=list(libraries),
    )


def can_link(headers: tuple[str, ...], libraries: tuple[str, ...]) -> bool:
    """Whether a program including `headers` compiles and links against `libraries` here."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.errors import CompileError, LinkError
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory(dir=BUILD) as folder:
        source = os.path.join(folder, "probe.c")
        with open(source, "w") as f:
            f.writelines(f"#include <{h}>\n" for h in headers)
            f.write("int main(void) { return 0; }\n")
        try:
            objects = compiler.compile([source], output_dir=folder)
            compiler.link_executable(objects, "probe", output_dir=folder, libraries=list(libraries))
        except (CompileError, LinkError):
            return False
    return True


def optional_extensions() -> list[Extension]:
    """_chunkio where OpenSSL's and libzstd's development files are installed."""
    headers, libraries = ("openssl/evp.h", "zstd.h"), ("crypto", "zstd")
    if can_link(headers, libraries):
        return [extension("_chunkio", libraries=libraries)]
    print("pydesync: building without _chunkio (no OpenSSL or libzstd development files, e.g. Debian's "
          "libssl-dev and libzstd-dev): per-chunk work runs in Python, slower", file=sys.stderr)
    return []


setup(
    ext_modules=[
        extension("_chunker", depends=("_buzhash_table.h",)),
        extension("_siphash"),
        extension("_filewriter"),
        *optional_extensions(),
    ],
    options={"build": {"build_base": os.path.join(BUILD, "build")}, "egg_info": {"egg_base": BUILD}},
)
