"""`pickcell fleet init`: the fleet's keys, and one folder per cell to copy onto that cell.

<fleet>/keys/fleet.key, fleet.key_secret      the service's CURVE pair
<fleet>/keys/allowed/<cell>.key               every cell's public CURVE key (its identity)
<fleet>/keys/signing.ed25519, signing.pub     the model-signing pair
<fleet>/cells/<cell>/                         <cell>.key_secret, fleet.key, signing.pub: the cell's
                                              fleet keys folder (copy it to the cell; nothing else)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fleet import signing
from fleet.net import SERVER_KEY_NAME
from hitl.keys import new_keypair

DEFAULT_TOML = """\
# pickcell fleet rollout rules (see docs/fleet.md). Fractions are in [0, 1].
canary_share = 0.2        # share of cells that run a canary (at least one)
heartbeat_s = 1.0         # seconds between the service's heartbeats
status_interval_s = 2.0   # seconds between a cell's status reports
chunk_bytes = 262144      # bytes per model-file chunk

[shadow]
min_picks = 200                       # executed attempts scored by the challenger before a verdict
max_picks = 2000                      # undecided after this many: the stage fails
max_drop_auto_precision = 0.02        # largest drop against the live model allowed
max_drop_autonomous_pick_rate = 0.05
confidence = 0.95

[canary]
min_picks = 200
max_picks = 2000
max_drop_auto_precision = 0.02
max_drop_autonomous_pick_rate = 0.05
confidence = 0.95
"""


def init_fleet(fleet_dir: str | Path, cells: list[str]) -> list[Path]:
    """Create what is missing (never overwrites a key); returns the cell folders made or updated."""
    d = Path(fleet_dir)
    keys = d / "keys"
    (keys / "allowed").mkdir(parents=True, exist_ok=True)
    # Only the fleet's owner may read its keys or talk to its control socket (ipc://<fleet>/control.sock).
    os.chmod(d, 0o700)
    if not (keys / f"{SERVER_KEY_NAME}.key_secret").exists():
        new_keypair(SERVER_KEY_NAME, keys)
    if not (keys / signing.PRIVATE_NAME).exists():
        signing.new_signing_key(keys)
    if not (d / "fleet.toml").exists():
        (d / "fleet.toml").write_text(DEFAULT_TOML)
    out = []
    for cell in cells:
        cd = d / "cells" / cell
        if not (cd / f"{cell}.key_secret").exists():
            new_keypair(cell, cd)
        shutil.copyfile(cd / f"{cell}.key", keys / "allowed" / f"{cell}.key")
        shutil.copyfile(keys / f"{SERVER_KEY_NAME}.key", cd / f"{SERVER_KEY_NAME}.key")
        shutil.copyfile(keys / signing.PUBLIC_NAME, cd / signing.PUBLIC_NAME)
        out.append(cd)
    return out
