"""The web pages over plain HTTP: served without the key, data behind it, assets shipped, the flag."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import httpx
import pytest

from nanovllm.serve.web import MEDIA_TYPES, PAGES, STATIC_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["/", "/dashboard", "/ui/chat.js", "/ui/dashboard.js", "/ui/style.css", "/ui/icon.svg"])
def test_pages_and_assets_load_without_the_key(server, path):
    r = httpx.get(server.url + path, timeout=30)
    assert r.status_code == 200, r.text
    suffix = Path(PAGES.get(path, path)).suffix
    assert r.headers["content-type"] == MEDIA_TYPES[suffix]
    # no inline script may run on these pages, whatever ends up in them
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/completions"), ("GET", "/docs")])
def test_data_calls_still_need_the_key(server, method, path):
    r = httpx.request(method, server.url + path, json={}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/ui/nothing.js", "/ui/..%2Fapp.py", "/ui/../app.py", "/ui/", "/ui/%2e%2e/web.py"])
def test_only_the_shipped_files_are_served(server, path):
    r = httpx.get(server.url + path, timeout=30)
    assert r.status_code in (401, 404)  # 401: the client normalized the path to one outside /ui/
    assert b"def " not in r.content and b"import" not in r.content  # no Python source leaks out


def test_every_page_references_only_shipped_assets():
    """No CDN, no build step: every src/href of the pages is one of the static files (or a page)."""
    names = {p.name for p in STATIC_DIR.iterdir()}
    for page in PAGES.values():
        html = (STATIC_DIR / page).read_text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert ref in PAGES or ref == "/metrics" or (ref.startswith("/ui/") and ref[4:] in names), (page, ref)
    for js in STATIC_DIR.glob("*.js"):
        for ref in re.findall(r'from "([^"]+)"', js.read_text()):
            assert ref.startswith("./") and ref[2:] in names, (js.name, ref)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_static_files_are_package_data():
    """`pip install .` must ship the pages: pyproject's package-data covers every static file."""
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["nanovllm.serve"]
    for path in STATIC_DIR.iterdir():
        rel = path.relative_to(STATIC_DIR.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"


def test_web_ui_flag():
    from nanovllm.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    assert parser.parse_args(["serve"]).web_ui is True  # on by default
    assert parser.parse_args(["serve", "--no-web-ui"]).web_ui is False  # tests/serve/test_no_tokenizer.py serves so
