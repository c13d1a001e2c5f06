"""Render the app icon (resources/icons/helix.svg) to PNGs and a multi-size Windows .ico with Qt.

Run: ``python -m helix_desktop.render_icons`` (works headless with QT_QPA_PLATFORM=offscreen).
"""

from __future__ import annotations

import struct
import sys

from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

from helix_desktop.paths import resource_path

PNG_SIZES = (32, 64, 256)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)


def render(renderer: QSvgRenderer, size: int) -> QImage:
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    return image


def png_bytes(image: QImage) -> bytes:
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    return bytes(data)


def ico_bytes(images: list[tuple[int, bytes]]) -> bytes:
    """An ICO holding PNG-compressed images (Windows Vista and later read these)."""
    header = struct.pack("<HHH", 0, 1, len(images))
    offset = len(header) + 16 * len(images)
    entries, blobs = b"", b""
    for size, blob in images:
        dim = 0 if size >= 256 else size  # 0 means 256 in the ICO directory
        entries += struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(blob), offset)
        blobs += blob
        offset += len(blob)
    return header + entries + blobs


def main() -> int:
    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 (keeps Qt alive)
    renderer = QSvgRenderer(str(resource_path("icons", "helix.svg")))
    if not renderer.isValid():
        raise SystemExit("resources/icons/helix.svg is missing or invalid")
    for size in PNG_SIZES:
        render(renderer, size).save(str(resource_path("icons", f"helix-{size}.png")))
    ico = ico_bytes([(size, png_bytes(render(renderer, size))) for size in ICO_SIZES])
    resource_path("icons", "helix.ico").write_bytes(ico)
    return 0


if __name__ == "__main__":
    sys.exit(main())
