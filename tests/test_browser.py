"""The session middleware in a real headless Chromium: log in, rotate, log out.

The application (Starlette behind :class:`SessionMiddleware`) runs in uvicorn
on 127.0.0.1 over TLS, with a self-signed certificate made for this test and
trusted by its key alone (``--ignore-certificate-errors-spki-list``), so the
``__Host-`` cookie is exercised exactly as in production. (Chromium 156 also
keeps ``Secure`` and ``__Host-`` cookies on ``http://localhost`` and
``http://127.0.0.1``; other browsers and older versions differ, which is why
the test does not rely on it.)

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/ensure-browser``
installs them); without them the test skips, and fails under ``CI=true``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from polybus.sessions import SessionManager
from polybus.sessions.middleware import CookieSigner, SessionMiddleware, session_of
from polybus.sessions.tokens import HMACKey, Keyring

CHROMIUM = os.environ.get("POLYBUS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("POLYBUS_CHROMEDRIVER", "/usr/bin/chromedriver")
COOKIE = "__Host-session"


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    reason = None
    if missing:
        reason = (
            f"{' and '.join(missing)} not installed: run scripts/ensure-browser "
            "(or apt-get install chromium chromium-driver)"
        )
    else:
        try:
            import selenium  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            reason = f"{exc.name} is not installed: pip install --group dev"
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)


def self_signed(directory: Path) -> tuple[Path, Path, str]:
    """A certificate for localhost and 127.0.0.1, its key, and the key's SPKI pin."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return cert_path, key_path, base64.b64encode(hashlib.sha256(spki).digest()).decode()


def make_app(manager: SessionManager, keys: Keyring) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, RedirectResponse
    from starlette.routing import Route

    async def home(request: Request) -> HTMLResponse:
        session = await session_of(request.scope).aload()
        if session.user_id is None:
            body = (
                '<form method="post" action="/login"><input id="user" name="user">'
                '<button id="login">Log in</button></form>'
            )
        else:
            body = (
                f'<p id="who">{html.escape(session.user_id)}</p>'
                '<form method="post" action="/rotate"><button id="rotate">Rotate</button></form>'
                '<form method="post" action="/logout"><button id="logout">Log out</button></form>'
            )
        return HTMLResponse(f"<!doctype html><title>polybus</title>{body}")

    async def login(request: Request) -> RedirectResponse:
        form = parse_qs((await request.body()).decode())
        session = session_of(request.scope)
        await session.aload()
        session.login(form["user"][0])
        return RedirectResponse("/", status_code=303)

    async def rotate(request: Request) -> RedirectResponse:
        session = session_of(request.scope)
        await session.aload()
        session.rotate()
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> RedirectResponse:
        session_of(request.scope).logout()
        return RedirectResponse("/", status_code=303)

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login, methods=["POST"]),
            Route("/rotate", rotate, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, manager=manager, keys=keys)],
    )


@dataclass
class Server:
    url: str
    manager: SessionManager
    keys: Keyring
    spki: str  #: base64 SHA-256 of the certificate's public key


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    require_browser()
    import uvicorn

    cert, key, spki = self_signed(tmp_path)
    manager = SessionManager(f"memory://browser-{os.getpid()}-{id(tmp_path)}")
    keys = Keyring(HMACKey.generate("cookie-1"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        make_app(manager, keys),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive(), "uvicorn stopped before it started serving"
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.02)
    yield Server(f"https://localhost:{port}", manager, keys, spki)
    uv.should_exit = True
    thread.join(timeout=10)
    manager.close()


@pytest.fixture
def browser(server: Server, tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--ignore-certificate-errors-spki-list={server.spki}",  # this test's key only
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def session_cookie(driver: Any) -> dict[str, Any] | None:
    return next((c for c in driver.get_cookies() if c["name"] == COOKIE), None)


def press(driver: Any, button_id: str) -> None:
    """Click a form's button and wait until the page it leads to has loaded."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    # The old document is marked, and the wait is for a complete document without the
    # mark. (Asking the old button whether it went stale races the navigation: the driver
    # may answer with a generic error for a node of a document being replaced.)
    driver.execute_script("document.polybusOld = true")
    driver.find_element(By.ID, button_id).click()
    WebDriverWait(driver, 20, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return !document.polybusOld && document.readyState === 'complete'"
        ),
        f"the page after pressing {button_id!r} to load",
    )


def test_v7_browser_logs_in_is_rotated_and_logs_out(server: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    assert browser.find_elements(By.ID, "login"), "an anonymous visitor sees the login form"
    assert session_cookie(browser) is None  # nothing stored, nothing set

    browser.find_element(By.ID, "user").send_keys("alice")
    press(browser, "login")
    assert browser.find_element(By.ID, "who").text == "alice"
    cookie = session_cookie(browser)
    assert cookie is not None, "the browser kept the __Host- cookie"
    # V3.3: what the browser itself recorded
    assert cookie["secure"] is True
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/"
    assert cookie["domain"] == "localhost"  # host-only: no Domain attribute was sent
    assert "expiry" not in cookie  # a browser-session cookie
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: hidden from JS
    signer = CookieSigner(server.keys)
    first_id = signer.unsign(cookie["value"])
    assert first_id is not None
    assert server.manager.load(first_id).user_id == "alice"

    press(browser, "rotate")
    assert browser.find_element(By.ID, "who").text == "alice"
    rotated = session_cookie(browser)
    assert rotated is not None
    assert rotated["value"] != cookie["value"]
    assert server.manager.load(first_id).is_new  # V7.2.4: the old id is dead

    press(browser, "logout")
    assert browser.find_elements(By.ID, "login"), "logged out: the login form again"
    assert session_cookie(browser) is None  # the browser dropped the cookie
    rotated_id = signer.unsign(rotated["value"])
    assert rotated_id is not None
    assert server.manager.load(rotated_id).is_new  # V7.4.1: ended on the server too

    # Replaying the cookie saved before the logout gets an anonymous session, and the
    # server tells the browser to drop the cookie again.
    browser.add_cookie(
        {"name": COOKIE, "value": rotated["value"], "path": "/", "secure": True, "httpOnly": True}
    )
    browser.get(server.url + "/")
    assert browser.find_elements(By.ID, "login")
    assert session_cookie(browser) is None
