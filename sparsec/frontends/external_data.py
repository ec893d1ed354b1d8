"""ONNX files whose weights live in external data files, in and out.

Protobuf cannot serialize a message over 2 GB, so a large model keeps its tensors in a
companion file that the .onnx names (``TensorProto.external_data``). Reading: ``onnx.load``
with the model's directory as the base (``frontends.onnx.read_model`` reads the graph first,
checks the file by its path, and loads the weights last). Writing: :func:`save_onnx`, over a
size threshold. In between, the steps that serialize a whole model (shape inference, an ONNX
Runtime session) do so without the weights when the model is over :data:`PROTOBUF_LIMIT`
(:func:`without_weights`, ``reference.session``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from sparsec.errors import BadOptionError

#: what one protobuf message can hold, less a margin for the graph around the weights
PROTOBUF_LIMIT = 2**31 - 2**26
#: an ONNX file whose weights are larger than this is written with its weights in a companion
#: file, ``NAME.data`` (protobuf cannot hold a model over 2 GB in one message); the
#: environment variable ``SPARSEC_EXTERNAL_DATA_BYTES`` sets another threshold (0: always)
EXTERNAL_DATA_BYTES = 3 * 2**29          # 1.5 GiB
#: tensors smaller than this stay inside the .onnx file even when the weights go out
EXTERNAL_DATA_MIN_TENSOR = 1024


def external_data_threshold() -> int:
    value = os.environ.get("SPARSEC_EXTERNAL_DATA_BYTES")
    if value is None:
        return EXTERNAL_DATA_BYTES
    try:
        return int(value)
    except ValueError:
        raise BadOptionError(f"SPARSEC_EXTERNAL_DATA_BYTES must be a number of bytes, not "
                             f"'{value}'") from None


def weight_bytes(model) -> int:
    """Bytes of an ONNX model's initializers (what decides external data): their serialized
    size (``ByteSize``, which copies nothing), or for those in a data file the length there."""
    total = 0
    for t in model.graph.initializer:
        total += t.ByteSize()
        if t.data_location == t.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
    return total


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files an ONNX file names (none for a file that is not ONNX)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:   # noqa: BLE001 - not ONNX: the loader says so later
        return []
    base = Path(path).absolute().parent
    return sorted({base / e.value for t in model.graph.initializer
                   if t.data_location == t.EXTERNAL for e in t.external_data
                   if e.key == "location"})


def data_file(path: str | os.PathLike) -> Path:
    """Where :func:`save_onnx` puts the weights of a large model written to ``path``."""
    p = Path(path)
    return p.with_name(p.name + ".data")


def save_onnx(model, path: str | os.PathLike, threshold: int | None = None,
              weights=None) -> Path | None:
    """Write an ONNX model to ``path`` atomically; over ``threshold`` bytes of weights (by
    default :func:`external_data_threshold`; never more than protobuf holds), with every
    tensor of 1 KiB or more in ``NAME.data`` beside it (ONNX external data). Both files are
    written in a temp directory beside ``path`` and moved into place, the data first, so the
    .onnx never names a data file that is not there; a ``NAME.data`` left by an earlier,
    larger output is removed. ``model`` is left as it was. Returns the data file, or
    ``None``. ``weights``: the arrays of the placeholders of a ``reference.skeleton``, written
    from where they are (no second copy of a large model's weights)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    p = Path(path)
    data = data_file(p)
    if threshold is None:
        threshold = external_data_threshold()
    weights = weights or {}
    size = weight_bytes(model) + sum(a.nbytes for a in weights.values())
    external = size > min(threshold, PROTOBUF_LIMIT)
    parent = p.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", dir=parent))
    try:
        if weights:
            _save_skeleton(model, weights, tmp / p.name, data.name if external else None)
            if external:
                os.replace(tmp / data.name, data)
        elif external:
            try:
                onnx.save_model(model, str(tmp / p.name), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data.name,
                                size_threshold=EXTERNAL_DATA_MIN_TENSOR)
            finally:    # saving moved the weights out of ``model``: read them back in
                load_external_data_for_model(model, str(tmp))
            os.replace(tmp / data.name, data)
        else:
            (tmp / p.name).write_bytes(model.SerializeToString())
        os.replace(tmp / p.name, p)
        if not external:
            data.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data if external else None


def _save_skeleton(model, weights, path: Path, location: str | None) -> None:
    """A skeleton (``reference.skeleton``) to ``path``: with ``location``, its placeholders'
    arrays go one after another into that file beside it and the placeholders name their
    slices; without, into a copy of the model (small enough for one message)."""
    import numpy as np
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    offset = 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path.with_name(location), "wb")) if location else None
        for t in out.graph.initializer:
            if t.name not in weights:
                continue
            array = np.ascontiguousarray(weights[t.name])
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            del t.external_data[:]
            if f is None:
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = array.tobytes()
                continue
            f.write(memoryview(array).cast("B"))
            for key, value in (("location", location), ("offset", offset),
                               ("length", array.nbytes)):
                t.external_data.add(key=key, value=str(value))
            offset += array.nbytes
    path.write_bytes(out.SerializeToString())


def too_big(model) -> bool:
    """Whether ``model`` (weights in memory) is too large to serialize as one message."""
    return weight_bytes(model) > PROTOBUF_LIMIT


@contextlib.contextmanager
def without_weights(model) -> Iterator[None]:
    """Within the block, ``model``'s initializers of 1 KiB or more hold no data (their names,
    types and shapes stay), so that it serializes whatever its size: for shape inference,
    which reads shapes, and the values of small shape tensors only."""
    held = []
    for t in model.graph.initializer:
        if t.HasField("raw_data") and t.ByteSize() >= EXTERNAL_DATA_MIN_TENSOR:
            held.append((t, t.raw_data))
            t.ClearField("raw_data")
    try:
        yield
    finally:
        for t, data in held:
            t.raw_data = data


@contextlib.contextmanager
def saved_with_external_data(model) -> Iterator[Path]:
    """``model`` written to a temp directory with its weights as external data (whatever its
    size), for a reader that takes a path (ONNX Runtime, for a model over 2 GB)."""
    with tempfile.TemporaryDirectory(prefix="sparsec-onnx-") as work:
        path = Path(work) / "model.onnx"
        save_onnx(model, path, threshold=0)
        yield path
