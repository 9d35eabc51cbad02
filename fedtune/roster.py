"""`fedtune roster build | check`: the federation's roster, which every institution pins.

Each institution sends its identity key (the `ledger.pub` that `fedtune node-keys --ledger-dir`
made) out of band; someone builds the roster from them, and every institution checks the file it
received and compares the printed fingerprint with the others (by phone, in a letter). A node
then joins a SecAgg+ round only with peers whose masking keys a roster member signed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fedtune.common.errors import FedtuneError
from fedtune.common.ledger.chain import PUBLIC_KEY_FILE
from fedtune.common.secure_aggregation.roster import INSTITUTION_ID, Roster, public_key_file

DEFAULT_DAYS = 180


def build_roster(*, members: list[str], out: Path, federation: str, expires: str | None) -> Roster:
    """`members` are ID=PATH pairs (PATH: an institution's ledger.pub, or the ledger-dir holding it)."""
    if Path(out).exists():
        raise FedtuneError(f"{out} already exists; a roster is replaced on purpose only: remove it first")
    keys: dict[str, bytes] = {}
    for item in members:
        institution, sep, path = item.partition("=")
        if not sep or not INSTITUTION_ID.fullmatch(institution):
            raise FedtuneError(f"--member {item!r}: write ID=PATH, e.g. --member hospital-a=keys/hospital-a.pub "
                               f"(ID: the institution's client-id, one word)")
        if institution in keys:
            raise FedtuneError(f"--member {institution} is given twice")
        file = Path(path) / PUBLIC_KEY_FILE if Path(path).is_dir() else Path(path)
        keys[institution] = public_key_file(file)
    if len(keys) < 2:
        raise FedtuneError("a roster needs at least two members (--member ID=PATH, repeated)")
    try:
        until = dt.date.fromisoformat(expires) if expires else dt.date.today() + dt.timedelta(days=DEFAULT_DAYS)
    except ValueError:
        raise FedtuneError(f"--expires {expires!r} is not a date; write YYYY-MM-DD") from None
    if until <= dt.date.today():
        raise FedtuneError(f"--expires {until.isoformat()} is not in the future")
    roster = Roster.of_members(keys, federation=federation, expires=until)
    roster.write(Path(out))
    return roster


def check_roster(*, path: Path, institution: str | None, key: Path | None) -> Roster:
    """Load and check a roster; with --institution and --key, that it lists this node with its key."""
    roster = Roster.load(path)
    if institution is not None:
        if key is None:
            raise FedtuneError("--institution needs --key (this node's ledger.pub, or its ledger-dir)")
        key = Path(key) / PUBLIC_KEY_FILE if Path(key).is_dir() else Path(key)
        problem = roster.problem_for(institution=institution, own_key=public_key_file(key))
        if problem:
            raise FedtuneError(problem)
    elif dt.date.today() > roster.expires:
        raise FedtuneError(roster.problem_for(institution="", own_key=b"") or "expired")
    return roster
