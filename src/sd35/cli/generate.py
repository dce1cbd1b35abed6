"""`sd35 generate` (images + sidecars) and `sd35 fidelity` (FP8 vs bf16 on the same prompt and seed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sd35.cli.common import (Compile, Device, Lora, LoraAllowPartial, LoraFuse, Model, Precision, Revision, T5,
                             Transformer, Verbose, err, handle_errors, listen_for_debugger, lora_flags, out, settings)
from sd35.errors import InputError

MAX_CLI_IMAGES = 16


@handle_errors
def generate(
    prompt: str = typer.Option("a photo of an astronaut riding a horse on the moon", "--prompt", "-p"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt"),
    model: Model = None,
    revision: Revision = None,
    precision: Precision = None,
    t5: T5 = None,
    device: Device = None,
    offload: Optional[str] = typer.Option(None, "--offload", help="none | model | sequential [SD35_OFFLOAD]"),
    compile_mode: Compile = None,
    transformer: Transformer = None,
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
                                         "scheduler@STEP, transformer@STEP, vae.decode, nan [SD35_BREAK]"),
    image: Optional[Path] = typer.Option(None, "--image", help="edit this png/webp/jpeg (img2img); the size defaults "
                                         "to its own, rounded to what the model takes"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="with --image: a PNG whose transparent pixels are "
                                        "repainted (inpainting); the rest of the image is kept"),
    strength: Optional[float] = typer.Option(None, "--strength", help="with --image: how much to change, 0-1 "
                                             "(default 0.6; 1.0 with --mask)"),
    lora: Lora = None,
    lora_fuse: LoraFuse = None,
    lora_allow_partial: LoraAllowPartial = None,
    fp8_emulate: Optional[bool] = typer.Option(None, "--fp8-emulate", help="let --precision fp8 run on a CPU "
                                               "(torch's CPU float8 matmul; numerics only, slow) [SD35_FP8_EMULATE]"),
    keep_nonfinite: bool = typer.Option(False, "--keep-nonfinite", help="write an image whose pixels hold NaN/Inf "
                                        "(all black) anyway; the exit code is still 3"),
    verbose: Verbose = False,
) -> None:
    """Generate images; write <out>/<timestamp>-<seed>.png and a .json sidecar beside each."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sd35 import logs
    from sd35.debugging import breakpoints
    from sd35.runtime import Runtime, nonfinite_error, precheck

    # 1. Flags → settings; bad input is refused before the model loads (and nothing is written).
    logs.configure(verbose)
    s = settings(model=model, revision=revision, precision=precision, t5=t5, device=device, offload=offload,
                 output_dir=out_dir, breaks=breaks, compile=compile_mode, transformer=transformer,
                 fp8_emulate=fp8_emulate, **lora_flags(lora, lora_fuse, lora_allow_partial))
    if not 1 <= n <= MAX_CLI_IMAGES:
        raise InputError(f"-n {n} is out of range.", f"pass -n from 1 to {MAX_CLI_IMAGES}.", param="n")
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, height=height,
                  width=width, seed=seed, **_edit_inputs(image, mask, strength))
    break_list = breakpoints.parse(s.breaks)
    draft = precheck(s, **fields)
    # 2. The debugger (when asked), then the model, then the request against the loaded model's limits.
    listen_for_debugger(s)
    rt = Runtime.load(s, breaks=break_list)
    request = rt.check(**{**fields, "seed": draft.seed})
    # 3. Generate with a progress bar, then save PNG + sidecar per image.
    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        task = progress.add_task("denoise", total=request.denoising_steps)
        result = rt.generate(request, n=n, on_step=lambda i, total: progress.update(task, completed=i),
                             keep_nonfinite=keep_nonfinite)
    written = rt.save(result, s.output_dir)
    for png, js in written:
        print(png, js, sep="\n")  # plain stdout: paths are for scripts
    t = result.timings
    err.print(f"load {rt.loaded.load_seconds:.1f}s · encode {t['encode']:.2f}s · denoise {t['denoise']:.2f}s · "
              f"decode {t['decode']:.2f}s · {rt.loaded.plan.transformer} on {rt.device} · "
              f"compile {rt.compile.mode}{f' ({rt.compile.seconds:.1f}s)' if rt.compile.seconds else ''} · "
              f"seed{'s' if n > 1 else ''} {', '.join(map(str, result.seeds))}", highlight=False)
    if rt.loaded.source.notice:
        err.print(f"[yellow]note:[/] {rt.loaded.source.notice}", highlight=False)
    _print_loras(rt.lora_record(result.request))
    if not result.finite:  # kept as asked (--keep-nonfinite), still a failure
        raise nonfinite_error(result, rt.loaded.plan.as_dict(), kept=True)


