"""Perplexity of a causal language model on evaluation text: the metric LLM pruning papers report.

``perplexity(model, texts_or_token_ids)`` takes a torch module (a Hugging Face causal LM, or any
module whose output, or its ``.logits``, is ``[batch, positions, vocabulary]``) or an ONNX
causal LM (a path, an ``onnx.ModelProto`` or a sparsec ``Graph``, run with ONNX Runtime; its
output named ``logits``, else its first). Every token after the first of each sequence is
predicted from the ones before it:

    perplexity = exp( sum of -log p(token_t | tokens_<t) / number of tokens predicted )

one mean over all tokens of all sequences (not a mean of per-sequence means). A sequence longer
than the window (``max_length``; an ONNX model with a fixed sequence length fixes it) is read in
windows that start every ``stride`` tokens; each window scores only the tokens the window before
it did not, with the tokens before them as context (the sliding window of the Hugging Face
perplexity guide, summed per token). A window's first token is context only: without overlap
(``stride`` equal to the window, the default) it is not scored at all. Windows are padded on
the right to the window length, which a causal model cannot see (an ``attention_mask`` input,
if the model has one, marks the padding too), and padded positions are never scored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sparsec.errors import BadOptionError


@dataclass
class Perplexity:
    """``perplexity`` = exp(``nll`` / ``tokens``): ``nll`` the summed negative log likelihood
    (nats) of the ``tokens`` predicted."""

    perplexity: float
    nll: float
    tokens: int

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens}


def perplexity(model, texts_or_token_ids, *, tokenizer=None, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 1, pad_id: int = 0) -> Perplexity:
    """Perplexity of ``model`` on the texts (with ``tokenizer``: a Hugging Face tokenizer or any
    ``str -> token ids`` callable) or token-id sequences (lists, 1-D arrays or tensors, or 2-D
    ones whose rows are sequences). ``max_length`` is the window (default: the whole longest
    sequence, or the ONNX model's fixed sequence length); ``stride`` the step between windows
    (default: the window, no overlap; smaller gives each scored token more context).
    ``batch_size`` windows run together (an ONNX model with a fixed batch size fixes it). See
    the module docstring."""
    sequences = _token_ids(texts_or_token_ids, tokenizer)
    run, fixed_len, fixed_batch = _runner(model, pad_id)
    longest = max(len(s) for s in sequences)
    if fixed_len is not None:
        if max_length is not None and max_length != fixed_len:
            raise BadOptionError(f"the model reads {fixed_len} positions: max_length "
                                 f"{max_length} does not fit it")
        max_length = fixed_len
    window = int(max_length or longest)
    step = int(stride or window)
    if window < 2 or not 1 <= step <= window:
        raise BadOptionError(f"perplexity needs a window of at least 2 tokens and a stride in "
                             f"[1, window]; got window {window}, stride {step}")
    batch = int(fixed_batch or batch_size)
    pieces = [p for seq in sequences for p in _windows(seq, window, step)]
    nll, count = 0.0, 0
    for at in range(0, len(pieces), batch):
        chunk = pieces[at: at + batch]
        width = fixed_len or max(len(ids) for ids, _ in chunk)
        ids = np.full((batch if fixed_batch else len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, (tokens, _) in enumerate(chunk):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        try:
            logits = run(ids, mask)
        except BadOptionError:
            raise
        except Exception as e:  # noqa: BLE001 - token ids the model cannot read (out of range)
            raise BadOptionError(f"the model does not run on the token ids: "
                                 f"{str(e).strip().splitlines()[0]}") from None
        for row, (tokens, first) in enumerate(chunk):
            # position p's logits predict token p + 1; score tokens first .. len - 1
            nll += _nll(logits[row, first - 1: len(tokens) - 1], tokens[first:])
            count += len(tokens) - first
    if count == 0:
        raise BadOptionError("perplexity needs at least one sequence of two or more tokens")
    return Perplexity(float(math.exp(nll / count)), float(nll), int(count))


def read_token_ids(data) -> Any:
    """Token ids from an .npy file (a 2-D array of rows, or 1-D) or an .npz file (its array
    ``input_ids``, or its only array); anything else is returned as it is."""
    if not isinstance(data, (str, os.PathLike)):
        return data
    from sparsec.errors import InputNotFoundError

    path = os.fspath(data)
    if not os.path.isfile(path):
        raise InputNotFoundError(f"evaluation tokens not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadOptionError(f"cannot read token ids from {path}: {e}") from None
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        names = list(loaded.files)
        if "input_ids" not in names and len(names) != 1:
            raise BadOptionError(f"{path} holds {', '.join(names)}: name the token ids "
                                 f"'input_ids'")
        return loaded["input_ids" if "input_ids" in names else names[0]]


def _token_ids(data, tokenizer) -> list[np.ndarray]:
    if isinstance(data, str):
        data = [data]
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        data = [data] if data.ndim == 1 else list(data)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (int, np.integer)):
        data = [data]                                  # one sequence as a flat list
    out = []
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise BadOptionError("texts need a tokenizer (tokenizer=...), or pass token ids")
            enc = tokenizer(item)
            item = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        arr = np.asarray(item.detach().cpu().numpy() if hasattr(item, "detach") else item)
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
            raise BadOptionError(f"token ids must be integer sequences (1-D, or 2-D rows), got "
                                 f"shape {arr.shape} of {arr.dtype}")
        out += [row.astype(np.int64) for row in arr.reshape(-1, arr.shape[-1]) if row.size >= 2]
    if not out:
        raise BadOptionError("perplexity needs at least one sequence of two or more tokens")
    return out


def _windows(seq: np.ndarray, window: int, stride: int) -> list[tuple[np.ndarray, int]]:
    """(tokens of the window, index in it of the first token to score) for one sequence."""
    out, scored_to = [], 1                       # the first token is never predicted
    for begin in range(0, len(seq), stride):
        end = min(begin + window, len(seq))
        out.append((seq[begin:end], max(scored_to - begin, 1)))
        scored_to = end
        if end == len(seq):
            break
    return out


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log softmax(logits)[target] over rows, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def _runner(model, pad_id: int) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray],
                                         int | None, int | None]:
    """(``(ids, mask) -> logits [batch, positions, vocabulary]``, fixed sequence length or None,
    fixed batch size or None) for a torch module or an ONNX model."""
    try:
        import torch
        is_torch = isinstance(model, torch.nn.Module)
    except ImportError:
        is_torch = False
    if is_torch:
        return _torch_runner(model), None, None
    return _onnx_runner(model)


def _torch_runner(model):
    import torch

    from sparsec.frontends.torch import first_tensor

    hf = hasattr(model, "config") and hasattr(model, "generate")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(ids).to(device)
        with torch.no_grad():
            if hf:
                out = model(input_ids=t, attention_mask=torch.from_numpy(mask).to(device),
                            use_cache=False)
            else:
                out = model(t)
        return first_tensor(out).float().cpu().numpy()

    return run


def _onnx_runner(model):
    import onnx

    from sparsec import reference
    from sparsec.ir.graph import Graph

    if isinstance(model, (str, os.PathLike)):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(os.fspath(model), opts, providers=["CPUExecutionProvider"])
    elif isinstance(model, (Graph, onnx.ModelProto)):
        sess = reference.session(model)
    else:
        raise BadOptionError(f"perplexity takes a torch module or an ONNX model (path, "
                             f"ModelProto, sparsec Graph), not {type(model).__name__}")
    inputs = {i.name: i for i in sess.get_inputs()}
    ids_name = "input_ids" if "input_ids" in inputs else next(iter(inputs))
    unknown = sorted(set(inputs) - {ids_name, "attention_mask", "position_ids"})
    if unknown:
        raise BadOptionError(f"perplexity feeds input_ids, attention_mask and position_ids; "
                             f"the model also wants {', '.join(unknown)}")
    outputs = [o.name for o in sess.get_outputs()]
    logits_name = "logits" if "logits" in outputs else outputs[0]
    shape = inputs[ids_name].shape
    fixed_batch = shape[0] if len(shape) == 2 and isinstance(shape[0], int) else None
    fixed_len = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds: dict[str, Any] = {ids_name: ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = mask
        if "position_ids" in inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
        for name, value in list(feeds.items()):
            if "int32" in inputs[name].type:
                feeds[name] = value.astype(np.int32)
        out = sess.run([logits_name], feeds)[0]
        if out.ndim != 3 or out.shape[:2] != ids.shape:
            raise BadOptionError(f"output '{logits_name}' has shape {list(out.shape)}, not "
                                 f"[batch, positions, vocabulary] logits")
        return out

    return run, fixed_len, fixed_batch


__all__ = ["Perplexity", "perplexity", "read_token_ids"]
