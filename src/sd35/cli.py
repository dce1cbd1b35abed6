"""The `sd35` command line.

Why thin: each command turns flags into `Settings` (flags win over the environment and `.env`), calls
the library and prints. Errors we can name (`Sd35Error`, invalid settings) are printed as one
paragraph with the fix and a non-zero exit code; nothing is written when the input is bad.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sd35.errors import InputError, Sd35Error

app = typer.Typer(
    help="Load, generate, serve and benchmark Stable Diffusion 3.5 in bf16 or FP8.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (results belong in docs/benchmarks.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(help="The (shared) Hugging Face cache: init, prefetch, quantize, verify, ls.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")

MAX_CLI_IMAGES = 16
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

_ENV_NAMES = {"hf_hub_cache": "HF_HUB_CACHE", "hf_token": "HF_TOKEN", "hf_hub_offline": "HF_HUB_OFFLINE",
              "hf_endpoint": "HF_ENDPOINT"}


def _fail(exc: Sd35Error) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(exc.cause)}", highlight=False)
    if exc.fix:
        err.print(f"[bold]fix:[/] {escape(exc.fix)}", highlight=False)
    raise typer.Exit(exc.exit_code)


def _settings_error(exc) -> InputError:
    """A pydantic ValidationError on settings, as one cause + fix naming the flag and the variable."""
    parts = []
    for e in exc.errors():
        field = str(e["loc"][0]) if e.get("loc") else "?"
        env = _ENV_NAMES.get(field, f"SD35_{field.upper()}")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{env} / --{field.replace('_', '-')}: {msg} (got {e.get('input')!r})")
    return InputError("invalid setting: " + "; ".join(parts) + ".",
                      "correct the flag, the environment variable or the line in .env (see .env.example).")


def handle_errors(fn):
    """Print our errors as cause + fix with their exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except Sd35Error as exc:
            _fail(exc)
        except ValidationError as exc:
            _fail(_settings_error(exc))

    return wrapper


def _settings(**flags):
    from sd35.settings import load_settings

    return load_settings(**flags)


