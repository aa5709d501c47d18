#!/usr/bin/env python3
"""Copy index.html into progressista.py's INDEX_HTML, byte for byte.

The dashboard is edited as index.html; progressista.py must carry the same
bytes so that a copied progressista.py alone serves it (a test checks this).
"""
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent
page = (root / "index.html").read_text(encoding="utf-8")
if "'''" in page or page.endswith("\\"):
    sys.exit("index.html must not contain ''' (it is embedded in a raw string)")
source = (root / "progressista.py").read_text(encoding="utf-8")
start_marker, end_marker = "INDEX_HTML = r'''", "'''\nINDEX_HTML_BYTES"
start = source.index(start_marker) + len(start_marker)
end = source.index(end_marker, start)
(root / "progressista.py").write_text(source[:start] + page + source[end:], encoding="utf-8")
print("embedded %d bytes of index.html" % len(page.encode("utf-8")))
