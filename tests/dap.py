"""A small Debug Adapter Protocol client that drives `python -m debugpy.adapter` the way VS Code does.

It reads `.vscode/launch.json` (JSON with comments), resolves `${workspaceFolder}`, `${input:…}` and
`envFile` as VS Code and its Python extension do, then speaks DAP over the adapter's stdin/stdout:
initialize → launch/attach → (initialized) setBreakpoints → configurationDone → stopped/stepIn/… Every
wait is bounded; `close()` kills the adapter and the debuggee whatever state they are in.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import load_jsonc

ROOT = Path(__file__).resolve().parents[1]
VSCODE_ONLY = {"name", "type", "request", "presentation", "preLaunchTask", "postDebugTask", "envFile",
               "internalConsoleOptions", "serverReadyAction", "purpose"}


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", line)
            if m and not line.lstrip().startswith("#"):
                env[m.group(1)] = m.group(2).strip("'\"")
    return env


def launch_config(name: str, inputs: dict[str, str] | None = None, workspace: Path = ROOT) -> dict:
    """The named configuration from launch.json, resolved as VS Code would before sending it."""
    doc = load_jsonc(workspace / ".vscode" / "launch.json")
    config = next(c for c in doc["configurations"] if c["name"] == name)
    defaults = {i["id"]: i.get("default", "") for i in doc.get("inputs", [])}
    values = {**defaults, **(inputs or {})}

    def resolve(v):
        if isinstance(v, str):
            v = v.replace("${workspaceFolder}", str(workspace))
            return re.sub(r"\$\{input:([^}]+)\}", lambda m: values[m.group(1)], v)
        if isinstance(v, list):
            return [resolve(x) for x in v]
        if isinstance(v, dict):
            return {k: resolve(x) for k, x in v.items()}
        return v

    config = resolve(config)
    if "envFile" in config:  # the Python extension merges envFile under env
        config["env"] = {**read_env_file(Path(config.pop("envFile"))), **config.get("env", {})}
    return config


class DapError(AssertionError):
    pass


class DapClient:
    """Talks DAP to a `python -m debugpy.adapter` it starts (launch, as VS Code does for launch targets), or,
    with `connect=(host, port)`, to the adapter that `debugpy.listen` runs in a debuggee (VS Code's attach)."""

    def __init__(self, log_dir: Path | None = None, connect: tuple[str, int] | None = None):
        self.sock = None
        self.proc = None
        if connect:
            import socket

            self.sock = socket.create_connection(connect, timeout=30)
            self.sock.settimeout(None)
            self._in, self._out = self.sock.makefile("rb"), self.sock.makefile("wb")
        else:
            env = {**os.environ}
            if log_dir:
                env["DEBUGPY_LOG_DIR"] = str(log_dir)
            self.proc = subprocess.Popen([sys.executable, "-m", "debugpy.adapter"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                         start_new_session=True)
            self._in, self._out = self.proc.stdout, self.proc.stdin
        self.seq = 0
        self.responses: dict[int, dict] = {}
        self.events: queue.Queue = queue.Queue()
        self.seen_events: list[dict] = []
        self.debuggee_pid: int | None = None
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # --- wire -------------------------------------------------------------------------------------------
    def _read(self):
        stream = self._in
        while True:
            headers = {}
            while True:
                line = stream.readline()
                if not line:
                    return
                line = line.decode().strip()
                if not line:
                    break
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            try:
                body = json.loads(stream.read(int(headers["content-length"])))
            except (OSError, ValueError):
                return
            if body["type"] == "response":
                with self._cv:
                    self.responses[body["request_seq"]] = body
                    self._cv.notify_all()
            elif body["type"] == "event":
                if body["event"] == "process":
                    self.debuggee_pid = body["body"].get("systemProcessId")
                self.seen_events.append(body)
                self.events.put(body)
            elif body["type"] == "request":  # reverse requests (runInTerminal) are not supported here
                self._send({"type": "response", "request_seq": body["seq"], "success": False,
                            "command": body["command"], "message": "not supported by the test client"})

    def _send(self, msg: dict):
        data = json.dumps(msg).encode()
        self._out.write(b"Content-Length: %d\r\n\r\n" % len(data) + data)
        self._out.flush()

    def send(self, command: str, arguments: dict | None = None) -> int:
        self.seq += 1
        self._send({"seq": self.seq, "type": "request", "command": command, "arguments": arguments or {}})
        return self.seq

    def response(self, seq: int, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        with self._cv:
            while seq not in self.responses:
                left = deadline - time.time()
                if left <= 0:
                    raise DapError(f"no response to request {seq} within {timeout}s")
                self._cv.wait(left)
            r = self.responses.pop(seq)
        if not r["success"]:
            raise DapError(f"{r['command']} failed: {r.get('message')} {r.get('body')}")
        return r.get("body") or {}

    def request(self, command: str, arguments: dict | None = None, timeout: float = 60) -> dict:
        return self.response(self.send(command, arguments), timeout)

    def wait_event(self, name: str | tuple, timeout: float = 120) -> dict:
        names = (name,) if isinstance(name, str) else name
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise DapError(f"no {names} event within {timeout}s; saw: "
                               f"{[e['event'] for e in self.seen_events][-20:]}; output: {self.output()[-3000:]}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["event"] in names:
                return ev

    def output(self) -> str:
        return "".join(e["body"].get("output", "") for e in self.seen_events if e["event"] == "output")

    # --- sessions ---------------------------------------------------------------------------------------
    def initialize(self):
        return self.request("initialize", {"clientID": "vscode", "clientName": "sd35-tests", "adapterID": "debugpy",
                                           "pathFormat": "path", "linesStartAt1": True, "columnsStartAt1": True,
                                           "supportsVariableType": True, "supportsRunInTerminalRequest": False})

    def start(self, request: str, config: dict, breakpoints: dict[str, list[int]] | None = None,
              after_request=None) -> list[dict]:
        """launch/attach, answer `initialized` with breakpoints + configurationDone; returns the adapter's
        answer for each breakpoint (verified or not, with its message). `after_request` runs once the
        launch/attach request is sent (an attach with "listen" waits for the debuggee to connect: start it there)."""
        self.initialize()
        seq = self.send(request, config)
        if after_request is not None:
            after_request()
        self.wait_event("initialized", timeout=120)
        answers = []
        for path, lines in (breakpoints or {}).items():
            body = self.request("setBreakpoints", {"source": {"path": path},
                                                   "breakpoints": [{"line": n} for n in lines]})
            answers.extend(body["breakpoints"])
        self.request("setExceptionBreakpoints", {"filters": []})
        self.request("configurationDone")
        self.response(seq, timeout=120)
        return answers

    def stopped(self, timeout: float = 180) -> tuple[int, list[dict]]:
        ev = self.wait_event("stopped", timeout)
        tid = ev["body"]["threadId"]
        frames = self.request("stackTrace", {"threadId": tid, "levels": 20})["stackFrames"]
        return tid, frames

    def locals(self, frame_id: int) -> dict[str, dict]:
        scopes = self.request("scopes", {"frameId": frame_id})["scopes"]
        ref = next(s for s in scopes if s["name"].lower().startswith("locals"))["variablesReference"]
        out = {}
        for v in self.request("variables", {"variablesReference": ref})["variables"]:
            if v["name"] in ("function variables", "class variables", "special variables", "protected variables"):
                out.update(self.children(v["variablesReference"]))  # pydevd's presentation groups
            else:
                out[v["name"]] = v
        return out

    def children(self, variables_reference: int) -> dict[str, dict]:
        return {v["name"]: v for v in self.request("variables", {"variablesReference": variables_reference})["variables"]}

    def close(self):
        if self.sock is not None:  # attached: leave the debuggee running, just hang up
            try:
                self.send("disconnect", {"terminateDebuggee": False})
                time.sleep(0.5)
            except OSError:
                pass
            for f in (self._in, self._out, self.sock):
                try:
                    f.close()
                except OSError:
                    pass
            return
        try:
            if self.proc.poll() is None:
                try:
                    self.send("disconnect", {"terminateDebuggee": True})
                    self.proc.stdin.close()  # end of the session: the adapter exits once its client is gone
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for pid in (self.debuggee_pid,):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    self.proc.kill()
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
