"""What another local account on a site's machine tries, run as that account by test_site_guard_e2e.py.

    python site_intruder.py RUNTIME_ADDRESS [read:PATH | list:PATH]...

asks the site's Runtime API for a task with Flower's own SuperExec client (without the site's
secret), reads each `read:` file and lists each `list:` folder, and prints one JSON object: each
attempt and how it ended ("done", or the exception's type and message).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

TAKE_A_TASK = "take a task"


def outcome(attempt: Callable[[], object]) -> str:
    try:
        attempt()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "done"


def take_a_task(address: str) -> None:
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))


def file_attempt(argument: str) -> Callable[[], object]:
    action, path = argument.split(":", 1)
    return {"read": Path(path).read_bytes, "list": lambda: os.listdir(path)}[action]


def main(address: str, arguments: list[str]) -> None:
    outcomes = {TAKE_A_TASK: outcome(lambda: take_a_task(address))}
    outcomes.update({argument: outcome(file_attempt(argument)) for argument in arguments})
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
