"""What a request to ``rp2k serve`` may carry, checked before any model work: pure functions
of (content type, body), so every refusal is testable without Ray.

``POST /predict`` takes either one image as the raw body (``Content-Type: image/jpeg`` or
``image/png``; also ``image/webp``, ``image/bmp``, the formats ``rp2k predict`` reads) or
``multipart/form-data`` with one or more file parts (any field name; each part's own content
type must be one of those, or ``application/octet-stream``). A refusal is a
:class:`RequestError` with the HTTP status and a JSON body ``{"error": CODE, "detail": TEXT}``:

=====================  ======  ===========================================================
code                   status  when
=====================  ======  ===========================================================
``empty``              400     no body, or an empty image part
``not_an_image``       400     the bytes are no image the decoder reads (also truncated files)
``bad_multipart``      400     a multipart body that cannot be parsed
``no_images``          400     a multipart body without any file part
``too_large``          413     the body or one image over the byte cap
``too_many_images``    413     more images than the per-request cap
``too_many_pixels``    413     an image over the pixel cap (a decompression bomb)
``wrong_content_type`` 415     a body that is neither an image type nor multipart
``no_sku``             400     ``POST /gallery`` naming no SKU
``unauthorized``       401     ``POST /gallery`` without the right token
``gallery_read_only``  403     ``POST /gallery`` to a server started without a token
``no_gallery``         409     ``POST /gallery`` to a server without a gallery
=====================  ======  ===========================================================

Multipart parsing uses the standard library's :mod:`email` parser (RFC 7578 bodies are MIME
multipart), so no form-parsing dependency is needed beyond Ray Serve's own.
"""

from __future__ import annotations

import email.parser
import email.policy
import struct
from dataclasses import dataclass

from ..errors import RequestError

#: Content types of an image body or part (what ``rp2k predict`` decodes).
IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp"})
#: A part that names no image type is accepted as bytes to decode (curl -F without ;type=).
GENERIC_TYPES = frozenset({"application/octet-stream", ""})
#: Defaults of ``rp2k serve``'s caps (flags override them).
MAX_BYTES = 16 * 1024 * 1024  # one request's body
MAX_IMAGES = 32  # images of one request
MAX_PIXELS = 40_000_000  # one image's width x height (PIL warns at 89 M)


@dataclass(frozen=True)
class Limits:
    """The caps one request is checked against."""

    max_bytes: int = MAX_BYTES
    max_images: int = MAX_IMAGES
    max_pixels: int = MAX_PIXELS


def media_type(content_type: str | None) -> str:
    """``"image/JPEG; q=1"`` -> ``"image/jpeg"``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _check_size(data: bytes, limits: Limits, what: str) -> None:
    if not data:
        raise RequestError(400, "empty", f"{what} is empty: send the bytes of a JPEG or PNG image")
    if len(data) > limits.max_bytes:
        raise RequestError(413, "too_large", f"{what} has {len(data)} bytes, the limit is {limits.max_bytes}")


def parse_images(content_type: str | None, body: bytes, limits: Limits = Limits()) -> list[bytes]:
    """The image files of a ``POST /predict`` body, in order; :class:`RequestError` otherwise.
    Only framing, sizes and counts are checked here; :func:`check_pixels` and the decoder
    check each image's content."""
    kind = media_type(content_type)
    if not body:
        raise RequestError(400, "empty", "the request has no body: send an image, or multipart/form-data "
                                         "with image files")
    _check_size(body, limits, "the request body")
    if kind in IMAGE_TYPES or (kind in GENERIC_TYPES and kind):
        return [body]
    if kind != "multipart/form-data":
        raise RequestError(415, "wrong_content_type",
                           f"content type {kind or '(none)'!r} is not accepted: use image/jpeg, image/png "
                           "or multipart/form-data")
    images = multipart_files(content_type or "", body)
    if not images:
        raise RequestError(400, "no_images", "the multipart body holds no file part")
    if len(images) > limits.max_images:
        raise RequestError(413, "too_many_images",
                           f"{len(images)} images in one request, the limit is {limits.max_images}")
    for n, (part_type, data) in enumerate(images, 1):
        if part_type not in IMAGE_TYPES and part_type not in GENERIC_TYPES:
            raise RequestError(415, "wrong_content_type", f"part {n} has content type {part_type!r}: "
                                                          "not an image type")
        _check_size(data, limits, f"image {n}")
    return [data for _, data in images]


def multipart_files(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(media type, bytes) of each part with a file name (or an image content type) of a
    ``multipart/form-data`` body."""
    if "boundary=" not in content_type:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise RequestError(400, "bad_multipart", "the multipart body cannot be parsed")
    files = []
    for part in message.iter_parts():
        part_type = media_type(part.get_content_type() if part.get("Content-Type") else "")
        if part.get_filename() is None and part_type not in IMAGE_TYPES:
            continue  # a plain form field
        files.append((part_type, part.get_payload(decode=True) or b""))
    return files


def form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The plain (non-file) fields of a ``multipart/form-data`` body."""
    if media_type(content_type) != "multipart/form-data" or "boundary=" not in content_type:
        return {}
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields = {}
    for part in message.iter_parts() if message.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name and part.get_filename() is None:
            fields[str(name)] = (part.get_payload(decode=True) or b"").decode("utf-8", "replace").strip()
    return fields


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding, None when unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return width, height
            i += 2 + length
    return None


def check_pixels(data: bytes, limits: Limits = Limits(), n: int = 1) -> None:
    """Refuse an image whose header declares more than ``limits.max_pixels`` pixels
    (decoding it would take the replica's memory); other formats are checked by PIL's own
    decompression-bomb limit while decoding."""
    size = image_size(data)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise RequestError(413, "too_many_pixels", f"image {n} is {size[0]} x {size[1]} pixels, the limit is "
                                                   f"{limits.max_pixels} pixels")


def check_token(expected: str | None, authorization: str | None) -> None:
    """``POST /gallery`` needs ``Authorization: Bearer <token>`` matching the server's; a
    server started without a token refuses every add."""
    import hmac

    if not expected:
        raise RequestError(403, "gallery_read_only", "this server takes no gallery adds: start it with "
                                                     "RP2K_SERVE_TOKEN set (or --token-file)")
    given = (authorization or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(401, "unauthorized", "POST /gallery needs the header Authorization: Bearer <token>")
