"""Install the CNI executable into a runtime's plugin directory as a fast launcher.

A runtime execs the plugin once per verb, so interpreter start-up is pod start-up time. The
console script pays for ``site`` and the editable-install finder (~100 ms here, DESIGN §5); the
forwarding path to the node agent needs neither. The installed file is therefore a launcher that
runs this interpreter with ``-I -S`` and puts only this package's directory on ``sys.path``;
``cni.main`` adds site-packages itself when a verb has to run in-process.

Usage (what a node's install step or a DaemonSet init container runs):
    python -m cni.install /opt/cni/bin [--name netctl-cni]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NAME = "netctl-cni"


def launcher_text(python: str = sys.executable, root: Path = PACKAGE_ROOT) -> str:
    # -I: ignore PYTHON* env and the user site (the runtime's environment is not ours to trust);
    # -S: no site-packages on the hot path.
    return (f"#!{python} -IS\n"
            "import sys\n"
            f"sys.path.insert(0, {str(root)!r})\n"
            "from cni.main import main\n"
            "main()\n")


def install(bin_dir: Path, name: str = DEFAULT_NAME, python: str = sys.executable) -> Path:
    """Write the launcher atomically (a runtime may exec the old one meanwhile); returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=bin_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(launcher_text(python))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cni.install",
        description="Install the netctl CNI executable (a fast `python -IS` launcher) into a CNI plugin "
                    "directory, atomically replacing any previous one.")
    ap.add_argument("bin_dir", type=Path, help="the runtime's CNI plugin directory, e.g. /opt/cni/bin")
    ap.add_argument("--name", default=DEFAULT_NAME, help=f"file name, the conflist's `type` (default {DEFAULT_NAME})")
    args = ap.parse_args(argv)
    try:
        path = install(args.bin_dir, args.name)
    except OSError as exc:
        print(f"cannot install into {args.bin_dir}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
