"""The simulators' and tools' command lines on bad input: one line a person can act on and
exit 2, never a traceback, and never the value refused when it may be a secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from switch.cards.files import new_card_header, new_card_record

ROOT = Path(__file__).resolve().parent.parent
SECRET = "D4A14711894E1D14A087A7093FA1104A"  # what a PIN under the print key looks like
COMPONENT = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "switch.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _refused(out: subprocess.CompletedProcess[str], says: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_the_hsm_simulator_refuses_bad_settings_in_one_line(tmp_path: Path) -> None:
    _refused(_run("hsm", "--port", "70000"), "port must be 0-65535")
    _refused(_run("hsm", "--config", str(tmp_path / "missing.toml")), "No such file")
    broken = tmp_path / "broken.toml"
    broken.write_text("[hsm\n")
    _refused(_run("hsm", "--config", str(broken)), "configuration error")
    pasted = tmp_path / "pasted.toml"  # a component pasted into the wrong setting
    pasted.write_text(f'[hsm]\nport = "{SECRET}"\n')
    out = _run("hsm", "--config", str(pasted))
    _refused(out, "port must be an integer")
    assert SECRET not in out.stderr
    short = tmp_path / "short.toml"
    short.write_text(f'[hsm]\n[[hsm.lmk_components]]\nvalue = "{COMPONENT}"\nkcv = "ABCDEF"\n'
                     f'[[hsm.lmk_components]]\nvalue = "{COMPONENT[:-2]}"\nkcv = "ABCDEF"\n')
    out = _run("hsm", "--config", str(short))
    _refused(out, "LMK component 2: an LMK component must be 64 hex digits")
    assert COMPONENT[:20] not in out.stderr
    wrong_kcv = tmp_path / "kcv.toml"
    wrong_kcv.write_text(f'[hsm]\n[[hsm.lmk_components]]\nvalue = "{COMPONENT}"\n'
                         f'kcv = "ABCDEF"\n[[hsm.lmk_components]]\nvalue = "{COMPONENT}"\n'
                         f'kcv = "ABCDEF"\n')
    _refused(_run("hsm", "--config", str(wrong_kcv)), "check value does not match")


def test_the_billing_simulator_refuses_bad_arguments_in_one_line() -> None:
    _refused(_run("marketing", "--port", "-4"), "port must be between 0 and 65535")
    _refused(_run("marketing", "--customers", "-1"), "customers must be from 0 to 900,000,000")
    _refused(_run("marketing", "--customers", "1000000000"),
             "customers must be from 0 to 900,000,000")


def test_a_new_card_file_with_a_bad_trailer_is_refused_without_echoing_it(
        tmp_path: Path) -> None:
    ncf = tmp_path / "batch.ncf"
    ncf.write_bytes(new_card_header(batch_id=1, face_value=5000, count=1, manufacturer="acme",
                                    created="2026-11-27T00:00:00+00:00", print_kcv="ABCDEF",
                                    expiry="2029-11-27")
                    + new_card_record("1302250000000001", 5000, SECRET).encode()
                    + f"T|{SECRET}|5000|00\n".encode())
    out = subprocess.run([sys.executable, "-m", "switch.cli", "cards", "manufacture", str(ncf),
                          "--out", str(tmp_path / "back.txt")], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    _refused(out, "line 3: malformed trailer")
    assert SECRET not in out.stderr
