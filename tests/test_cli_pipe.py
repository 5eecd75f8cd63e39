"""`handoff dlq list | head`: a reader that leaves early ends the command quietly, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_reader_gone_before_the_output_is_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "HANDOFF_HOME": str(tmp_path)}
    env.pop("HANDOFF_STATE_URL", None)
    handoff = "import sys; from integrations.cli import main; sys.exit(main())"
    cli = subprocess.Popen(
        [sys.executable, "-c", handoff, "dlq", "list", "--all"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cli.stdout.close()  # `| head -n 0`: the reader leaves before the command writes
    stderr = cli.stderr.read().decode()
    cli.wait(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert "BrokenPipeError" not in stderr, stderr
    assert cli.returncode == 141
