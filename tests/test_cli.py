"""The `caspl` command answers usage questions and usage errors fast: building the parser imports no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "ray", "numpy")

# Runs caspl.cli.main(argv) in a fresh interpreter and reports its exit code and which heavy packages got imported.
PROBE = """
import json, sys
import caspl.cli
try:
    code = caspl.cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(%r)))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _run_cli(*argv: str) -> tuple[dict, str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE % json.dumps(HEAVY), *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    *errors, probe = done.stderr.strip().splitlines()
    return json.loads(probe), done.stdout, errors


@pytest.mark.parametrize("argv, code, message", [
    (["--help"], 0, None),
    ([], 0, None),
    (["boost"], 2, "caspl boost: error: the following arguments are required: --config/-c"),
    (["cache", "--inspect"], 2, "caspl cache: error: the following arguments are required: --config/-c"),
    (["eval", "-c", "x.yaml", "--protocol", "nope"], 2, "caspl eval: error: argument --protocol: invalid choice"),
    (["nope"], 2, "caspl: error: argument COMMAND: invalid choice: 'nope'"),
    (["study", "dashboard"], 2, "caspl study dashboard: error: the following arguments are required: --config/-c"),
], ids=["help", "no-command", "boost-without-config", "inspect-without-config", "bad-protocol", "unknown-command",
        "dashboard-without-config"])
def test_usage_and_usage_errors_import_no_torch(argv, code, message):
    probe, stdout, errors = _run_cli(*argv)
    assert probe["code"] == code
    assert probe["heavy"] == [], f"building the parser imported {probe['heavy']}"
    if message is None:
        assert "usage: caspl" in stdout and "cache" in stdout and "boost" in stdout and not errors
    else:  # argparse's usage (one or more lines), then one error line
        assert errors[0].startswith("usage: caspl") and errors[-1].startswith(message), errors
        assert sum("error:" in line for line in errors) == 1 and not stdout


def test_eval_choices_are_the_protocol_modules():
    from caspl.commands import evaluate
    from caspl.train import protocols

    assert evaluate.PROTOCOLS == protocols.PROTOCOLS and evaluate.FEW_SHOTS == protocols.FEW_SHOTS
