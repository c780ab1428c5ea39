"""Where a request's image comes from: a ``data:`` URI, or a local file under the operator's ``--image-root``.

Either way the bytes go through the web demo's reader (``tools.app.read_image``: size cap before parsing,
an allow-list of formats chosen by content, the pixel cap from the header before decoding), so the server
accepts exactly what the page accepts.  Nothing is fetched over the network.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from pathlib import Path

from blip2_internlm.tools.app import MEBIBYTE, PageLimits, Refused, read_image

DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def image_from_url(url: str, where: str, limits: PageLimits, image_root: Path | None):
    """The RGB image ``url`` names, or :class:`Refused` saying why not (``where`` names the request field)."""
    if url.startswith("data:"):
        return read_image(data_uri_bytes(url, where, limits), where, limits)
    if re.match(r"[a-z][a-z0-9+.-]*://", url, re.I) and not url.lower().startswith("file://"):
        raise Refused(f"{where}: only data: URIs and local files under --image-root are read, not {url[:40]!r}")
    path = local_path(url, where, image_root)
    try:
        size = path.stat().st_size
        if size > limits.max_upload_mb * MEBIBYTE:
            raise Refused(f"{where} is {size / MEBIBYTE:.1f} MB; the limit is {limits.max_upload_mb} MB.")
        data = path.read_bytes()
    except OSError as err:
        raise Refused(f"{where}: {url[:200]} could not be read ({type(err).__name__})") from None
    return read_image(data, where, limits)


def data_uri_bytes(url: str, where: str, limits: PageLimits) -> bytes:
    """The bytes of a base64 ``data:`` URI; the encoded length is checked against the size limit first."""
    match = DATA_URI.match(url)
    if not match or not match["b64"]:
        raise Refused(f"{where}: a data URI must be data:image/<format>;base64,<data>")
    if match["type"] and not match["type"].lower().startswith("image/"):
        raise Refused(f"{where}: a data URI of type {match['type']}, not an image")
    encoded = url[match.end() :]
    if len(encoded) * 3 // 4 > limits.max_upload_mb * MEBIBYTE + 2:
        raise Refused(f"{where} is {len(encoded) * 3 / 4 / MEBIBYTE:.1f} MB; the limit is {limits.max_upload_mb} MB.")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(f"{where}: the data URI's data is not valid base64") from None


def local_path(url: str, where: str, image_root: Path | None) -> Path:
    """The file ``url`` (``file://...`` or a path, relative ones from the root) names, once resolved (symlinks
    and ``..`` followed) it lies inside ``image_root``; :class:`Refused` otherwise, or without a root."""
    if image_root is None:
        raise Refused(f"{where}: local files are not served (the server was started without --image-root)")
    if url.lower().startswith("file://"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise Refused(f"{where}: a file URL on another host ({parsed.netloc})")
        url = urllib.parse.unquote(parsed.path)
    root = image_root.resolve()
    path = Path(os.path.join(root, url)).resolve()  # an absolute url replaces the root
    if not path.is_relative_to(root):
        raise Refused(f"{where}: {url[:200]} is outside the image root")
    if not path.is_file():
        raise Refused(f"{where}: no such file under the image root: {url[:200]}")
    return path
