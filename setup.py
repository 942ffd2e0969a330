"""Build the chunker's C scan loop; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pydesync._chunker",
            sources=["src/pydesync/_chunker.c"],
            depends=["src/pydesync/_buzhash_table.h"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
        )
    ]
)
