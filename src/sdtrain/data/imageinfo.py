"""Image size and EXIF orientation from file headers only (never decoding pixels), plus cheap
corruption checks, so a dataset plan of thousands of images takes seconds.

EXIF decision (sdtrain differs from the reference, which ignores EXIF): a phone photo stored
landscape with "rotate 90" in its EXIF is trained upright, exactly as every image viewer shows it.
So the planned size is the size after orientation: orientations 5-8 swap width and height, and the
pixel loader applies the same transpose (`ImageEntry.exif_transpose`). The orientation is read
where PIL's `ImageOps.exif_transpose` looks for it: the EXIF block (JPEG APP1, PNG eXIf, WebP EXIF)
and, when EXIF has no orientation, the XMP packet's tiff:Orientation.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from sdtrain.data.items import Size

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# JPEG start-of-frame markers (not DHT C4, JPG C8, DAC CC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_XMP_ORIENTATION = re.compile(rb"tiff:Orientation(?:=\"|>)\s*(\d)")
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"


class UnreadableImage(Exception):
    """A file that cannot be used as a training image; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """Header facts of one image. `size` is (W, H) after EXIF orientation (what training sees)."""

    size: Size
    stored_size: Size
    orientation: int = 1  # EXIF orientation 1..8; 5-8 swap the sides
    format: str = ""

    @property
    def transposed(self) -> bool:
        """True when loading must apply an EXIF transpose (any orientation other than 1)."""
        return self.orientation != 1


def _exif_orientation(tiff: bytes) -> int | None:
    """Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block, if present."""
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    endian = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(endian + "I", tiff, 4)
        (count,) = struct.unpack_from(endian + "H", tiff, ifd)
        for i in range(count):
            tag, kind, _n = struct.unpack_from(endian + "HHI", tiff, ifd + 2 + 12 * i)
            if tag == 0x0112:
                fmt = endian + ("H" if kind == 3 else "I" if kind == 4 else "B")
                (value,) = struct.unpack_from(fmt, tiff, ifd + 2 + 12 * i + 8)
                return value if 1 <= value <= 8 else None
    except struct.error:
        return None
    return None


def _xmp_orientation(xmp: bytes) -> int | None:
    found = _XMP_ORIENTATION.search(xmp)
    value = int(found.group(1)) if found else 0
    return value if 1 <= value <= 8 else None


def _jpeg(f, file_size: int) -> tuple[Size, int, int]:
    """(stored size, orientation, offset of the first scan) of a JPEG; raises on broken headers."""
    f.seek(2)
    size: Size | None = None
    orientation: int | None = None
    xmp: int | None = None
    while True:
        byte = f.read(1)
        if byte != b"\xff":
            raise UnreadableImage(
                "truncated JPEG (ends inside the header)"
                if not byte
                else "broken JPEG header (marker expected)"
            )
        while byte == b"\xff":  # fill bytes may precede a marker
            byte = f.read(1)
        if not byte:
            raise UnreadableImage("truncated JPEG (ends inside the header)")
        marker = byte[0]
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise UnreadableImage("broken JPEG (ends before any image data)")
        head = f.read(2)
        if len(head) < 2:
            raise UnreadableImage("truncated JPEG (ends inside the header)")
        length = struct.unpack(">H", head)[0] - 2
        start = f.tell()
        if marker in _SOF:
            data = f.read(5)
            if len(data) < 5:
                raise UnreadableImage("truncated JPEG (ends inside the header)")
            height, width = struct.unpack(">HH", data[1:5])
            size = (width, height)
        elif marker == 0xE1 and (orientation is None or xmp is None):
            data = f.read(length)
            if data.startswith(b"Exif"):
                orientation = _exif_orientation(data)
            elif data.startswith(_XMP_JPEG):
                xmp = _xmp_orientation(data)
        elif marker == 0xDA:
            if size is None:
                raise UnreadableImage("broken JPEG (no frame header before the image data)")
            return size, orientation or xmp or 1, start
        f.seek(start + length)
        if start + length > file_size:
            raise UnreadableImage("truncated JPEG (ends inside the header)")


def _jpeg_complete(f, file_size: int, scan_start: int) -> bool:
    """True when the end-of-image marker is present after the first scan."""
    f.seek(max(scan_start, file_size - 64))
    if f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return True
    # Data after the image (e.g. a phone's "motion photo" video) moves EOI away from the end.
    # Entropy-coded data stuffs every 0xFF with 0x00, so the first FF D9 after the scan is EOI.
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return mapped.find(b"\xff\xd9", scan_start) != -1


def _png(f, file_size: int) -> tuple[Size, int]:
    """Walk PNG chunks by their lengths (no pixel data read) up to IEND."""
    f.seek(8)
    size: Size | None = None
    orientation: int | None = None
    xmp: int | None = None
    position = 8
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableImage("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", f.read(8))
            size = (width, height)
        elif kind == b"eXIf":
            orientation = _exif_orientation(f.read(length))
        elif kind == b"iTXt" and length < 1 << 20:
            data = f.read(length)
            if data.startswith(b"XML:com.adobe.xmp\x00"):
                xmp = _xmp_orientation(data)
        elif kind == b"IEND":
            if size is None:
                raise UnreadableImage("broken PNG (no IHDR chunk)")
            return size, orientation or xmp or 1
        position += 12 + length
        if position > file_size:
            raise UnreadableImage("truncated PNG (a chunk runs past the end of the file)")
        f.seek(position)


