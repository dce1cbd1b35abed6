"""Joint attention maps: how much each image patch attends to each prompt token, in one block at one step.

Why recompute instead of reading them: diffusers' joint attention runs through
`scaled_dot_product_attention`, which never materialises the attention matrix. While capturing, a
`ProcessorProxy` on the chosen block recomputes the queries and keys exactly as `JointAttnProcessor2_0`
does (projections, RMS QK-norm, image tokens first, then text tokens), takes the softmax over all keys
for the text-conditioned half of the CFG batch, keeps the image-query × text-key part averaged over
heads, and then lets the original processor run unchanged. Heads are processed one at a time, so
SD3.5 Large at 1024x1024 needs ~70 MB extra instead of gigabytes.

Text positions: the joint text sequence is 77 CLIP tokens (CLIP-L and CLIP-G share them, concatenated
along channels) followed by the T5 tokens; `token_positions` finds a word in both.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

CLIP_TOKENS = 77


@dataclass
class AttentionCapture:
    block: int
    step: int
    image_to_text: torch.Tensor | None = None  # [image tokens, text tokens], float32 on the CPU

    def token_map(self, positions: list[int], grid: tuple[int, int]) -> torch.Tensor:
        """Attention of every image patch to the text `positions`, as a [rows, cols] patch grid."""
        if self.image_to_text is None:
            raise RuntimeError(f"nothing captured: block {self.block} never ran at step {self.step}")
        return self.image_to_text[:, positions].mean(dim=1).reshape(grid)


def _record(cap: AttentionCapture, attn, hidden_states, encoder_hidden_states) -> None:
    with torch.no_grad():
        b = hidden_states.shape[0]
        rows = slice(b // 2, b) if b > 1 else slice(0, b)  # the text-conditioned half of the CFG batch
        hs, ehs = hidden_states[rows], encoder_hidden_states[rows]
        heads = attn.heads
        q = attn.to_q(hs)
        head_dim = q.shape[-1] // heads

        def split(t):
            return t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)

        q, k = split(q), split(attn.to_k(hs))
        cq, ck = split(attn.add_q_proj(ehs)), split(attn.add_k_proj(ehs))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        n_img = q.shape[2]
        keys = torch.cat([k, ck], dim=2)
        total = None
        for h in range(heads):  # one head at a time: [batch, image queries, all keys]
            logits = (q[:, h].float() @ keys[:, h].float().transpose(-1, -2)) / head_dim**0.5
            part = logits.softmax(dim=-1)[:, :, n_img:].mean(dim=0)
            total = part if total is None else total + part
        cap.image_to_text = (total / heads).cpu()


@contextmanager
def capture(pipe, block: int, step: int):
    """`with capture(pipe, block=K, step=S) as cap: generate…` then `cap.token_map(...)`."""
    from sd35.debugging.hooks import proxy_processor

    n = len(pipe.transformer.transformer_blocks)
    if not 0 <= block < n:
        raise ValueError(f"block {block} does not exist: the transformer has blocks 0…{n - 1}")
    cap = AttentionCapture(block, step)

    def intercept(processor, call_args, kwargs):
        attn, hidden_states, encoder_hidden_states = call_args[:3]
        if encoder_hidden_states is not None and (pipe.scheduler.step_index or 0) == step and cap.image_to_text is None:
            _record(cap, attn, hidden_states, encoder_hidden_states)
        return processor(*call_args, **kwargs)

    undo = proxy_processor(pipe.transformer.transformer_blocks[block].attn, intercept)
    try:
        yield cap
    finally:
        undo()


def token_positions(pipe, prompt: str, word: str) -> list[int]:
    """Positions of `word` in the joint text sequence (CLIP part, then T5 part offset by 77)."""
    positions = []
    clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=CLIP_TOKENS, truncation=True).input_ids
    word_ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    positions += _find(clip_ids, word_ids)
    if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
        t5_ids = pipe.tokenizer_3(prompt).input_ids
        t5_word = pipe.tokenizer_3(word, add_special_tokens=False).input_ids
        positions += [CLIP_TOKENS + p for p in _find(t5_ids, t5_word)]
    if not positions:
        raise ValueError(f"{word!r} is not among the prompt's tokens")
    return positions


def _find(seq: list[int], sub: list[int]) -> list[int]:
    for i in range(len(seq) - len(sub) + 1):
        if sub and seq[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []
