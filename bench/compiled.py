"""Before timing ``cis`` start-ups: the cis_bot an interpreter imports, compiled to bytecode.

An installed package has its bytecode (pip compiles it on install), and an editable install
writes it on its first start, unless PYTHONDONTWRITEBYTECODE is set: then every start compiles
cis_bot's source again, 0.16 s of a local run, which no user pays. Compiling once here (the
__pycache__ directories are what Python itself would have written) measures the program as it
is installed, whatever the environment of the benchmark.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

COMPILE = (
    "import compileall, os, cis_bot; "
    "compileall.compile_dir(os.path.dirname(cis_bot.__file__), quiet=1)"
)


def compile_cis_bot(python: str, cwd: Path | None = None) -> None:
    """Compile the cis_bot package ``python`` imports, started in ``cwd`` as the measured
    commands are (``-c`` and ``-m`` put the working directory first on the import path)."""
    subprocess.run([python, "-c", COMPILE], check=True, stdout=subprocess.DEVNULL, cwd=cwd)
