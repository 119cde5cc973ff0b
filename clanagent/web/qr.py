"""The join token as a QR code, made in the agent (the page fetches nothing).

Owns: `qr_svg_uri`, one QR code as an SVG data URI (an <img> shows it under the
console's CSP, which allows `img-src data:`) (segno: a small pure-Python
encoder with no dependencies, ISO/IEC 18004 complete, used instead of an
encoder of our own), black on white with the standard quiet zone so that a
phone or zbar reads it from a screen.
Must never: fetch anything, or encode anything but the text it is given.
"""

from __future__ import annotations

import segno

__all__ = ["qr_svg_uri"]


def qr_svg_uri(text: str, *, scale: int = 4) -> str:
    """One QR code for `text` (error correction M) as a data: URI of SVG."""
    code = segno.make_qr(text, error="m", boost_error=False)
    return code.svg_data_uri(scale=scale, border=4, dark="#000", light="#fff")
