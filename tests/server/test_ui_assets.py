"""The dashboard's pages and ``/docs`` as served (without a browser): every asset comes from
the server itself, a Content-Security-Policy forbids inline scripts, the Host allow-list
applies, and the vendored libraries carry their licences."""

from __future__ import annotations

import re

import pytest

from registry.server.ui import PAGES, STATIC
from tests.support import Server

PAGE_PATHS = [f"/ui/{path}" for path in PAGES] + ["/docs"]
REFERENCE = re.compile(r"""(?<![:\w])(?:src|href)=["']([^"']+)["']""")


@pytest.mark.parametrize("path", PAGE_PATHS)
async def test_pages_load_only_their_own_assets_under_a_strict_policy(
    server: Server, path: str
) -> None:
    async with server.http(api_key=None) as http:
        answer = await http.get(path)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith("text/html")
        policy = dict(
            part.strip().split(" ", 1)
            for part in answer.headers["content-security-policy"].split(";")
        )
        assert policy["script-src"] == "'self'"  # no inline script, no eval, no other origin
        assert policy["default-src"] == "'none'"
        assert policy["frame-ancestors"] == "'none'"
        assert answer.headers["x-content-type-options"] == "nosniff"
        html = answer.text
        assert "<script>" not in html  # every script is a file
        references = REFERENCE.findall(html)
        assert references
        for reference in references:
            assert reference.startswith(("/", "#")), reference
            assert not reference.startswith("//"), reference
            if reference.startswith("/ui/static/"):
                asset = await http.get(reference)
                assert asset.status_code == 200, reference
                assert len(asset.content) > 0


async def test_no_template_or_script_names_another_origin() -> None:
    ours = [
        file
        for file in STATIC.parent.rglob("*")
        if file.is_file() and "vendor" not in file.parts and file.suffix in {".html", ".js", ".css"}
    ]
    assert len(ours) >= 8
    for file in ours:
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", file.read_text()), file


def test_vendored_libraries_carry_their_licences() -> None:
    vendor = STATIC / "vendor"
    for library in ("alpine", "chartjs", "swagger-ui"):
        licence = (vendor / library / "LICENSE").read_text()
        assert "Permission is hereby granted" in licence or "Apache License" in licence
    versions = (vendor / "VERSIONS").read_text().split()
    assert {"@alpinejs/csp", "chart.js", "swagger-ui-dist"} <= set(versions)


async def test_the_host_allow_list_guards_the_pages_too(server: Server) -> None:
    async with server.http(api_key=None) as http:
        for path in ("/ui/", "/ui/static/dashboard.js", "/docs"):
            answer = await http.get(path, headers={"Host": "attacker.example"})
            assert answer.status_code == 400, path


async def test_pages_change_nothing_and_take_no_other_method(server: Server) -> None:
    async with server.http(api_key=None) as http:
        for path in ("/ui/", "/ui/clients", "/docs"):
            assert (await http.post(path)).status_code == 405, path
        redirect = await http.get("/ui", follow_redirects=False)
        assert redirect.status_code == 307
        assert redirect.headers["location"] == "/ui/"
