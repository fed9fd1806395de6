"""The lab's Daemon must recognise (and so be able to stop) a script started through its shebang."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from netctl.lab.procs import Daemon


def test_stop_terminates_a_shebang_script(tmp_path: Path) -> None:
    script = tmp_path / "sleeper"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    d = Daemon("sleeper", [script, "--flag"], tmp_path / "log", tmp_path / "pid")
    d.start()
    deadline = time.monotonic() + 10
    while d.pid is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = d.pid
    assert pid is not None, "a just-started shebang script must count as running"
    d.stop(timeout=5)
    assert d.pid is None
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
