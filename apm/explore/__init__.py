"""``apm explore``: one self-contained HTML page in which a person points at a pixel of a
photograph and sees the island that holds it at every level, teacher beside student.

``maps`` computes what the page shows (k-means islands per source, level and k; their agreement;
their scores against ground truth), ``page`` packs it into the HTML file (label maps as run-length
arrays, the photograph as a data URI) around ``template.html`` and ``explore.js``, the page's
whole code, which reads nothing from outside the file.
"""

from apm.explore.maps import ExplorePlan, photo_entry
from apm.explore.page import render_page, rle_decode, rle_encode, write_page

__all__ = ["ExplorePlan", "photo_entry", "render_page", "rle_decode", "rle_encode", "write_page"]
