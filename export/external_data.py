"""ONNX files of any size: where a graph's weights go, decided without serializing it, and written by streaming.

Protobuf cannot serialize a message past 2 GiB (``ModelProto.ByteSize`` itself fails there), so the size of a
graph is the sum of its weights' bytes, read off each initializer (its bytes in memory, or the length its
external-data entry records) and off tensor-valued Constant nodes. A graph whose weights pass ``LIMIT`` keeps
them in one ``NAME.onnx.data`` file beside it: each initializer's bytes are appended in turn, from memory or
copied in chunks from the file the exporter wrote them to, so no second copy of the weights is ever held; the
``.onnx`` file then holds the graph and the offsets. onnx's own ``save_model(save_as_external_data=True)``
needs every tensor in memory first, which is what this avoids.
"""

from __future__ import annotations

from pathlib import Path

LIMIT = 1_800_000_000  # weights' bytes above which a graph keeps them in NAME.onnx.data (protobuf: 2 GiB in all)
INLINE_BYTES = 1024  # smaller tensors stay in the graph file (shapes, scalars)
ALIGN = 1 << 16  # offsets of large tensors in the data file: the allocation granularity mmap wants
_CHUNK = 1 << 26


def tensor_bytes(tensor) -> int:
    """The bytes of an initializer's values, wherever they are stored, without copying them."""
    from onnx import external_data_helper, helper

    if external_data_helper.uses_external_data(tensor):
        info = external_data_helper.ExternalDataInfo(tensor)
        if info.length:
            return int(info.length)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weights_bytes(model) -> int:
    """The bytes of ``model``'s initializers and tensor-valued Constant nodes: what decides its file layout."""
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(tensor_bytes(a.t) for a in node.attribute if a.name == "value")
    return total


def save(model, path: Path, source_dir: Path | None = None, limit: int | None = None) -> str | None:
    """Write ``model`` to ``path``; returns the name of its data file, or None when its weights stay inside
    (up to ``limit`` bytes, default ``LIMIT``). ``source_dir``: where tensors the exporter stored as external
    data are read from (their relative paths)."""
    import onnx

    if weights_bytes(model) <= (LIMIT if limit is None else limit):
        if source_dir is not None and any(_is_external(t) for t in model.graph.initializer):
            onnx.load_external_data_for_model(model, str(source_dir))
        onnx.save_model(model, str(path))
        return None
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if tensor_bytes(tensor) >= INLINE_BYTES or _is_external(tensor):
                _append(tensor, data, data_name, source_dir)
    onnx.save_model(model, str(path))
    return data_name


def _is_external(tensor) -> bool:
    from onnx import external_data_helper

    return external_data_helper.uses_external_data(tensor)


def _append(tensor, data, data_name: str, source_dir: Path | None) -> None:
    """Move one tensor's bytes to the end of ``data`` (aligned) and point the tensor there."""
    from onnx import TensorProto, external_data_helper, numpy_helper

    if data.tell() % ALIGN and tensor_bytes(tensor) >= ALIGN:
        data.write(b"\0" * (ALIGN - data.tell() % ALIGN))
    offset = data.tell()
    if _is_external(tensor):
        info = external_data_helper.ExternalDataInfo(tensor)
        if source_dir is None:
            raise ValueError(f"initializer {tensor.name!r} is stored in {info.location}, but no folder was given")
        with open(Path(source_dir) / info.location, "rb") as source:
            source.seek(info.offset or 0)
            left = info.length if info.length else None
            while left is None or left > 0:
                chunk = source.read(_CHUNK if left is None else min(_CHUNK, left))
                if not chunk:
                    break
                data.write(chunk)
                left = None if left is None else left - len(chunk)
        del tensor.external_data[:]
    else:
        payload = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
        data.write(payload)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                      "string_data"):  # fmt: skip
            tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", offset), ("length", data.tell() - offset)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
