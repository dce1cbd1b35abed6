"""Debugging, proven over DAP: each launch.json target driven through `python -m debugpy.adapter` as VS Code
drives it, on the tiny model. Plus the SD35_BREAK grammar, the harness without a debugger, the tensor
summaries and SD35_DEBUGPY's address policy."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from dap import ROOT, VSCODE_ONLY, DapClient, launch_config
from helpers import load_jsonc, run_cli

from sd35 import debug
from sd35.errors import InputError

SCHEMAS = ROOT.parent / "shared" / "schemas"


# --- launch.json itself ---------------------------------------------------------------------------------

def test_launch_json_targets_and_attributes():
    doc = load_jsonc(ROOT / ".vscode" / "launch.json")
    configs = {c["name"]: c for c in doc["configurations"]}
    for name in ("Generate: stop in MMDiT block", "Generate: stop in joint attention", "Generate: stop in scheduler.step",
                 "Generate: run with my breakpoints", "Serve: debug the service", "Attach: running service",
                 "Attach: service in container", "Pytest: debug this test"):
        assert name in configs, name
    for c in configs.values():
        assert c["type"] == "debugpy" and c["justMyCode"] is False and c["subProcess"] is False, c["name"]
        if c["request"] == "launch":
            assert c["env"]["TORCHDYNAMO_DISABLE"] == "1", c["name"]
        if c["request"] == "launch" and c.get("module") == "sd35":
            assert c["envFile"] == "${workspaceFolder}/.env"
    # Attach targets listen (VS Code waits, the process connects out): no debuggee port for other accounts.
    for name in ("Attach: running service", "Attach: service in container"):
        assert configs[name]["listen"] == {"host": "127.0.0.1", "port": 5678} and "connect" not in configs[name]
    assert configs["Attach: service in container"]["pathMappings"]
    assert configs["Pytest: debug this test"]["purpose"] == ["debug-test"]
    assert "--reload" not in json.dumps(configs["Serve: debug the service"])


@pytest.mark.skipif(not (SCHEMAS / "debugpy.configurationAttributes.json").is_file(),
                    reason="debugpy's launch attributes live in ../shared/schemas (not in this checkout)")
def test_launch_json_attributes_are_debugpys():
    attrs = json.loads((SCHEMAS / "debugpy.configurationAttributes.json").read_text())["configurationAttributes"]
    for c in load_jsonc(ROOT / ".vscode" / "launch.json")["configurations"]:
        allowed = set(attrs[c["request"]]["properties"]) | VSCODE_ONLY
        assert set(c) <= allowed, (c["name"], set(c) - allowed)


# --- the grammar and the harness without a debugger -------------------------------------------------------

def test_break_grammar():
    assert [str(b) for b in debug.parse("block.12@5, scheduler@5,attn.3,transformer@2,vae.decode")] == [
        "block.12@5", "scheduler@5", "attn.3@0", "transformer@2", "vae.decode"]
    assert debug.parse("") == [] and debug.parse(None) == []
    for bad in ("blok.1", "block", "block.x@1", "scheduler@-1", "attn.1@2@3", "vae"):
        with pytest.raises(InputError) as e:
            debug.parse(bad)
        assert "TARGET[@STEP]" in e.value.cause and "block.12@5" in e.value.fix


@pytest.mark.parametrize("spec,message", [("block.4@0", "blocks 0…3"), ("attn.99", "blocks 0…3"),
                                          ("scheduler@9", "steps 0…3")])
def test_out_of_range_breaks_fail_before_generating(tmp_path, spec, message):
    r = run_cli("generate", "--break", spec, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_without_debugger_matches_are_logged_and_the_run_goes_on(tmp_path):
    r = run_cli("generate", "--break", "block.1@2,attn.0@1,scheduler@3,vae.decode", "--seed", "0",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    for label in ("block.1@2 matched", "attn.0@1 matched", "scheduler@3 matched", "vae.decode matched"):
        assert label in r.stderr
    assert "hidden_states=Tensor[2×64×64] bfloat16" in r.stderr and "nan 0 inf 0" in r.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_harness_wraps_only_what_is_named_and_disarms(tiny_cache):
    from sd35.load import load
    from sd35.settings import Settings

    pipe = load(Settings(device="cpu")).pipe
    assert debug.arm(pipe, []) is None  # nothing hooked when SD35_BREAK is empty
    block1 = pipe.transformer.transformer_blocks[1]
    h = debug.arm(pipe, debug.parse("block.1@2,attn.0@1"))
    assert "forward" in vars(block1) and "forward" not in vars(pipe.transformer.transformer_blocks[0])
    attn0 = pipe.transformer.transformer_blocks[0].attn
    assert type(attn0.processor).__name__ == "ProcessorProxy"
    assert type(pipe.transformer.transformer_blocks[0].attn2.processor).__name__ == "JointAttnProcessor2_0"
    # diffusers reads the processor's signature to route kwargs: ours keeps the parameters it needs
    params = set(inspect.signature(attn0.processor.__call__).parameters)
    assert {"attn", "hidden_states", "encoder_hidden_states", "attention_mask"} <= params
    h.disarm()
    assert "forward" not in vars(block1) and type(attn0.processor).__name__ == "JointAttnProcessor2_0"


def test_tensor_summary_never_prints_values_and_handles_fp8():
    import torch

    t = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    s = debug.tensor_summary(t)
    assert s.startswith("Tensor[2×2] float32 cpu") and "min -2 max 1" in s and "nan 1 inf 1" in s
    f8 = torch.randn(4, 4).to(torch.float8_e4m3fn)
    assert "float8_e4m3fn" in debug.tensor_summary(f8) and "std" in debug.tensor_summary(f8)
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.bfloat16)
    quantize_(lin, Float8WeightOnlyConfig())
    qs = debug.tensor_summary(lin[0].weight)
    assert "Float8Tensor" in qs and "float8_e4m3fn data" in qs and "mean" in qs
    assert "meta" in debug.tensor_summary(torch.empty(3, device="meta"))


def test_debugpy_address_policy():
    from sd35 import attach

    assert attach.parse("127.0.0.1:5678") == ("connect", "127.0.0.1", 5678)  # plain HOST:PORT connects out
    assert attach.parse("connect:[::1]:5679") == ("connect", "::1", 5679)
    assert attach.parse("listen:127.0.0.1:5678") == ("listen", "127.0.0.1", 5678)
    with pytest.raises(InputError, match="non-loopback"):
        debug.listen("0.0.0.0:5678")
    with pytest.raises(InputError, match="non-loopback"):
        debug.listen("listen:0.0.0.0:5678", allow_listen=True)
    with pytest.raises(InputError, match="HOST:PORT"):
        debug.listen("localhost")
    # listening only on explicit opt-in
    with pytest.raises(InputError, match="SD35_DEBUGPY_ALLOW_LISTEN=1"):
        debug.listen("listen:127.0.0.1:5678")
    assert debug.listen(None) is None


def test_debugpy_connect_refuses_a_port_nobody_of_ours_listens_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nobody there
        with pytest.raises(InputError, match="no debugger is listening"):
            debug.listen(f"127.0.0.1:{port}")


def test_cli_refuses_remote_debugpy(tmp_path):
    r = run_cli("generate", "--out", str(tmp_path / "o"), env={"SD35_DEBUGPY": "listen:0.0.0.0:5678"})
    assert r.returncode == 2 and "executes code for anyone" in r.stderr and "SD35_DEBUGPY_ALLOW_REMOTE" in r.stderr
    r = run_cli("generate", "--out", str(tmp_path / "o"), env={"SD35_DEBUGPY": "listen:127.0.0.1:5678"})
    assert r.returncode == 2 and "SD35_DEBUGPY_ALLOW_LISTEN=1" in r.stderr and not (tmp_path / "o").exists()


# --- over DAP ----------------------------------------------------------------------------------------------

@pytest.fixture
def dap(tmp_path):
    client = DapClient(log_dir=tmp_path / "debugpy-logs")
    yield client
    client.close()


def _generate_config(name: str, tmp_path: Path, inputs: dict | None = None, **overrides) -> dict:
    config = launch_config(name, inputs)
    config["console"] = "internalConsole"  # the test client has no terminal to run it in
    config["args"] = [*config["args"], "--out", str(tmp_path / "out")]
    config["env"] = {**config["env"], "SD35_CACHE_DIR": os.environ["SD35_CACHE_DIR"], "SD35_DEVICE": "cpu"}
    config["python"] = sys.executable
    config.update(overrides)
    return config


TARGETS = [
    # (launch.json target, expected label, Step Into lands in (function, file ending), a local to inspect there)
    ("Generate: stop in MMDiT block", "block.1@2", ("forward", "diffusers/models/attention.py"), "hidden_states"),
    ("Generate: stop in joint attention", "attn.1@2", ("__call__", "diffusers/models/attention_processor.py"),
     "encoder_hidden_states"),
    ("Generate: stop in scheduler.step", "scheduler@2",
     ("step", "diffusers/schedulers/scheduling_flow_match_euler_discrete.py"), "model_output"),
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,label,landing,local", TARGETS, ids=[t[0] for t in TARGETS])
def test_generate_target_stops_and_steps_into_diffusers(dap, tmp_path, name, label, landing, local):
    dap.start("launch", _generate_config(name, tmp_path))
    tid, frames = dap.stopped()
    top = frames[0]
    assert top["name"] == "_stop_here" and top["source"]["path"].endswith("sd35/debug.py"), top
    variables = dap.locals(top["id"])
    assert {"where", "module", "inputs", "summary", "call"} <= set(variables), sorted(variables)
    assert label in variables["where"]["value"]
    # the summary of each tensor, readable as a local
    summary = dap.children(variables["summary"]["variablesReference"])
    assert any("Tensor[" in v["value"] and "std" in v["value"] for v in summary.values()), summary
    # one Step Into lands in the library's own function
    dap.request("stepIn", {"threadId": tid})
    tid, frames = dap.stopped()
    func, path_end = landing
    assert frames[0]["name"] == func and frames[0]["source"]["path"].endswith(path_end), frames[0]
    inside = dap.locals(frames[0]["id"])
    assert local in inside, sorted(inside)
    # the pydevd extension shows tensors as summaries, not values
    value = inside[local]["value"]
    assert value.startswith("Tensor[") and " · min " in value and "nan 0 inf 0" in value, value
    if local == "hidden_states":
        assert value.startswith("Tensor[2×64×64] bfloat16 cpu")  # CFG batch × 8×8 patches × hidden 64
    dap.request("continue", {"threadId": tid})
    dap.wait_event("terminated", timeout=180)
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def _sd3_forward_line() -> tuple[str, int]:
    import diffusers.models.transformers.transformer_sd3 as m

    path = m.__file__
    lines = Path(path).read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if "class SD3Transformer2DModel" in text)
    n = next(i for i in range(start, len(lines)) if "hidden_states = self.pos_embed(hidden_states)" in lines[i])
    return path, n + 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_breakpoint_in_diffusers_is_hit_with_justmycode_false(dap, tmp_path):
    path, line = _sd3_forward_line()
    answers = dap.start("launch", _generate_config("Generate: run with my breakpoints", tmp_path), {path: [line]})
    assert answers[0]["verified"] is True, answers
    tid, frames = dap.stopped()
    assert frames[0]["source"]["path"] == path and frames[0]["line"] == line and frames[0]["name"] == "forward"
    assert "hidden_states" in dap.locals(frames[0]["id"])
    dap.request("continue", {"threadId": tid})
    tid, frames = dap.stopped()  # the next denoising step hits it again
    assert frames[0]["line"] == line
    dap.request("disconnect", {"terminateDebuggee": True})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_breakpoint_in_diffusers_is_not_hit_with_justmycode_true(dap, tmp_path):
    path, line = _sd3_forward_line()
    answers = dap.start("launch", _generate_config("Generate: run with my breakpoints", tmp_path, justMyCode=True),
                        {path: [line]})
    assert answers[0]["verified"] is False and "justMyCode" in answers[0]["message"]  # the grey breakpoint
    ev = dap.wait_event(("stopped", "terminated"), timeout=240)
    assert ev["event"] == "terminated", "a breakpoint in site-packages was hit with justMyCode=true"
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # the run went through


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attach_to_running_service_and_hit_a_breakpoint_during_a_request(tmp_path):
    import subprocess

    api, dbg = _free_port(), _free_port()
    # SD35_WARMUP=0: attached from the start, the warm-up generation would stop at the breakpoint first.
    env = {**os.environ, "SD35_DEBUGPY": f"127.0.0.1:{dbg}", "SD35_DEVICE": "cpu", "TORCHDYNAMO_DISABLE": "1",
           "SD35_WARMUP": "0", "SD35_ALLOW_NO_KEY": "1"}
    exe = Path(sys.executable).with_name("sd35")
    procs = []

    def start_service():
        # VS Code's adapter listens first (the attach request with "listen"); the service then connects out.
        wait_listening(dbg)
        procs.append(subprocess.Popen([str(exe), "serve", "--port", str(api)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    dap = DapClient(log_dir=tmp_path / "debugpy-logs")
    try:
        config = launch_config("Attach: running service")
        config["listen"]["port"] = dbg
        path, line = _sd3_forward_line()
        assert dap.start("attach", config, {path: [line]}, after_request=start_service)[0]["verified"] is True
        proc = procs[0]
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api}/readyz", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        result = {}

        def request():
            body = json.dumps({"prompt": "attach", "size": "128x128", "steps": 2}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{api}/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                result["status"] = r.status

        t = threading.Thread(target=request)
        t.start()
        tid, frames = dap.stopped()
        assert frames[0]["source"]["path"] == path and frames[0]["line"] == line
        assert any(f["name"] == "_process" for f in frames)  # inside the service's GPU worker
        # a breakpoint stops every thread, the HTTP loop too (docs/debugging.md says so): /healthz is silent
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{api}/healthz", timeout=3)
        dap.request("setBreakpoints", {"source": {"path": path}, "breakpoints": []})
        dap.request("continue", {"threadId": tid})
        t.join(timeout=120)
        assert result.get("status") == 200
        dap.request("disconnect", {"terminateDebuggee": False})  # VS Code's "Disconnect" on an attach
        dap.debuggee_pid = None  # so that close() does not kill it
        time.sleep(1)
        os.killpg(dap.proc.pid, signal.SIGKILL)  # VS Code closed: the adapter (and its listener) go away
        dap.proc.wait(timeout=30)
        time.sleep(1)
        assert proc.poll() is None  # detaching leaves the service running
    finally:
        dap.close()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001
                proc.kill()


def wait_listening(port: int, timeout: float = 60) -> None:
    """Until something of ours listens on 127.0.0.1:port (read from /proc/net/tcp: connecting would count)."""
    from sd35 import listeners

    deadline = time.time() + timeout
    while listeners.owner("127.0.0.1", port) != os.getuid():
        assert time.time() < deadline, f"nothing listens on 127.0.0.1:{port}"
        time.sleep(0.1)
