"""What a node remembers between the messages of one SecAgg+ round (in the Flower context's state).

Stands in for Flower 1.41's `SecAggPlusState`, with what fedtune adds: the round and run the
signatures bind to, each peer's institution, the survivor list this node signed, and whether it
contributed an update (the replay rule needs the round it was paid for).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.secaggplus_constants import Stage

STATE_RECORD = "fedtune-secagg"


@dataclass
class SecAggState:
    stage: str = Stage.UNMASK  # the last stage answered; a round starts again at setup
    run_id: str = ""  # what the signatures bind to (the coordinator's run id)
    flower_run_id: str = ""  # the Flower run the session runs in (a uint64 does not fit a record int)
    server_round: int = 0
    node_id: int = 0
    sample_num: int = 0
    share_num: int = 0
    threshold: int = 0
    clipping_range: float = 0.0
    target_range: int = 0
    mod_range: int = 0
    max_weight: float = 0.0
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    rd_seed: bytes = b""  # the self-mask seed
    peers: dict[int, str] = field(default_factory=dict)  # node id -> institution (the key list)
    pk1s: dict[int, bytes] = field(default_factory=dict)  # node id -> its pairwise-mask public key
    ss2: dict[int, bytes] = field(default_factory=dict)  # node id -> key encrypting the shares to it
    seed_shares: dict[int, bytes] = field(default_factory=dict)  # node id -> its self-mask seed share
    sk1_shares: dict[int, bytes] = field(default_factory=dict)  # node id -> its pairwise-key share
    session: str = ""  # digest of the key list accepted at share-keys (statements.session_digest)
    survivors: list[int] = field(default_factory=list)  # the list this node signed
    contributed: bool = False
    fit_run_id: str = ""  # the run and round the update was trained for, as the client's ledger names them
    fit_round: int = 0

    @classmethod
    def load(cls, context: Context) -> SecAggState:
        record = context.state.config_records.get(STATE_RECORD)
        if record is None:
            return cls()
        values = {}
        for spec in dataclasses.fields(cls):
            if spec.default_factory is dict:  # type: ignore[comparison-overlap]
                values[spec.name] = dict(zip(record[f"{spec.name}:K"], record[f"{spec.name}:V"], strict=True))
            elif spec.name in record:
                value = record[spec.name]
                values[spec.name] = list(value) if isinstance(value, list) else value
        return cls(**values)

    def save(self, context: Context) -> None:
        record: dict = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, dict):
                record[f"{spec.name}:K"], record[f"{spec.name}:V"] = list(value), list(value.values())
            else:
                record[spec.name] = value
        context.state.config_records[STATE_RECORD] = ConfigRecord(record)
