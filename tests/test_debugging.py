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
from helpers import free_port, load_jsonc, run_cli, sd35_cmd

from sd35.debugging import breakpoints, summaries
from sd35.errors import InputError

SCHEMAS = ROOT.parent / "shared" / "schemas"


# --- launch.json itself ---------------------------------------------------------------------------------

def test_launch_json_targets_and_attributes():
    doc = load_jsonc(ROOT / ".vscode" / "launch.json")
    configs = {c["name"]: c for c in doc["configurations"]}
    for name in ("Generate: stop in MMDiT block", "Generate: stop in joint attention", "Generate: stop in scheduler.step",
                 "Generate: run with my breakpoints", "Edit: stop in MMDiT block", "Serve: debug the service", "Attach: running service",
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
    assert [str(b) for b in breakpoints.parse("block.12@5, scheduler@5,attn.3,transformer@2,vae.decode")] == [
        "block.12@5", "scheduler@5", "attn.3@0", "transformer@2", "vae.decode"]
    assert breakpoints.parse("") == [] and breakpoints.parse(None) == []
    for bad in ("blok.1", "block", "block.x@1", "scheduler@-1", "attn.1@2@3", "vae"):
        with pytest.raises(InputError) as e:
            breakpoints.parse(bad)
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
    from sd35.weights.load import load
    from sd35.settings import Settings

    pipe = load(Settings(device="cpu")).pipe
    assert breakpoints.arm(pipe, []) is None  # nothing hooked when SD35_BREAK is empty
    block1 = pipe.transformer.transformer_blocks[1]
    h = breakpoints.arm(pipe, breakpoints.parse("block.1@2,attn.0@1"))
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
    s = summaries.tensor_summary(t)
    assert s.startswith("Tensor[2×2] float32 cpu") and "min -2 max 1" in s and "nan 1 inf 1" in s
    f8 = torch.randn(4, 4).to(torch.float8_e4m3fn)
    assert "float8_e4m3fn" in summaries.tensor_summary(f8) and "std" in summaries.tensor_summary(f8)
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    lin = torch.nn.Sequential(torch.nn.Linear(32, 16)).to(torch.bfloat16)
    quantize_(lin, Float8WeightOnlyConfig())
    qs = summaries.tensor_summary(lin[0].weight)
    assert "Float8Tensor" in qs and "float8_e4m3fn data" in qs and "mean" in qs
    assert "meta" in summaries.tensor_summary(torch.empty(3, device="meta"))


def test_debugpy_address_policy():
    from sd35.debugging import attach

    assert attach.parse("127.0.0.1:5678") == ("connect", "127.0.0.1", 5678)  # plain HOST:PORT connects out
    assert attach.parse("connect:[::1]:5679") == ("connect", "::1", 5679)
    assert attach.parse("listen:127.0.0.1:5678") == ("listen", "127.0.0.1", 5678)
    with pytest.raises(InputError, match="non-loopback"):
        breakpoints.listen("0.0.0.0:5678")
    with pytest.raises(InputError, match="non-loopback"):
        breakpoints.listen("listen:0.0.0.0:5678", allow_listen=True)
    with pytest.raises(InputError, match="HOST:PORT"):
        breakpoints.listen("localhost")
    # listening only on explicit opt-in
    with pytest.raises(InputError, match="SD35_DEBUGPY_ALLOW_LISTEN=1"):
        breakpoints.listen("listen:127.0.0.1:5678")
    assert breakpoints.listen(None) is None


def test_debugpy_connect_refuses_a_port_nobody_of_ours_listens_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nobody there
        with pytest.raises(InputError, match="no debugger is listening"):
            breakpoints.listen(f"127.0.0.1:{port}")


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
    assert top["name"] == "_stop_here" and top["source"]["path"].endswith("sd35/debugging/breakpoints.py"), top
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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_edit_target_stops_inside_the_mmdit_during_an_edit(dap, tmp_path):
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.new("RGB", (100, 80), (200, 40, 40)).save(picture)
    dap.start("launch", _generate_config("Edit: stop in MMDiT block", tmp_path, {"editImage": str(picture)}))
    tid, frames = dap.stopped()
    variables = dap.locals(frames[0]["id"])
    assert "block.1@2" in variables["where"]["value"]
    dap.request("stepIn", {"threadId": tid})
    tid, frames = dap.stopped()
    assert frames[0]["name"] == "forward" and frames[0]["source"]["path"].endswith("diffusers/models/attention.py")
    assert any(f["name"] == "__call__" and "stable_diffusion_3_img2img" in f["source"].get("path", "")
               for f in dap.request("stackTrace", {"threadId": tid, "levels": 80})["stackFrames"]), \
        "not inside the img2img pipeline"
    dap.request("continue", {"threadId": tid})
    dap.wait_event("terminated", timeout=180)
    record = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert record["parameters"]["edit"]["mode"] == "img2img" and record["parameters"]["width"] == 96


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attach_to_running_service_and_hit_a_breakpoint_during_a_request(tmp_path):
    import subprocess

    api, dbg = free_port(), free_port()
    # SD35_WARMUP=0: attached from the start, the warm-up generation would stop at the breakpoint first.
    env = {**os.environ, "SD35_DEBUGPY": f"127.0.0.1:{dbg}", "SD35_DEVICE": "cpu", "TORCHDYNAMO_DISABLE": "1",
           "SD35_WARMUP": "0", "SD35_ALLOW_NO_KEY": "1"}
    procs = []

    def start_service():
        # VS Code's adapter listens first (the attach request with "listen"); the service then connects out.
        wait_listening(dbg)
        procs.append(subprocess.Popen(sd35_cmd("serve", "--port", str(api)), env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    dap = DapClient(log_dir=tmp_path / "debugpy-logs")
    try:
        # The service runs from this checkout (the Remote-SSH case): the path mapping is the identity.
        config = launch_config("Attach: running service", {"serverRoot": str(ROOT)})
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
    from sd35 import net

    deadline = time.time() + timeout
    while net.owner("127.0.0.1", port) != os.getuid():
        assert time.time() < deadline, f"nothing listens on 127.0.0.1:{port}"
        time.sleep(0.1)


# --- issue 17: summaries of nested tensors, NaN watch, dump, bf16 comparison ----------------------------------

def test_launch_json_service_skips_warmup_and_attach_targets_map_paths():
    configs = {c["name"]: c for c in load_jsonc(ROOT / ".vscode" / "launch.json")["configurations"]}
    assert configs["Serve: debug the service"]["env"]["SD35_WARMUP"] == "0"
    for c in configs.values():
        if c["request"] == "attach":
            assert c["pathMappings"] and c["pathMappings"][0]["localRoot"] == "${workspaceFolder}", c["name"]
    resolved = launch_config("Attach: running service", {"serverRoot": "/srv/x"})["pathMappings"][0]
    assert resolved == {"localRoot": str(ROOT), "remoteRoot": "/srv/x"}


def test_break_grammar_nan():
    assert breakpoints.parse("nan") == [breakpoints.Break("nan", None, 0)]
    assert [str(b) for b in breakpoints.parse("nan@3,block.1@2")] == ["nan@3", "block.1@2"]
    for bad in ("nan.1", "nans", "nan@x"):
        with pytest.raises(InputError) as e:
            breakpoints.parse(bad)
        assert "nan@5" in e.value.fix and "| nan;" in e.value.fix


def test_large_tensor_summaries_are_sampled_and_cached_per_stop(monkeypatch):
    import torch

    t = torch.randn(2, 1024, 1536)  # 3.1 M elements > SAMPLE_ELEMENTS
    summaries.new_stop()
    s = summaries.tensor_summary(t)
    assert f"stats of {summaries.SAMPLE_ELEMENTS:,} sampled" in s and "in sample" in s and " std " in s
    assert "sampled" not in summaries.tensor_summary(torch.randn(64, 64))
    nc = summaries.tensor_summary(t.transpose(0, 2))  # not contiguous: a random gather, not a copy of it all
    assert nc.startswith("Tensor[1536×1024×2]") and "sampled" in nc
    calls = []
    real = summaries._tensor_summary
    monkeypatch.setattr(summaries, "_tensor_summary", lambda x: calls.append(1) or real(x))
    assert summaries.tensor_summary(t) == s and calls == []  # cached within the stop
    t.mul_(2)  # changed in place: recomputed
    assert summaries.tensor_summary(t) != s and len(calls) == 1
    summaries.tensor_summary(t)
    assert len(calls) == 1
    summaries.new_stop()  # a new stop: computed again
    summaries.tensor_summary(t)
    assert len(calls) == 2


def test_container_summaries_show_shapes_not_values():
    import torch

    inputs = {"hidden_states": torch.randn(2, 64, 64, dtype=torch.bfloat16), "temb": torch.randn(2, 64),
              "joint_attention_kwargs": None, "pair": (torch.zeros(3), 1)}
    s = summaries.container_summary(inputs)
    assert s.startswith("dict[4] {hidden_states: Tensor[2×64×64] bfloat16 cpu, temb: Tensor[2×64] float32 cpu")
    assert "pair: (Tensor[3] float32 cpu, 1)" in s and "tensor(" not in s and len(s) < 200
    assert summaries.container_summary((torch.ones(1),)) == "tuple[1] (Tensor[1] float32 cpu)"
    assert summaries.container_summary({"a": 1, "b": [2, 3]}) is None  # no tensors: the debugger's default display
    assert summaries.container_summary([0] * 10 + [torch.ones(2)] * 30).endswith("… 24 more]")


@pytest.fixture(scope="module")
def bf16_tiny(tiny_cache):
    from sd35.weights.load import load
    from sd35.settings import Settings

    return load(Settings(device="cpu", precision="bf16", cache_dir=tiny_cache))


@pytest.fixture(scope="module")
def fp8_tiny(tiny_cache):
    from sd35.weights.load import load
    from sd35.settings import Settings

    return load(Settings(device="cpu", precision="fp8-weight", cache_dir=tiny_cache))


def _request(steps=4):
    from sd35.inference import generate as gen

    return gen.GenerationRequest("a red cube", steps=steps, guidance=4.5, height=128, width=128, seed=0)


class _Records(list):
    def __enter__(self):
        import logging

        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.append(record.getMessage())
        logging.getLogger("sd35.debugging.breakpoints").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("sd35.debugging.breakpoints").removeHandler(self.handler)


@pytest.mark.parametrize("spec,plant,expected", [
    ("nan", "weight", "nan@0 transformer_blocks.2.attn.to_q"),  # a NaN weight: to_q, not its attn or block
    ("nan@1", "inf from step 2", "nan@2 transformer_blocks.2.attn.to_q"),  # watched from 1, appears at 2
    ("nan@2", "weight", "nan@2 pos_embed.proj"),  # watched from 2: the latents already hold NaN
])
def test_nan_watch_names_the_innermost_module_and_step_without_a_debugger(bf16_tiny, spec, plant, expected):
    import torch

    from sd35.inference import generate as gen

    pipe = bf16_tiny.pipe
    lin = pipe.transformer.transformer_blocks[2].attn.to_q
    saved = lin.weight.detach().clone()
    injected = None
    if plant == "weight":
        with torch.no_grad():
            lin.weight[0, 0] = float("nan")
    else:
        def inject(module, args, output):  # registered before the watcher's hook, so it runs first
            if pipe.scheduler.step_index == 2:
                output = output.clone()
                output[0, 0, 0] = float("inf")
                return output

        injected = lin.register_forward_hook(inject)
    h = breakpoints.arm(pipe, breakpoints.parse(spec))
    try:
        with _Records() as logged, np_quiet():
            gen.run(bf16_tiny, _request())
    finally:
        h.disarm()
        if injected:
            injected.remove()
        with torch.no_grad():
            lin.weight.copy_(saved)
    assert h.hits == [expected]  # once: the first (innermost) module, then the run goes on
    label, name = expected.split()
    (msg,) = [m for m in logged if "non-finite" in m]
    assert f"at {name} (" in msg and f"step {label.split('@')[1]}:" in msg
    if name.endswith("to_q"):
        assert "inputs: input=Tensor[2×64×64] bfloat16 cpu" in msg and "nan 0 inf 0" in msg.split("inputs:")[1]
        assert "already hold NaN" not in msg
    else:
        assert "already hold NaN/Inf" in msg
    assert all(not m._forward_hooks for m in pipe.transformer.modules())  # disarmed: no hook left


def np_quiet():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")  # the NaN image's cast to uint8

    class _C:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            ctx.__exit__(*exc)

    return _C()


def test_nan_watch_is_silent_when_all_is_finite(bf16_tiny):
    from sd35.inference import generate as gen

    h = breakpoints.arm(bf16_tiny.pipe, breakpoints.parse("nan"))
    n = sum(len(m._forward_hooks) for m in bf16_tiny.pipe.transformer.modules())
    try:
        gen.run(bf16_tiny, _request(steps=2))
    finally:
        h.disarm()
    names = h.watched_modules()
    assert h.hits == [] and n == len(names)
    assert {"", "transformer_blocks.0", "transformer_blocks.0.attn", "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.norm1", "transformer_blocks.0.attn.norm_q", "pos_embed.proj"} <= set(names)
    assert not any(n.endswith((".to_out.1", ".net.1", ".silu", ".act")) for n in names)  # dropout, activations


def test_stop_frame_tools_dump_and_compare_with_bf16(fp8_tiny, tmp_path, monkeypatch):
    """The real `_stop_here` frame, with a stand-in debugger that calls the tools as the Debug Console would."""
    import types

    from safetensors.torch import load_file

    from sd35.inference import generate as gen

    seen = {}

    def breakpoint():
        frame = sys._getframe(1)
        assert frame.f_code.co_name == "_stop_here"
        f = frame.f_locals
        seen["path"] = f["sd35_dump"]()
        assert f["fp8_vs_bf16"] == {}  # lazy: nothing computed until asked
        seen["cmp"] = f["compare_bf16"]()
        seen["same"] = f["fp8_vs_bf16"] is seen["cmp"]

    monkeypatch.setitem(sys.modules, "debugpy", types.SimpleNamespace(is_client_connected=lambda: True,
                                                                      breakpoint=breakpoint))
    h = breakpoints.arm(fp8_tiny.pipe, breakpoints.parse("block.1@2"), tmp_path / "out")
    try:
        gen.run(fp8_tiny, _request())
    finally:
        h.disarm()
    path = Path(seen["path"])
    assert path.parent == tmp_path / "out" / "debug" and path.name.endswith("block.1@2.safetensors")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["step"] == 2 and meta["where"] == "block.1@2" and meta["module"] == "transformer_blocks.1"
    assert meta["tensors"]["inputs.hidden_states"] == {"shape": [2, 64, 64], "dtype": "bfloat16", "device": "cpu"}
    tensors = load_file(path)
    assert set(tensors) == {"inputs.hidden_states", "inputs.encoder_hidden_states", "inputs.temb"}
    assert not list(path.parent.glob("*.tmp"))  # written atomically
    c = seen["cmp"]
    assert seen["same"] and c["module"] == "transformer_blocks.1" and c["fp8_linears"] > 0
    assert "reloaded from transformer/diffusion_pytorch_model.safetensors" in c["weights"]
    assert 0 < c["rel_err"] < 0.05 and 0.99 < c["cosine"] <= 1.0 + 1e-6, c
    assert set(c["per_output"]) == {"output.0", "output.1"}  # the block's (text, image) streams
    # the FP8 weights were put back
    assert type(fp8_tiny.pipe.transformer.transformer_blocks[1].attn.to_q.weight).__name__ == "Float8Tensor"


def test_compare_falls_back_to_dequantized_weights_and_says_so(fp8_tiny):
    from sd35.debugging import atstop

    attn = fp8_tiny.pipe.transformer.transformer_blocks[0].attn
    lin = attn.to_q
    x = __import__("torch").randn(2, 8, 64, dtype=__import__("torch").bfloat16)
    r = atstop.compare_bf16(lin, "transformer_blocks.0.attn.to_q", None, lin.forward, (x,), {})
    assert "dequantized" in r["weights"] and r["cosine"] > 0.999
    assert "no FP8 weights" in atstop.compare_bf16(fp8_tiny.pipe.transformer.proj_out, "proj_out", None,
                                                   None, (), {})["error"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fidelity_per_block_cli(tmp_path):
    r = run_cli("fidelity", "--per-block", "--json", "--steps", "2", "--precision", "fp8-weight")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["reference"] == "bf16" and doc["candidate"] == "fp8-weight" and doc["step"] == 1
    assert [b["block"] for b in doc["blocks"]] == [0, 1, 2, 3]
    assert set(doc["blocks"][0]) == {"block", "image_rel_err", "image_cosine", "text_rel_err", "text_cosine"}
    assert all(0 < b["image_rel_err"] < 0.1 and b["image_cosine"] > 0.99 for b in doc["blocks"])
    assert doc["blocks"][-1]["text_rel_err"] is None  # the last block emits no text stream
    r = run_cli("fidelity", "--per-block", "--steps", "2", "--precision", "fp8-weight")
    assert r.returncode == 0 and "image rel. err" in r.stdout and "worst block" in r.stdout
    r = run_cli("fidelity", "--per-block", "--precision", "bf16")
    assert r.returncode == 2 and "bf16 with itself" in r.stderr and "Traceback" not in r.stderr


# --- issue 17 over DAP ---------------------------------------------------------------------------------------

def _evaluate(dap, frame_id, expression):
    return dap.request("evaluate", {"expression": expression, "frameId": frame_id, "context": "repl"},
                       timeout=120)["result"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stop_frame_over_dap_nested_summaries_dump_and_compare(dap, tmp_path):
    config = _generate_config("Generate: stop in MMDiT block", tmp_path)
    config["env"]["SD35_PRECISION"] = "fp8-weight"
    dap.start("launch", config)
    tid, frames = dap.stopped()
    top = frames[0]
    assert top["name"] == "_stop_here"
    variables = dap.locals(top["id"])
    assert {"inputs", "args", "kwargs", "sd35_dump", "compare_bf16", "fp8_vs_bf16"} <= set(variables)
    # the containers themselves: shapes, not ~480 characters of values
    value = variables["inputs"]["value"]
    assert value.startswith("dict[4] {hidden_states: Tensor[2×64×64] bfloat16 cpu") and "tensor(" not in value, value
    assert value.endswith("joint_attention_kwargs: None}") and len(value) < 200
    assert variables["kwargs"]["value"] == value  # diffusers passes the block's inputs as keywords
    assert variables["args"]["value"] == "()"  # nothing to summarise: pydevd's own display
    # expanded: each nested tensor is a one-line summary with statistics
    children = dap.children(variables["inputs"]["variablesReference"])
    nested = next(v for k, v in children.items() if "hidden_states" in k)["value"]
    assert nested.startswith("Tensor[2×64×64] bfloat16 cpu · min ") and "nan 0 inf 0" in nested and len(nested) < 160
    # the Debug Console tools
    path = Path(_evaluate(dap, top["id"], "sd35_dump()").strip("'\""))
    assert path.is_file() and path.with_suffix(".json").is_file() and path.parent == tmp_path / "out" / "debug"
    assert json.loads(path.with_suffix(".json").read_text())["where"] == "block.1@2"
    cosine = float(_evaluate(dap, top["id"], "compare_bf16()['cosine']"))
    assert 0.99 < cosine <= 1.0 + 1e-6
    assert "reloaded" in _evaluate(dap, top["id"], "fp8_vs_bf16['weights']")
    dap.request("continue", {"threadId": tid})
    dap.wait_event("terminated", timeout=180)
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nan_break_over_dap_stops_at_the_innermost_module(dap, tmp_path):
    config = _generate_config("Generate: stop in MMDiT block", tmp_path)
    config.pop("module")
    config["program"] = str(ROOT / "tests" / "plant_nan.py")  # `sd35 generate` with a NaN in one weight
    config["args"] = [*config["args"], "--precision", "bf16"]
    config["env"] = {**config["env"], "SD35_BREAK": "nan", "PYTHONPATH": os.pathsep.join(sys.path)}
    dap.start("launch", config)
    tid, frames = dap.stopped()
    top = frames[0]
    assert top["name"] == "_stop_here" and top["source"]["path"].endswith("sd35/debugging/breakpoints.py")
    variables = dap.locals(top["id"])
    assert variables["where"]["value"].strip("'\"") == "nan@0 transformer_blocks.2.attn.to_q"
    assert variables["name"]["value"].strip("'\"") == "transformer_blocks.2.attn.to_q"
    out = variables["output"]["value"]
    assert out.startswith("Tensor[2×64×64] bfloat16 cpu") and "nan 0 " not in out, out
    summary = dap.children(variables["summary"]["variablesReference"])
    assert any("input" in k and "nan 0 inf 0" in v["value"] for k, v in summary.items()), summary
    # Step Into re-runs the module on the same inputs: into torch's Linear.forward
    dap.request("stepIn", {"threadId": tid})
    tid, frames = dap.stopped()
    assert frames[0]["name"] == "forward" and frames[0]["source"]["path"].endswith("torch/nn/modules/linear.py")
    dap.request("disconnect", {"terminateDebuggee": True})
