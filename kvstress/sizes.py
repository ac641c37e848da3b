"""Memory sizes as people write and read them: `--max-memory 2GB` in, "1.23 GB" out. Torch-free."""

import re
from decimal import Decimal

# Unit → multiplier. Decimal units are powers of 1000, IEC units powers of 1024;
# the bare letters K/M/G/T follow the common command-line habit of meaning 1024^n.
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_FORMS = (
    "a number of bytes (1000000), decimal units KB/MB/GB/TB (2GB = 2*1000^3), "
    "binary units KiB/MiB/GiB/TiB or K/M/G/T (1.5GiB, 800M = 800*1024^2)"
)


def parse_size(text: str) -> int:
    """Parse a human size such as ``"2GB"``, ``"1.5 GiB"`` or ``"800M"`` into bytes.

    Raises ValueError naming the accepted forms when *text* is not a size.
    """
    match = _SIZE_PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: use {_SIZE_FORMS}")
    # Decimal keeps "1.5GiB" exact; a fraction of a byte is dropped.
    return int(Decimal(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | float | None) -> str:
    """Format a byte count with decimal units (``"1.23 GB"``); ``"–"`` when not measured."""
    if n is None:
        return "–"
    for unit, scale in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