def _print_loras(record: dict | None) -> None:
    """One line per LoRA: what was applied (the sidecar has the same under "lora")."""
    for a in (record or {}).get("applied", []) + (record or {}).get("fused", []):
        err.print(f"LoRA {a['name']} ×{a['scale']:g} ({a.get('mode', record['mode'])}): applied to "
                  f"{a['layers_applied']} layers ({a['layers_in_file']} in the file)", highlight=False)


def _edit_inputs(image: Path | None, mask: Path | None, strength: float | None) -> dict:
    """--image / --mask / --strength → the Runtime's edit fields (files read and checked before loading)."""
    from sd35.inference import inputs

    if image is None:
        for flag, value in (("--mask", mask), ("--strength", strength)):
            if value is not None:
                raise InputError(f"{flag} needs --image (the picture to edit).", f"pass --image IN.png {flag} ….",
                                 param=flag.lstrip("-"))
        return {}

    def read(path: Path, flag: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InputError(f"{flag} {path}: {exc.strerror or exc}.", f"pass {flag} with a readable file.",
                             param=flag.lstrip("-")) from None

    picture = inputs.read_image(read(image, "--image"), "--image")
    repaint = inputs.read_mask(read(mask, "--mask"), "--mask") if mask is not None else None
    inputs.check_pair(picture, repaint, "--image", "--mask")
    return {"image": picture, "mask": repaint, "strength": strength}


@handle_errors
def fidelity(
    per_block: bool = typer.Option(False, "--per-block", help="each transformer block's error (the table/JSON)"),
    as_json: bool = typer.Option(False, "--json", help='print {"blocks": [...], "image": {...}, ...} as JSON'),
    model: Model = None,
    precision: Optional[str] = typer.Option(None, "--precision", help="the candidate: auto | fp8-weight | fp8 "
                                            "[SD35_PRECISION]"),
    device: Device = None,
    prompt: str = typer.Option("a bowl of ramen, studio photo", "--prompt", "-p"),
    seed: int = typer.Option(0, "--seed"),
    steps: Optional[int] = typer.Option(None, "--steps", help="denoising steps (default: the model's)"),
    step: Optional[int] = typer.Option(None, "--step", help="the step whose block outputs are compared (default: "
                                       "middle)"),
    lora: Lora = None,
) -> None:
    """FP8 vs bf16 on the same prompt and seed: per-block error (relative L2, cosine) and the final image."""
    from sd35 import logs
    from sd35.bench import fidelity as fid

    logs.configure(False)
    r = fid.per_block(settings(model=model, precision=precision, device=device, **lora_flags(lora, None, None)),
                      prompt=prompt, seed=seed, steps=steps, step=step)
    if as_json:
        print(json.dumps(r if per_block else {k: v for k, v in r.items() if k != "blocks"}, indent=2))
        return
    if per_block:
        out.print(_block_table(r))
        if r["blocks"]:
            worst = max(r["blocks"], key=lambda b: b["image_rel_err"])
            out.print(f"worst block: {worst['block']} (image rel. err {worst['image_rel_err']:.5f})", highlight=False)
    i = r["image"]
    _print_loras(r.get("lora"))
    out.print(f"final image: rel. err {i['rel_err']:.4f}, PSNR {_f(i['psnr_db'], '.1f')} dB, SSIM {i['ssim']:.4f}",
              highlight=False)


def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _block_table(r: dict):
    from rich.table import Table

    table = Table(title=f"{r['candidate']} vs {r['reference']}, {r['model']} on {r['device']}, "
                        f"block outputs at step {r['step']} of {r['steps']} (seed {r['seed']})")
    for col in ("block", "image rel. err", "image cosine", "text rel. err", "text cosine"):
        table.add_column(col, justify="right")
    for b in r["blocks"]:
        table.add_row(str(b["block"]), _f(b["image_rel_err"], ".5f"), _f(b["image_cosine"], ".6f"),
                      _f(b["text_rel_err"], ".5f"), _f(b["text_cosine"], ".6f"))
    return table
