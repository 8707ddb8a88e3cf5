"""`local.read_eucarc` reads both kinds of eucarc (`euca-runtime up`'s, the eucarc runbook's) as
`source` would set them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from euca_runtime.local import read_eucarc

EUCARC = """# a comment
export EUARE_URL=http://10.0.0.1:8773
export EUARE_URLS="http://10.0.0.1:8773 http://10.0.0.2:8773"
export AWS_ENDPOINT_URL_IAM=$EUARE_URL
export AWS_ACCESS_KEY_ID=AKIAEXAMPLE
not an export line
"""


def test_read_eucarc_matches_what_source_sets(tmp_path: Path) -> None:
    path = tmp_path / "eucarc"
    path.write_text(EUCARC)
    env = read_eucarc(path)
    assert env == {
        "EUARE_URL": "http://10.0.0.1:8773",
        "EUARE_URLS": "http://10.0.0.1:8773 http://10.0.0.2:8773",
        "AWS_ENDPOINT_URL_IAM": "http://10.0.0.1:8773",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    }
    script = f"source {path} 2>/dev/null; " + "; ".join(f'printf "%s\\n" "${k}"' for k in env)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == list(env.values())
