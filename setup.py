"""Build the compiled hot path (src/fastgate/_core) with Cython.

Options for build_ext, as in MagicStack's projects:
  --cython-always        re-cythonize even when a .c file exists
  --cython-annotate      write the .html annotation next to each module
  --cython-directives=k=v,...  extra compiler directives
FASTGATE_DEBUG=1 builds with line tracing, CYTHON_TRACE, -O0 -g and the FASTGATE_DEBUG define.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

DEBUG = os.environ.get("FASTGATE_DEBUG") == "1"
MODULES = ["router", "headers", "shm", "ratelimit", "stats", "balance", "chain", "proxy", "hooks"]
DIRECTIVES = {
    "language_level": "3",
    "embedsignature": True,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
}
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O2"]
CFLAGS += ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
DEFINES = [("FASTGATE_DEBUG", "1"), ("CYTHON_TRACE", "1")] if DEBUG else [("FASTGATE_DEBUG", "0")]


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-always", None, "run cythonize() even if .c files are present"),
        ("cython-annotate", None, "produce a colorized HTML version of the Cython source"),
        ("cython-directives=", None, "Cython compiler directives"),
    ]

    def initialize_options(self):
        super().initialize_options()
        self.cython_always = False
        self.cython_annotate = DEBUG
        self.cython_directives = None

    def finalize_options(self):
        need_cythonize = self.cython_always or DEBUG
        for ext in self.distribution.ext_modules:
            for src in ext.sources:
                if src.endswith(".pyx") or not os.path.exists(src):
                    need_cythonize = True
        if need_cythonize:
            try:
                from Cython.Build import cythonize
            except ImportError:
                sys.exit("fastgate needs Cython~=3.1 to build: pip install 'Cython~=3.1'")
            directives = dict(DIRECTIVES)
            if DEBUG:
                directives.update(linetrace=True, binding=True, profile=True)
            if self.cython_directives:
                for item in self.cython_directives.split(","):
                    k, _, v = item.partition("=")
                    directives[k.strip()] = v.strip()
            self.distribution.ext_modules[:] = cythonize(
                self.distribution.ext_modules,
                compiler_directives=directives,
                annotate=self.cython_annotate,
                include_path=["src/fastgate/_core", "src/fastgate/_core/includes"],
                compile_time_env={"FASTGATE_DEBUG": DEBUG},
                quiet=True,
            )
        super().finalize_options()


def ext(name):
    return Extension(
        f"fastgate._core.{name}",
        [f"src/fastgate/_core/{name}.pyx"],
        include_dirs=["src/fastgate/_core/includes"],
        extra_compile_args=CFLAGS,
        define_macros=DEFINES,
    )


setup(ext_modules=[ext(m) for m in MODULES], cmdclass={"build_ext": build_ext})
