"""Start a program with its secrets in its environment, fetched from the pipeline's secret broker.

supervisord runs ``python -m sipbridge.secretenv --socket RUN_DIR/secrets.sock --program NAME -- COMMAND...``:
this process asks the broker (``sipbridge.supervise.SecretBroker``, in the process that started supervisord)
for NAME's secrets, then replaces itself with COMMAND, the secrets added to its environment. The values never
appear in a file, a command line, supervisord's environment or another program's; errors never print them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

REQUEST_TIMEOUT_S = 10.0
MAX_REPLY_BYTES = 1 << 20


def fetch(socket_path: str, program: str) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT_S)
        sock.connect(socket_path)
        sock.sendall(json.dumps({"program": program}).encode())
        chunks = []
        received = 0
        while received < MAX_REPLY_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
    reply = json.loads(b"".join(chunks).decode())
    if not isinstance(reply, dict) or "env" not in reply:
        raise RuntimeError(str(reply.get("error", "no answer")) if isinstance(reply, dict) else "bad answer")
    env = reply["env"]
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise RuntimeError("bad answer")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sipbridge.secretenv", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="The secret broker's unix socket.")
    parser.add_argument("--program", required=True, help="The supervisord program this process is.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    try:
        secrets = fetch(args.socket, args.program)
    except (OSError, ValueError, RuntimeError) as exc:
        # The message says why, never what: the reply that failed may not be printed.
        print(f"[{args.program}] cannot get its secrets from {args.socket}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    os.execvpe(command[0], command, {**os.environ, **secrets})
    return 127  # not reached: execvpe raises on failure


if __name__ == "__main__":
    raise SystemExit(main())
