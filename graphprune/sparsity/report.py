"""Measured sparsity per weight and overall, and file sizes raw and after generic compression."""

from __future__ import annotations

import os
import zlib
from typing import Dict, List, Mapping, Optional

import numpy as np

from graphprune.progress import progress_bar

__all__ = ["sparsity_row", "overall_sparsity", "file_sizes", "format_sparsity_report", "GZIP_LEVEL"]

# gzip's and zip's default level: what a deployment that zips its artifacts gets.
GZIP_LEVEL = 6
_CHUNK = 1 << 22


def sparsity_row(name: str, op_type: str, pattern: str, weight: np.ndarray) -> dict:
    """One layer's measured facts: zeros counted in the weight as written."""
    zeros = int(weight.size - np.count_nonzero(weight))
    return {
        "weight": name,
        "op_type": op_type,
        "pattern": pattern,
        "shape": [int(d) for d in weight.shape],
        "params": int(weight.size),
        "zeros": zeros,
        "sparsity": zeros / weight.size if weight.size else 0.0,
    }


def overall_sparsity(rows: List[dict]) -> float:
    """Zeros over parameters across ``rows``."""
    params = sum(r["params"] for r in rows)
    return sum(r["zeros"] for r in rows) / params if params else 0.0


def _compressed_size(paths: List[str], progress: bool) -> int:
    """Deflate-compressed size of the files concatenated (a gzip/zip of the model and its data)."""
    total = sum(os.path.getsize(p) for p in paths)
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    size = 0
    with progress_bar(total=total, desc="gzip size", enabled=progress, unit="B") as bar:
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    size += len(compressor.compress(chunk))
                    bar.update(len(chunk))
    return size + len(compressor.flush())


def file_sizes(path: str, progress: bool = False, gzip: bool = True) -> Dict[str, int]:
    """{"bytes": raw size, "gzip_bytes": gzip -6 size} of a model file and the data files it refers to.

    The gzip size reads and deflates every byte (seconds per 100 MB): ``gzip=False`` leaves it out.
    """
    from graphprune.model_io import model_files

    paths = model_files(path)
    sizes = {"bytes": sum(os.path.getsize(p) for p in paths)}
    if gzip:
        sizes["gzip_bytes"] = _compressed_size(paths, progress)
    return sizes


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def format_sparsity_report(stats: Mapping, sizes: Optional[Mapping[str, Mapping[str, int]]] = None, max_rows: int = 60) -> str:
    """The table ``graphprune sparsify`` prints: layers, skipped layers, overall, sizes (gzip when measured)."""
    layers = stats.get("layers", [])
    lines = [f"{'weight':<40} {'op':<13} {'pattern':<12} {'params':>10} {'sparsity':>9}"]
    for row in layers[:max_rows]:
        lines.append(f"{row['weight'][-40:]:<40} {row['op_type']:<13} {row['pattern']:<12} "
                     f"{row['params']:>10,} {row['sparsity'] * 100:>8.2f}%")
    if len(layers) > max_rows:
        lines.append(f"... {len(layers) - max_rows} more (see --report)")
    for skip in stats.get("skipped", []):
        lines.append(f"skipped {skip['op_type']} {skip['node']!r}: {skip['reason']}")
    lines.append(f"overall sparsity of sparsified weights: {stats.get('overall_sparsity', 0.0) * 100:.2f}% "
                 f"over {sum(r['params'] for r in layers):,} weights")
    if stats.get("storage") == "sparse":
        lines.append(f"compact storage: {len(stats.get('compacted', []))} weight(s)")
    if sizes:
        before, after = sizes.get("input"), sizes.get("output")
        for label, s in (("input", before), ("output", after)):
            if s:
                gz = f"   gzip {_mb(s['gzip_bytes']):>12}" if "gzip_bytes" in s else ""
                lines.append(f"{label:<6} file {_mb(s['bytes']):>12}{gz}")
        if before and after and after["bytes"]:
            gz = (f", {before['gzip_bytes'] / after['gzip_bytes']:.2f}x gzip"
                  if after.get("gzip_bytes") and "gzip_bytes" in before else "")
            lines.append(f"size reduction: {before['bytes'] / after['bytes']:.2f}x raw{gz}")
    return "\n".join(lines)
