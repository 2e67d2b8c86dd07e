"""`moefy generate`: read what a converted model writes, streamed to the terminal as it is decoded."""

from __future__ import annotations

import sys
import time

import torch

from moefy.errors import BadInput
from moefy.progress import log
from moefy.resources import checked_device, usable_cores


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, T] token ids of `prompt`, wrapped in the tokenizer's chat template (as one user turn) with `chat`."""
    if not chat:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    elif not getattr(tokenizer, "chat_template", None):
        raise BadInput("--chat: this model's tokenizer has no chat template (tokenizer_config.json / "
                       "chat_template.jinja); drop --chat to give the prompt as plain text.")
    else:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True).input_ids
    if ids.shape[1] == 0:
        raise BadInput("--prompt is empty after tokenization; give some text.")
    return ids


def generate(model_spec: str, prompt: str, *, max_new_tokens: int = 64, chat: bool = False, backend: str = "auto",
             device: str = "cpu", threads: int | None = None, stream=None) -> dict:
    """Greedy generation, each new piece of text written to `stream` (None: sys.stdout as it is when called,
    not as it was at import) as soon as it is decoded; returns the text and the decode speed."""
    from transformers import TextStreamer

    from moefy.loading import load_model, load_tokenizer

    stream = sys.stdout if stream is None else stream
    if max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {max_new_tokens} must be at least 1.")
    device = checked_device(device)
    torch.set_num_threads(threads or usable_cores())
    tokenizer = load_tokenizer(model_spec)
    model = load_model(model_spec, backend=backend, device=device)
    ids = prompt_ids(tokenizer, prompt, chat).to(device)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    seconds = time.perf_counter() - start
    new = output[0, ids.shape[1]:]
    log(f"{new.numel()} tokens in {seconds:.2f} s ({new.numel() / seconds:.1f} tokens/s incl. the "
        f"{ids.shape[1]}-token prompt's prefill)")
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "prompt_tokens": int(ids.shape[1]), "seconds": seconds}
