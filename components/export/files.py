"""The files of an exported graph: `<name>.onnx` (fp32) and `<name>.fp16.onnx`, each with its
weights inside, or beside it in one `<file>.data` when they pass 2 GB."""

from __future__ import annotations

from pathlib import Path

# Protobuf cannot hold a message over 2 GiB: larger graphs keep their weights beside them in
# one `<name>.onnx.data` file (the released UNet: 3.4 GB in fp32).
EXTERNAL_DATA_BYTES = 2_000_000_000


def graph_files(folder: Path, name: str, fp16: bool = False) -> list[Path]:
    """The files of one graph: the graph and, when it has one, its external data file."""
    stem = f"{name}.fp16" if fp16 else name
    return [p for p in (folder / f"{stem}.onnx", folder / f"{stem}.onnx.data") if p.is_file()]


def graph_bytes(folder: Path, name: str, fp16: bool = False) -> int:
    return sum(p.stat().st_size for p in graph_files(folder, name, fp16))


def save_graph(proto, path: Path, weight_bytes: int) -> bool:
    """One file, or the graph plus one `<name>.onnx.data` when the weights pass 2 GB."""
    import onnx

    external = weight_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return external