@app.command()
@handle_errors
def generate(
    prompt: str = typer.Option("a photo of an astronaut riding a horse on the moon", "--prompt", "-p"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt"),
    model: Optional[str] = typer.Option(None, "--model", help="tiny, medium, large, large-turbo, a repo id or a folder [SD35_MODEL]"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit [SD35_REVISION]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | bf16 | fp8-weight | fp8 [SD35_PRECISION]"),
    t5: Optional[str] = typer.Option(None, "--t5", help="auto | bf16 | fp8-weight | off [SD35_T5]"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N [SD35_DEVICE]"),
    offload: Optional[str] = typer.Option(None, "--offload", help="none | model | sequential [SD35_OFFLOAD]"),
    compile_mode: Optional[str] = typer.Option(None, "--compile", help="off | blocks | full | auto (off for one "
                                               "run; blocks compiles the MMDiT blocks) [SD35_COMPILE]"),
    transformer: Optional[Path] = typer.Option(None, "--transformer", help="transformer from one SAI/ComfyUI "
                                               ".safetensors file, plain or FP8 scaled [SD35_TRANSFORMER]"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps (default: the model's, read from its "
                                        "configs)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="classifier-free guidance scale"),
    height: Optional[int] = typer.Option(None, "--height", help="multiple of 16"),
    width: Optional[int] = typer.Option(None, "--width", help="multiple of 16"),
    seed: Optional[str] = typer.Option(None, "--seed", help="integer; random when omitted (recorded); image i of -n "
                                       "gets seed+i"),
    n: int = typer.Option(1, "-n", "--n", help="number of images (each reproducible alone with its own seed)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder [SD35_OUTPUT_DIR]"),
    breaks: Optional[str] = typer.Option(None, "--break", help="stop inside diffusers: block.K@STEP, attn.K@STEP, "
                                         "scheduler@STEP, transformer@STEP, vae.decode [SD35_BREAK]"),
    fp8_emulate: Optional[bool] = typer.Option(None, "--fp8-emulate", help="let --precision fp8 run on a CPU "
                                               "(torch's CPU float8 matmul; numerics only, slow) [SD35_FP8_EMULATE]"),
    keep_nonfinite: bool = typer.Option(False, "--keep-nonfinite", help="write an image whose pixels hold NaN/Inf "
                                        "(all black) anyway; the exit code is still 3"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show the libraries' own logs"),
) -> None:
    """Generate images; write <out>/<timestamp>-<seed>.png and a .json sidecar beside each."""
    from sd35.debugging import breakpoints
    from sd35 import logs
    from sd35.runtime import Runtime, nonfinite_error, precheck

    logs.configure(verbose)
    settings = _settings(model=model, revision=revision, precision=precision, t5=t5, device=device,
                         offload=offload, output_dir=out_dir, breaks=breaks, compile=compile_mode, transformer=transformer,
                         fp8_emulate=fp8_emulate)
    if not 1 <= n <= MAX_CLI_IMAGES:
        raise InputError(f"-n {n} is out of range.", f"pass -n from 1 to {MAX_CLI_IMAGES}.", param="n")
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
                  width=width, seed=seed)
    # Bad input is refused before the model loads (and nothing is written).
    break_list = breakpoints.parse(settings.breaks)
    draft = precheck(settings, **fields)
    breakpoints.listen(settings.debugpy, wait=settings.debugpy_wait, allow_remote=settings.debugpy_allow_remote,
                 allow_listen=settings.debugpy_allow_listen)
    rt = Runtime.load(settings, breaks=break_list)
    request = rt.check(**{**fields, "seed": draft.seed})

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task("denoise", total=request.steps)
        result = rt.generate(request, n=n, on_step=lambda i, total: progress.update(task, completed=i),
                             keep_nonfinite=keep_nonfinite)
    written = rt.save(result, settings.output_dir)
    t = result.timings
    for png, js in written:
        print(png, js, sep="\n")  # plain stdout: paths are for scripts
    err.print(f"load {rt.loaded.load_seconds:.1f}s · encode {t['encode']:.2f}s · denoise {t['denoise']:.2f}s · "
              f"decode {t['decode']:.2f}s · {rt.loaded.plan.transformer} on {rt.device} · "
              f"compile {rt.compile.mode}{f' ({rt.compile.seconds:.1f}s)' if rt.compile.seconds else ''} · "
              f"seed{'s' if n > 1 else ''} {', '.join(map(str, result.seeds))}", highlight=False)
    if rt.loaded.source.notice:
        err.print(f"[yellow]note:[/] {rt.loaded.source.notice}", highlight=False)
    if not result.finite:  # kept as asked (--keep-nonfinite), still a failure
        raise nonfinite_error(result, rt.loaded.plan.as_dict(), kept=True)


@app.command()
@handle_errors
def serve(
    host: Optional[str] = typer.Option(None, "--host", help="bind address [SD35_HOST, default 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, "--port", help="[SD35_PORT, default 8000]"),
    model: Optional[str] = typer.Option(None, "--model", help="[SD35_MODEL]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="[SD35_PRECISION]"),
    compile_mode: Optional[str] = typer.Option(None, "--compile", help="off | blocks | full | auto (blocks on "
                                               "CUDA, compiled during warm-up) [SD35_COMPILE]"),
    allow_no_key: Optional[bool] = typer.Option(None, "--allow-no-key", help="serve without any API key even on a "
                                                "non-loopback bind or a host other accounts log in to [SD35_ALLOW_NO_KEY]"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the OpenAI-compatible image API (one process per GPU; the model is loaded once)."""
    from sd35 import logs
    from sd35.service.server import serve as run_server

    logs.configure(verbose)
    settings = _settings(host=host, port=port, model=model, precision=precision, allow_no_key=allow_no_key,
                         compile=compile_mode)
    from sd35.debugging import breakpoints

    breakpoints.parse(settings.breaks)
    breakpoints.listen(settings.debugpy, wait=settings.debugpy_wait, allow_remote=settings.debugpy_allow_remote,
                 allow_listen=settings.debugpy_allow_listen)
    raise typer.Exit(run_server(settings))


@app.command()
@handle_errors
def lab(
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (--tcp), or the laptop port in the printed "
                                       "ssh -L line [SD35_LAB_PORT, default 8888]"),
    root: Optional[Path] = typer.Option(None, "--root", help="folder JupyterLab opens (default: this workspace)"),
    tcp: Optional[bool] = typer.Option(None, "--tcp", help="listen on 127.0.0.1:PORT instead of a private Unix "
                                       "socket (any local account can reach it) [SD35_LAB_TCP]"),
) -> None:
    """JupyterLab on a private Unix socket (0600) by default, rooted at the workspace, kernel = this environment."""
    import os

    from sd35.ops import lab as lab_plan
    from sd35.ops.workspace import find_root

    settings = _settings(lab_port=port, lab_tcp=tcp)
    root = (root or find_root()).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--root {root} is not a folder.", "pass the workspace's path.")
    interactive = sys.stderr.isatty()
    plan = lab_plan.plan(settings, root, tcp=settings.lab_tcp, interactive=interactive)
    where = f"socket {plan.socket} (mode 0600)" if plan.socket else f"http://127.0.0.1:{settings.lab_port}"
    err.print(f"JupyterLab on {where}; root {root}; kernel {sys.executable}", highlight=False)
    err.print(f"  from a laptop: {plan.tunnel}   (or your ~/.ssh/config alias for this host)", highlight=False)
    if interactive:
        err.print(f"  then open: {plan.url}", highlight=False)
    else:  # a log, not a person: never the token itself
        err.print(f"  then open http://127.0.0.1:{settings.lab_port}/lab?token=… with the token in {plan.token_file} "
                  "(mode 0600)", highlight=False)
    for note in plan.notes:
        err.print(f"warning: {note}", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, plan.args, plan.env)  # JupyterLab takes over the process (signals, exit code)


keys_app = typer.Typer(help="Per-user API keys for `sd35 serve` (hashed in SD35_API_KEYS_FILE).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
@handle_errors
def keys_add(
    name: str = typer.Argument(..., help="who the key is for (their login): it names them in the access log"),
    file: Optional[Path] = typer.Option(None, "--file", help="[SD35_API_KEYS_FILE, default /etc/sd35/api-keys]"),
    group: Optional[str] = typer.Option(None, "--group", help="group of a new keys file: the service's (sd35), "
                                        "so it can read it"),
) -> None:
    """Create a key for NAME: append its salted hash to the keys file and print the key once."""
    from sd35.service import auth

    settings = _settings()
    path = file or settings.api_keys_file or auth.DEFAULT_FILE
    key = auth.add(Path(path), name, group)
    err.print(f"added {name!r} to {path}; the key is shown once, below (the file keeps only its hash). Restart the "
              "service to load it.", highlight=False)
    print(key)


@keys_app.command("list")
@handle_errors
def keys_list(file: Optional[Path] = typer.Option(None, "--file", help="[SD35_API_KEYS_FILE]")) -> None:
    """The names in the keys file (never a key)."""
    from sd35.service import auth

    settings = _settings()
    path = Path(file or settings.api_keys_file or auth.DEFAULT_FILE)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "create it with `sd35 keys add NAME`.")
    for entry in auth.read(path):
        print(entry.name)


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="print the checks as a JSON list"),
    model: Optional[str] = typer.Option(None, "--model", help="check this model instead of SD35_MODEL"),
    precision: Optional[str] = typer.Option(None, "--precision", help="check this precision instead of SD35_PRECISION"),
) -> None:
    """Check this machine for every known onboarding pitfall; exit 1 if any check fails."""
    from pydantic import ValidationError

    from sd35.ops import doctor as doc
    from sd35 import logs
    from sd35.ops.workspace import find_root
    from sd35.settings import Settings

    logs.configure(False)
    try:
        settings, problem = _settings(model=model, precision=precision), None
    except ValidationError as exc:
        settings, problem = Settings.model_construct(), _settings_error(exc).cause
    ctx = doc.Context(settings=settings, settings_error=problem, root=find_root())
    results = doc.run(ctx)
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        out.print(doc.table(results))
    if any(r.status == doc.FAIL for r in results):
        raise typer.Exit(1)


@cache_app.command("init")
@handle_errors
def cache_init(
    path: Path = typer.Argument(..., help="the folder to share, e.g. /srv/cache/huggingface"),
    group: Optional[str] = typer.Option(None, "--group", help="the team's group (owns the folder)"),
) -> None:
    """Create a group-owned, setgid (2775) cache folder and print the environment lines to use."""
    from sd35.ops import cache

    r = cache.init(path, group)
    err.print(f"{r.path}: group {r.group}, mode 2775 (setgid: new files inherit the group); {r.acl}.",
              highlight=False)
    err.print("Use these lines in /etc/sd35/sd35.env, .env or each user's shell profile. Share only the hub "
              "cache: HF_HOME (with the token) stays per user.", highlight=False)
    for line in r.env_lines:
        print(line)
    print("umask 0002  # without default ACLs, for every session: pam_umask + UMASK 002 in /etc/login.defs "
          "(~/.profile does not reach VS Code; docs/remote-ssh.md); systemd units: UMask=0002")


@cache_app.command("prefetch")
@handle_errors
def cache_prefetch(
    model: str = typer.Argument(..., help="medium, large, large-turbo or a repo id"),
    revision: Optional[str] = typer.Option(None, "--revision", help="branch, tag or commit [SD35_REVISION]"),
    t5: Optional[str] = typer.Option(None, "--t5", help="off: skip the T5 encoder's 9.5 GB [SD35_T5]"),
) -> None:
    """Download only the files the pipeline loads into HF_HUB_CACHE (no single-file or fp32 duplicates)."""
    from sd35.weights import hub
    from sd35 import logs
    from sd35.models import expand_alias

    logs.configure(False)
    settings = _settings(model=model, revision=revision, t5=t5)
    repo = expand_alias(settings.model)
    if hub.classify(repo) != "hub":
        raise InputError(f"{repo!r} is not a Hub repo: nothing to prefetch.", "pass medium, large, large-turbo or org/name.")
    folder, commit = hub.download(repo, settings, with_t5=settings.t5 != "off", progress=True)
    hub.check_complete(folder, with_t5=settings.t5 != "off")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    err.print(f"{repo} at commit {commit}: {size / 1e9:.2f} GB in {settings.hf_hub_cache}", highlight=False)
    print(folder)


@cache_app.command("quantize")
@handle_errors
def cache_quantize(
    model: Optional[str] = typer.Option(None, "--model", help="the bf16 source: tiny, medium, large, large-turbo, a "
                                        "repo id or a folder [SD35_MODEL]"),
    precision: str = typer.Option("fp8-weight", "--precision", help="fp8-weight | fp8 (same bytes on disk; the "
                                  "mode a load uses is still chosen at load time)"),
    t5: str = typer.Option("auto", "--t5", help="auto (FP8) | fp8-weight | bf16 (stored as in the source)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: SD35_QUANTIZED_DIR/<name>-"
                                       "<precision>, inside HF_HUB_CACHE)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit [SD35_REVISION]"),
) -> None:
    """Write a pre-quantized FP8 copy of a model (transformer + T5 as FP8 data + scales) that loads with
    no bf16 copy in host or GPU memory; the team loads it with --model <name> or its path."""
    from sd35.weights import hub, quantized
    from sd35 import logs

    logs.configure(False)
    settings = _settings(model=model, revision=revision)
    target = quantized.check_request(settings, precision, t5, out)  # refuse before downloading or reading
    source = hub.resolve(settings, with_t5=True)
    folder = quantized.quantize(settings, source, precision, t5, target)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    err.print(f"{settings.model} → {folder} ({precision}, {size / 1e9:.2f} GB); load it with "
              f"--model {folder.name if folder.parent == quantized.store_dir(settings) else folder}", highlight=False)
    print(folder)


@cache_app.command("verify")
@handle_errors
def cache_verify(model: Optional[str] = typer.Argument(None, help="one model (default: the whole cache)")) -> None:
    """Find LFS pointer stubs, truncated or missing files and blobs/locks the group cannot write."""
    from rich.markup import escape

    from sd35.ops import cache

    settings = _settings()
    problems = cache.verify(settings.hf_hub_cache, model)
    problems += cache.verify_quantized(settings, model)
    for p in problems:
        err.print(f"[bold red]{p.kind}[/]: {escape(str(p.path))}: {escape(p.detail)}\n  fix: {escape(p.fix)}",
                  highlight=False)
    if problems:
        err.print(f"{len(problems)} problem(s) in {settings.hf_hub_cache}", highlight=False)
        raise typer.Exit(1)
    err.print(f"{settings.hf_hub_cache}: no problems found", highlight=False)


@cache_app.command("ls")
@handle_errors
def cache_ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """Models in HF_HUB_CACHE: revisions, refs, sizes."""
    from rich.table import Table

    from sd35.ops import cache

    from sd35.weights import quantized

    settings = _settings()
    rows = cache.listing(settings.hf_hub_cache)
    stored = quantized.listing(settings)
    if as_json:
        print(json.dumps(rows + [{"repo_id": r["name"], "type": "sd35-quantized", **r} for r in stored], indent=2))
        return
    table = Table(title=f"HF_HUB_CACHE={settings.hf_hub_cache}")
    for col in ("repo", "commit", "refs", "files", "size"):
        table.add_column(col, justify="right" if col in ("files", "size") else "left", overflow="fold")
    for r in rows:
        table.add_row(r["repo_id"], r["commit"][:12], ",".join(r["refs"]), str(r["files"]),
                      f"{r['size_on_disk'] / 1e9:.2f} GB")
    out.print(table if rows else f"no models in {settings.hf_hub_cache}")
    if stored:
        q = Table(title=f"pre-quantized: {quantized.store_dir(settings)} (load with --model NAME)")
        for col in ("name", "precision", "t5", "source", "size"):
            q.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
        for r in stored:
            src = r["source"]
            q.add_row(r["name"], str(r.get("precision") or r.get("error")), str(r.get("t5")),
                      f"{src.get('repo_id') or src.get('requested')}@{(src.get('commit') or '-')[:12]}",
                      f"{r['size_on_disk'] / 1e9:.2f} GB")
        out.print(q)


@app.command()
@handle_errors
def fidelity(
    per_block: bool = typer.Option(False, "--per-block", help="each transformer block's error (the table/JSON)"),
    as_json: bool = typer.Option(False, "--json", help='print {"blocks": [...], "image": {...}, ...} as JSON'),
    model: Optional[str] = typer.Option(None, "--model", help="[SD35_MODEL]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="the candidate: auto | fp8-weight | fp8 [SD35_PRECISION]"),
    device: Optional[str] = typer.Option(None, "--device", help="[SD35_DEVICE]"),
    prompt: str = typer.Option("a bowl of ramen, studio photo", "--prompt", "-p"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps (default: the model's)"),
    step: Optional[int] = typer.Option(None, "--step", help="the step whose block outputs are compared (default: middle)"),
) -> None:
    """FP8 vs bf16 on the same prompt and seed: per-block error (relative L2, cosine) and the final image."""
    from rich.table import Table

    from sd35.bench import fidelity as fid
    from sd35 import logs

    logs.configure(False)
    r = fid.per_block(_settings(model=model, precision=precision, device=device), prompt=prompt, seed=seed,
                      steps=steps, step=step)
    if as_json:
        print(json.dumps(r if per_block else {k: v for k, v in r.items() if k != "blocks"}, indent=2))
        return

    def f(x, spec):
        return "—" if x is None else format(x, spec)

    if per_block:
        table = Table(title=f"{r['candidate']} vs {r['reference']}, {r['model']} on {r['device']}, "
                            f"block outputs at step {r['step']} of {r['steps']} (seed {r['seed']})")
        for col in ("block", "image rel. err", "image cosine", "text rel. err", "text cosine"):
            table.add_column(col, justify="right")
        for b in r["blocks"]:
            table.add_row(str(b["block"]), f(b["image_rel_err"], ".5f"), f(b["image_cosine"], ".6f"),
                          f(b["text_rel_err"], ".5f"), f(b["text_cosine"], ".6f"))
        out.print(table)
        if r["blocks"]:
            worst = max(r["blocks"], key=lambda b: b["image_rel_err"])
            out.print(f"worst block: {worst['block']} (image rel. err {worst['image_rel_err']:.5f})", highlight=False)
    i = r["image"]
    out.print(f"final image: rel. err {i['rel_err']:.4f}, PSNR {f(i['psnr_db'], '.1f')} dB, SSIM {i['ssim']:.4f}",
              highlight=False)


def _bench_start(arch: str | None = None, *, quiet: bool = False) -> None:
    """Every `sd35 bench` command: our logs only (warnings only with `quiet`, so timings print clean), and
    `--arch` checked against the registry's architectures."""
    import logging

    from sd35 import logs
    from sd35.models import ARCHS

    logs.configure(False)
    if quiet:
        logging.getLogger("sd35").setLevel(logging.WARNING)
    if arch is not None and arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}.", f"use --arch {' or --arch '.join(ARCHS)}.")


@bench_app.command("memory")
@handle_errors
def bench_memory(
    arch: str = typer.Option("medium", "--arch", help="medium | large (the published transformer configs) | tiny"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Weight bytes of the SD3.5 transformer per precision mode (random weights, built on the CPU)."""
    from sd35.bench import core as bench

    _bench_start(arch)
    report = bench.memory(arch)
    if as_json:
        out.print_json(json.dumps(report))
        return
    out.print(bench.memory_table(report))


@bench_app.command("load")
@handle_errors
def bench_load(
    arch: str = typer.Option("medium", "--arch", help="medium | large (the published transformer configs) | tiny"),
    work_dir: Optional[Path] = typer.Option(None, "--dir", help="where the two copies are written (default: the "
                                            "system temp folder; medium needs ~7.5 GB, large ~12 GB)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Load one random-weight transformer three ways, each in its own process: bf16 then quantize (today),
    lean (quantized as read), pre-quantized (FP8 from disk). Seconds, peak host RSS, bytes on disk."""
    from sd35.bench import core as bench

    _bench_start(arch)
    if work_dir is not None and not work_dir.is_dir():
        raise InputError(f"--dir {work_dir} is not a folder.", "create it or pass another one.")
    report = bench.load_modes(arch, work_dir)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for mode, r in report["modes"].items():
        out.print(f"{mode:14} {r['seconds']:7.1f} s  RSS peak {r['rss_peak_bytes'] / 1e9:6.2f} GB  "
                  f"disk {r['disk_bytes'] / 1e9:6.2f} GB", highlight=False)
    out.print(f"pre-quantized vs today: {report['prequantized_vs_bf16_quantize']} · goals {report['goal']}",
              highlight=False)


@bench_app.command("serve")
@handle_errors
def bench_serve(
    requests: int = typer.Option(20, "--requests", help="sequential requests per path"),
    steps: int = typer.Option(4, "--steps"),
    size: int = typer.Option(128, "--size", help="square image side"),
    burst: int = typer.Option(16, "--burst", help="concurrent requests in the burst"),
    queue_size: int = typer.Option(4, "--queue-size"),
    model: Optional[str] = typer.Option(None, "--model", help="[SD35_MODEL]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="[SD35_PRECISION]"),
    ray: bool = typer.Option(False, "--ray", help="1 vs 2 Ray Serve replicas side by side (a loopback Ray here; "
                             "--requests generations from --burst closed-loop clients)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Service overhead vs a direct pipeline call (goal <= 5 %), and a burst against a bounded queue."""
    from sd35.bench import core as bench

    _bench_start(quiet=True)
    if ray:
        _bench_serve_ray(_settings(model=model, precision=precision, queue_size=queue_size), requests, burst, steps,
                         size, as_json)
        return
    report = bench.serve_overhead(_settings(model=model, precision=precision), requests=requests, steps=steps,
                                  size=size, burst=burst, queue_size=queue_size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    b = report["burst"]
    out.print(f"{report['model']} {report['precision']} on {report['device']}, {report['steps']} steps "
              f"{report['size']}, {report['requests']} sequential requests each:\n"
              f"  direct  mean {report['direct_mean_s'] * 1000:.1f} ms  p50 {report['direct_p50_s'] * 1000:.1f} ms\n"
              f"  HTTP    mean {report['http_mean_s'] * 1000:.1f} ms  p50 {report['http_p50_s'] * 1000:.1f} ms\n"
              f"  overhead {report['overhead_mean'] * 100:+.1f} % (mean), {report['overhead_p50'] * 100:+.1f} % (p50); "
              f"goal <= 5 %\n"
              f"burst of {b['concurrent']} against queue {b['queue_size']}: {b['status_counts']} in {b['seconds']} s, "
              f"{b['images_per_s']} images/s, served p50 {b['served_p50_s']} s p95 {b['served_p95_s']} s",
              highlight=False)


def _bench_serve_ray(settings, requests: int, concurrency: int, steps: int, size: int, as_json: bool) -> None:
    try:
        from sd35.bench import ray
    except ImportError as exc:
        raise InputError(f"sd35 bench serve --ray needs Ray Serve ({exc})",
                         "install the ray extra: make setup (or pip install -c constraints.txt -e '.[ray]')") from None
    report = ray.compare(settings, requests=requests, concurrency=concurrency, steps=steps, size=size)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['model']} on {report['device']}, {report['steps']} steps {report['size']}, "
              f"{report['requests']} requests from {report['concurrency']} clients:", highlight=False)
    for r in report["runs"]:
        out.print(f"  {r['replicas']} replica(s): {r['images_per_s']:.3f} images/s  p50 {r['p50_s']} s  "
                  f"p95 {r['p95_s']} s  refused {r['refused']}  (ready in {r['ready_s']} s)  "
                  f"x{report['speedup'][str(r['replicas'])]}", highlight=False)
    if report["note"]:
        out.print(f"  note: {report['note']}", highlight=False)


@bench_app.command("speed")
@handle_errors
def bench_speed(
    arch: str = typer.Option("large", "--arch", help="medium | large (published configs) | tiny"),
    size: int = typer.Option(1024, "--size", help="square image side"),
    modes: str = typer.Option("bf16,fp8-weight,fp8", "--modes", help="comma-separated precision modes"),
    eager_only: bool = typer.Option(False, "--eager-only", help="skip the compiled runs"),
    repeats: int = typer.Option(10, "--repeats"),
    cache_check: bool = typer.Option(False, "--cache-check", help="also time a cold vs a warm compile cache in two "
                                     "`sd35 generate --compile blocks` processes (the configured model)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Transformer step latency and peak GPU memory per precision mode, eager and compiled (random weights)."""
    from sd35.bench import core as bench
    from sd35.settings import PRECISIONS

    _bench_start(arch, quiet=True)
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in wanted if m not in PRECISIONS or m == "auto"]
    if bad or not wanted:
        raise InputError(f"unknown mode(s) {', '.join(bad) or modes!r}.", "use --modes bf16,fp8-weight,fp8.")
    if size % 16 or not 64 <= size <= 4096:
        raise InputError(f"--size {size} must be a multiple of 16 from 64 to 4096.", "pass --size 1024.")
    report = bench.speed(arch, size, modes=wanted, compiled=not eager_only, repeats=repeats)
    if cache_check:
        report["compile_cache"] = bench.compile_cache(_settings())
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"{report['arch']} at {report['size']}² on {report['device_name']} ({report['device']}), "
              f"median of {report['repeats']} steps" + (f"\n[yellow]{report['note']}[/]" if report["note"] else ""),
              highlight=False)
    for mode, row in report["modes"].items():
        if "note" in row:
            out.print(f"  {mode:11} {row['note']}", highlight=False)
            continue
        parts = [f"{kind} {r['step_ms_median']:.1f} ms" + (f" ({r['ratio_vs_bf16']:.2f}× bf16)" if "ratio_vs_bf16" in r
                 else "") + (f", peak {r['peak_gpu_bytes'] / 1e9:.2f} GB" if "peak_gpu_bytes" in r else "")
                 + (f", first call {r['first_call_s']:.1f} s" if "first_call_s" in r else "")
                 for kind, r in row.items()]
        out.print(f"  {mode:11} " + " · ".join(parts), highlight=False)
    if "compile_cache" in report:
        c = report["compile_cache"]
        out.print(f"  compile cache: cold {c['cold']['seconds']} s, warm {c['warm']['seconds']} s → {c['ratio']}× "
                  f"(goal ≤ {c['goal_ratio_max']})", highlight=False)


@bench_app.command("gpu")
@handle_errors
def bench_gpu(
    rehearse: bool = typer.Option(False, "--rehearse", help="without CUDA: the same sequence on this CPU with the "
                                  "tiny model and emulated fp8 (minutes; not GPU figures)"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON report instead of the markdown table"),
) -> None:
    """GPU acceptance, offline: the GPU test tier, bf16/fp8-weight/fp8 step times eager and compiled, peak
    memory, compile cold/warm, fp8's error per block (random weights of the published architectures)."""
    from sd35.bench import gpu

    _bench_start(quiet=True)
    report = gpu.run(rehearse=rehearse)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(gpu.markdown(report))


@bench_app.command("break")
@handle_errors
def bench_break(
    runs: int = typer.Option(20, "--runs"),
    steps: int = typer.Option(4, "--steps"),
    model: Optional[str] = typer.Option(None, "--model", help="[SD35_MODEL]"),
    nan: bool = typer.Option(False, "--nan", help="measure SD35_BREAK=nan (finiteness checks) instead"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cost of armed SD35_BREAK hooks that do not match, per denoising step (goal <= 1 %); --nan: of the NaN watch."""
    from sd35.bench import core as bench

    _bench_start(quiet=True)
    r = bench.break_overhead(_settings(model=model), runs=runs, steps=steps, nan=nan)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    what = "modules watched for NaN/Inf" if nan else "wrappers armed"
    goal = "" if nan else " (goal <= 1 %)"
    out.print(f"{r['model']} {r['precision']} on {r['device']}: {r['wrappers_armed']} {what}, "
              f"step {r['step_ms_plain_median']} ms plain vs {r['step_ms_armed_median']} ms armed "
              f"(median of {r['runs']}): overhead {r['overhead'] * 100:+.2f} %{goal}", highlight=False)


@bench_app.command("summary")
@handle_errors
def bench_summary(
    repeats: int = typer.Option(5, "--repeats"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Time of a debugger tensor summary for large CPU tensors (sampled over 2^20 elements; cached per stop)."""
    from sd35.bench import core as bench

    rows = bench.summary_time(repeats)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        out.print(f"{r['tensor']}: {r['first_ms']} ms, cached {r['cached_ms']} ms (median of {repeats})\n"
                  f"  {r['summary']}", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: nothing further was written.")
        sys.exit(130)


if __name__ == "__main__":
    main()