def _webp(f, file_size: int) -> tuple[Size, int]:
    f.seek(0)
    head = f.read(12)
    (riff_size,) = struct.unpack("<I", head[4:8])
    if 8 + riff_size > file_size:
        raise UnreadableImage("truncated WebP (shorter than its RIFF header says)")
    size: Size | None = None
    orientation: int | None = None
    xmp: int | None = None
    position = 12
    end = 8 + riff_size
    while position + 8 <= end:
        f.seek(position)
        kind, length = struct.unpack("<4sI", f.read(8))
        if kind == b"VP8X":
            data = f.read(10)
            width = 1 + int.from_bytes(data[4:7], "little")
            height = 1 + int.from_bytes(data[7:10], "little")
            size = (width, height)
        elif kind == b"VP8 " and size is None:
            data = f.read(10)
            if data[3:6] != b"\x9d\x01\x2a":
                raise UnreadableImage("broken WebP (bad VP8 frame header)")
            width, height = struct.unpack("<HH", data[6:10])
            size = (width & 0x3FFF, height & 0x3FFF)
        elif kind == b"VP8L" and size is None:
            data = f.read(5)
            if data[:1] != b"\x2f":
                raise UnreadableImage("broken WebP (bad VP8L header)")
            bits = int.from_bytes(data[1:5], "little")
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        elif kind == b"EXIF":
            orientation = _exif_orientation(f.read(length))
        elif kind == b"XMP ":
            xmp = _xmp_orientation(f.read(length))
        position += 8 + length + (length & 1)
    if size is None:
        raise UnreadableImage("broken WebP (no image chunk)")
    return size, orientation or xmp or 1


def _bmp(f, file_size: int) -> Size:
    f.seek(0)
    head = f.read(54)
    if len(head) < 26:
        raise UnreadableImage("truncated BMP header")
    offset, dib = struct.unpack_from("<II", head, 10)
    if dib == 12:
        width, height = struct.unpack_from("<HH", head, 18)
        bpp, compression = struct.unpack_from("<H", head, 24)[0], 0
    else:
        if len(head) < 34:
            raise UnreadableImage("truncated BMP header")
        width, height, _planes, bpp, compression = struct.unpack_from("<iiHHI", head, 18)
    height = abs(height)
    if compression in (0, 3) and bpp:
        stride = (bpp * width + 31) // 32 * 4
        if offset + stride * height > file_size:
            raise UnreadableImage("truncated BMP (pixel data shorter than its header says)")
    return width, height


def _with_pil(path: Path) -> tuple[Size, int, str]:
    """Fallback for files whose content is not one of the parsed formats (lazy open, no decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size, int(image.getexif().get(0x0112, 1) or 1), str(image.format)
    except UnidentifiedImageError as exc:
        raise UnreadableImage("not an image file (unknown format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"unreadable image ({exc})") from exc


def read_image_info(path: Path) -> ImageInfo:
    """Size, orientation and format of `path` from its headers; UnreadableImage with a reason when
    the file is missing, empty, truncated (PNG without IEND, JPEG without EOI, short WebP/BMP) or
    not an image. Formats are recognised by content, not by file extension."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size == 0:
                raise UnreadableImage("empty file (0 bytes)")
            magic = f.read(16)
            try:
                if magic.startswith(b"\xff\xd8\xff"):
                    stored, orientation, scan = _jpeg(f, file_size)
                    if not _jpeg_complete(f, file_size, scan):
                        raise UnreadableImage("truncated JPEG (no end-of-image marker)")
                    fmt = "JPEG"
                elif magic.startswith(_PNG_SIG):
                    stored, orientation = _png(f, file_size)
                    fmt = "PNG"
                elif magic[:4] == b"RIFF" and magic[8:12] == b"WEBP":
                    stored, orientation = _webp(f, file_size)
                    fmt = "WEBP"
                elif magic[:2] == b"BM":
                    stored, orientation, fmt = _bmp(f, file_size), 1, "BMP"
                else:
                    stored, orientation, fmt = _with_pil(Path(path))
            except struct.error as exc:
                raise UnreadableImage("truncated or broken image header") from exc
    except FileNotFoundError as exc:
        raise UnreadableImage("file not found") from exc
    except IsADirectoryError as exc:
        raise UnreadableImage("is a folder, not an image file") from exc
    except PermissionError as exc:
        raise UnreadableImage("permission denied") from exc
    except OSError as exc:
        raise UnreadableImage(f"cannot read ({exc.strerror or exc})") from exc
    if stored[0] < 1 or stored[1] < 1:
        raise UnreadableImage(f"image has no pixels ({stored[0]}x{stored[1]})")
    swapped = orientation in (5, 6, 7, 8)
    size = (stored[1], stored[0]) if swapped else stored
    return ImageInfo(size=size, stored_size=stored, orientation=orientation, format=fmt)
