"""The moderator console in a real browser: Debian's chromium, driven headless by Playwright.

One browser for the module, a fresh gateway and database per test. Without /usr/bin/chromium
(`apt-get install chromium`; .ci/run installs it) these tests skip, saying so.

Screenshots of every page are taken here too; with CONSOLE_SCREENSHOTS=docs/console they are
written where the README shows them (`CONSOLE_SCREENSHOTS=docs/console ./dev test
tests/test_console_browser.py -k screenshots`).
"""

from __future__ import annotations

import csv
import io
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.settings import Settings, settings_from
from tests.conftest import _admin, database_dsn, run_sync
from tests.consoles import ADMIN_TOKEN, CONSOLE, add_operators, admin, seed
from tests.servers import run_app
from tests.upstream import MockUpstream

CHROMIUM = Path("/usr/bin/chromium")
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=390, height=844)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium: apt-get install chromium (.ci/run does)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def database(pg_server_dsn: str, template_database: str) -> Iterator[str]:
    """This test's fresh database, made without an event loop in this thread: Playwright's sync
    API keeps one running here, where pytest-asyncio's fixtures could not start theirs."""
    name = f"gw_{secrets.token_hex(8)}"
    run_sync(_admin(pg_server_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    try:
        yield database_dsn(pg_server_dsn, name)
    finally:
        run_sync(_admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def settings(database: str, data_dir: Path, upstream: MockUpstream) -> Settings:
    return settings_from(
        database_url=database,
        data_dir=data_dir,
        moderation="rules",
        admin_token=ADMIN_TOKEN,
        upstream_url=upstream.url,
        max_strikes=3,
        block_seconds=60,
        db_pool_size=5,
        log_format="console",
    )


@pytest.fixture
def gateway(settings: Settings) -> Iterator[str]:
    with run_app(create_app(settings)) as url:
        seed(url)
        yield url


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
    context.set_default_timeout(10_000)
    opened = context.new_page()
    try:
        yield opened
    finally:
        context.close()


def sign_in(page: Page, url: str, token: str = ADMIN_TOKEN) -> None:
    page.goto(f"{url}{CONSOLE}/")
    expect(page).to_have_url(f"{url}{CONSOLE}/signin")
    page.get_by_label("Operator token").fill(token)
    page.keyboard.press("Enter")  # the keyboard is enough
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


def test_sign_in_find_a_blocked_user_and_unblock_with_a_reason(page: Page, gateway: str) -> None:
    sign_in(page, gateway)
    expect(page.locator("#blocked-now")).to_have_text("2")
    page.get_by_role("link", name="Users", exact=True).click()
    page.get_by_label("Show").select_option("yes")
    page.get_by_label("User id starts with").fill("zo")
    page.get_by_role("button", name="Search").click()
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(1)
    page.get_by_role("link", name="zoe").click()
    expect(page.locator("#blocked-state")).to_contain_text("until")
    first = page.locator("#timeline > li").first
    expect(first.locator(".tag")).to_have_text("block")

    page.get_by_label("Reason", exact=True).first.fill("Confirmed with the app owner")
    page.get_by_role("button", name="Unblock").click()
    expect(page.get_by_role("status")).to_have_text("The user is unblocked.")
    expect(page.locator("#blocked-state")).to_have_text("no")
    expect(first.locator(".tag")).to_have_text("unblock")
    expect(first).to_contain_text("Confirmed with the app owner")
    expect(first).to_contain_text("by admin")
    assert admin(gateway, "GET", "/users/zoe").json()["blocked"] is False


def test_decide_an_appeal(page: Page, gateway: str) -> None:
    sign_in(page, gateway)
    page.get_by_role("link", name="Appeals").first.click()
    card = page.locator("ol.appeals > li").first
    expect(card).to_contain_text("I was quoting a news story.")
    card.get_by_label("Reason").fill("A news quote, not a request.")
    card.get_by_role("button", name="Accept").click()
    expect(page.get_by_role("status")).to_have_text("The appeal is accepted: its event is reversed.")
    expect(page.locator("ol.appeals")).to_contain_text("No open appeals.")
    page.get_by_role("link", name="accepted").click()
    expect(page.locator("ol.appeals")).to_contain_text("Decided by admin: “A news quote, not a request.”")
    assert admin(gateway, "GET", "/users/zoe").json()["blocked"] is False


def test_a_viewer_cannot_unblock(page: Page, gateway: str, settings: Settings) -> None:
    tokens = add_operators(settings, {"vic": "viewer"})
    sign_in(page, gateway, tokens["vic"])
    page.goto(f"{gateway}{CONSOLE}/user?id=zoe")
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.get_by_role("button", name="Unblock")).to_have_count(0)
    # Sent anyway, with the session's own CSRF token, the unblock is refused for the role.
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(
        f"{gateway}{CONSOLE}/user/unblock",
        form={"user_id": "zoe", "reason": "I want to", "csrf": csrf or ""},
        headers={"Origin": gateway},
    )
    assert answer.status == 403
    assert "this needs moderator" in answer.text()
    assert admin(gateway, "GET", "/users/zoe").json()["blocked"] is True


def test_the_csv_download(page: Page, gateway: str) -> None:
    sign_in(page, gateway)
    page.get_by_role("link", name="Export").click()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    assert download.value.suggested_filename.startswith("events-")
    path = download.value.path()
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert {row["user_id"] for row in rows} == {"zoe", "yan", "xia"}
    assert [row["type"] for row in rows if row["user_id"] == "zoe"] == ["violation", "violation", "violation", "block"]


def test_sign_out(page: Page, gateway: str) -> None:
    sign_in(page, gateway)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(f"{gateway}{CONSOLE}/users")
    expect(page).to_have_url(f"{gateway}{CONSOLE}/signin")
    assert page.context.cookies() == []


def test_a_forged_form_post_is_refused(page: Page, gateway: str) -> None:
    """A page on another origin (another port of this host: the same site, so the cookie goes
    along) posts the unblock form with a made-up token: refused, and nothing changes."""

    async def forged(request: Request) -> HTMLResponse:
        return HTMLResponse(
            f'<form method="post" action="{gateway}{CONSOLE}/user/unblock">'
            '<input type="hidden" name="user_id" value="zoe"><input type="hidden" name="reason" value="pwned">'
            f'<input type="hidden" name="csrf" value="{"0" * 64}"><button>Win a prize</button></form>'
        )

    sign_in(page, gateway)
    with run_app(Starlette(routes=[Route("/", forged)]), lifespan="off") as attacker:
        page.goto(attacker)
        page.get_by_role("button", name="Win a prize").click()
        expect(page.get_by_role("alert")).to_contain_text("did not come from this console")
    assert admin(gateway, "GET", "/users/zoe").json()["blocked"] is True


def test_screenshots_of_every_page(browser: Browser, gateway: str, tmp_path: Path) -> None:
    """Each page at 1280x800, and the user page on a phone (390x844)."""
    target = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    shots = {
        "signin": "/signin",
        "overview": "/",
        "users": "/users",
        "user": "/user?id=zoe",
        "appeals": "/appeals",
        "export": "/export",
    }
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        page.goto(f"{gateway}{CONSOLE}{shots.pop('signin')}")
        page.screenshot(path=target / "signin.png")
        sign_in(page, gateway)
        for name, path in shots.items():
            page.goto(f"{gateway}{CONSOLE}{path}")
            page.screenshot(path=target / f"{name}.png", full_page=True)
        phone = context.new_page()
        phone.set_viewport_size(PHONE)
        for path in shots.values():
            phone.goto(f"{gateway}{CONSOLE}{path}")
            # Each page fits the phone's width: nothing scrolls sideways.
            assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], path
        phone.goto(f"{gateway}{CONSOLE}/user?id=zoe")
        phone.screenshot(path=target / "user-phone.png")
    finally:
        context.close()
    for name in ("signin", "overview", "users", "user", "appeals", "export", "user-phone"):
        assert (target / f"{name}.png").read_bytes().startswith(b"\x89PNG")
