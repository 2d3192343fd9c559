"""Who may drive the server, over real localhost servers: the Host, API key, Origin and Content-Type checks.

A page of another site must not generate through the user's browser (no form-encoded or text/plain body, no
foreign Origin, no DNS-rebound Host), and a server with a key answers nothing but its page without it. The
tests without a key use only `create_app` and HTTP, so they also run (and fail) against a server without the
checks; those with a key or allow lists build a `ServeAccess` inside their fixtures.
"""

from __future__ import annotations

import hmac
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from ldm.serve import ServeLimits, create_app, serve_in_background
from ldm.serve.png import MODEL_KEY
from ldm.serve.security import AccessGuard, ServeAccess
from tests.pipeline.tiny_models import tiny_pipeline

KEY = "s3cret-key-of-the-tests"
BODY = {"prompt": "a red circle", "num_inference_steps": 1}
POSTS = ("/v1/generate", "/v1/generate/stream")
GETS = ("/", "/static/app.js", "/v1/health", "/v1/model", "/openapi.json")


def app_with(access_kwargs: dict | None = None, folder: Path | None = None) -> FastAPI:
    """A tiny model's app; `access_kwargs` for ServeAccess (imported here: a server without it has none)."""
    extra: dict = {"folder": folder} if folder is not None else {}
    if access_kwargs is not None:
        from ldm.serve.security import ServeAccess

        extra["access"] = ServeAccess(**access_kwargs)
    return create_app(tiny_pipeline(), ServeLimits(), **extra)


@pytest.fixture(scope="module")
def keyed_app() -> FastAPI:
    return app_with({"api_key": KEY})


@pytest.fixture(scope="module")
def keyed_url(keyed_app: FastAPI) -> Iterator[str]:
    with serve_in_background(keyed_app) as url:
        yield url


@pytest.fixture(scope="module")
def allowing_url() -> Iterator[str]:
    """A server that also answers to myhost.lan and lets pages of https://studio.example post."""
    from ldm.serve.security import ServeAccess

    access = ServeAccess.for_bind("127.0.0.1", allow_hosts=("myhost.lan",), allow_origins=("https://studio.example",))
    with serve_in_background(create_app(tiny_pipeline(), ServeLimits(), access=access)) as url:
        yield url


def spy_on_submits(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list:
    """The jobs queued on `app` from now on (they still run)."""
    queue, submitted = app.state.queue, []
    submit = queue.submit

    def recording_submit(job):
        submitted.append(job)
        return submit(job)

    monkeypatch.setattr(queue, "submit", recording_submit)
    return submitted


def post(url: str, path: str, content_type: str | None = "application/json", **headers: str) -> httpx.Response:
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(f"{url}{path}", content=json.dumps(BODY), headers=headers, timeout=60)


def assert_refused(answer: httpx.Response, status: int, code: str) -> dict:
    """`answer` is the API's JSON error with this status and code (no field: the request as a whole)."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"code", "field", "message"} and (error["code"], error["field"]) == (code, None), error
    return error


# ---- Content-Type: what an HTML form can send is refused ------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_a_json_body_sent_as_anything_but_application_json_is_refused_and_not_queued(
    server_url, tiny_app, monkeypatch, content_type
):
    """A form (`enctype="text/plain"` makes a body that parses as JSON) posts without a CORS preflight; a body
    not declared JSON is refused before it is read."""
    submitted = spy_on_submits(tiny_app, monkeypatch)
    for path in POSTS:
        error = assert_refused(post(server_url, path, content_type), 415, "unsupported_media_type")
        assert "application/json" in error["message"]
    assert submitted == []


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_with_a_charset_or_in_capitals_is_accepted(server_url, content_type):
    assert post(server_url, "/v1/generate", content_type).status_code == 200


# ---- Origin: a page of another site cannot post --------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example", "null"])
def test_a_post_from_another_sites_page_is_refused_and_not_queued(server_url, tiny_app, monkeypatch, origin):
    submitted = spy_on_submits(tiny_app, monkeypatch)
    for path in POSTS:
        error = assert_refused(post(server_url, path, Origin=origin), 403, "bad_origin")
        assert origin in error["message"]
    assert submitted == []


def test_a_post_from_the_servers_own_page_is_accepted(server_url):
    """The page served at server_url sends Origin server_url: the Host it came to."""
    assert post(server_url, "/v1/generate", Origin=server_url).status_code == 200


def test_a_post_from_an_allowed_origin_is_accepted_and_others_are_not(allowing_url):
    assert post(allowing_url, "/v1/generate", Origin="https://studio.example").status_code == 200
    assert_refused(post(allowing_url, "/v1/generate", Origin="https://other.example"), 403, "bad_origin")


# ---- Host: a DNS-rebound name is refused on every route ------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "[::1]evil.example", "127.0.0.1:evil",
     "1.2.3.4]", "[fe80::1%eth0]:8000", "localhost:80:80", "localhost..", "localhost:99999", "[127.0.0.1]"],
)  # fmt: skip
def test_a_foreign_host_is_refused_on_every_route(server_url, tiny_app, monkeypatch, host):
    """evil.example resolving to 127.0.0.1 makes the browser send `Host: evil.example` here: the page, the
    static files, the API, even health, are refused."""
    submitted = spy_on_submits(tiny_app, monkeypatch)
    for path in GETS:
        error = assert_refused(httpx.get(f"{server_url}{path}", headers={"Host": host}), 403, "bad_host")
        assert "--allow-host" in error["message"]
    for path in POSTS:
        assert_refused(post(server_url, path, Host=host), 403, "bad_host")
    assert submitted == []


@pytest.mark.parametrize(
    "host", ["localhost", "localhost.:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST:1", "10.0.0.7:8000"]
)
def test_loopback_names_and_ip_addresses_are_answered(server_url, host):
    """DNS rebinding needs a name: an IP address in Host names this machine, whatever the port."""
    host = host.format(port=server_url.rpartition(":")[2])
    assert httpx.get(f"{server_url}/v1/model", headers={"Host": host}).status_code == 200


def test_an_allowed_host_is_answered_and_its_own_pages_may_post(allowing_url):
    for host in ("myhost.lan", "MyHost.LAN:8000"):
        assert httpx.get(f"{allowing_url}/v1/model", headers={"Host": host}).status_code == 200
    own_page = post(allowing_url, "/v1/generate", Host="myhost.lan:8000", Origin="http://myhost.lan:8000")
    assert own_page.status_code == 200
    assert_refused(httpx.get(f"{allowing_url}/", headers={"Host": "otherhost.lan"}), 403, "bad_host")


# ---- the API key ---------------------------------------------------------------------------------------


def test_without_the_key_every_api_route_answers_401_and_nothing_is_queued(keyed_url, keyed_app, monkeypatch):
    submitted = spy_on_submits(keyed_app, monkeypatch)
    answers = [httpx.get(f"{keyed_url}{path}") for path in ("/v1/model", "/openapi.json", "/v1/nothing")]
    answers += [post(keyed_url, path) for path in POSTS]
    for answer in answers:
        error = assert_refused(answer, 401, "unauthorized")
        assert answer.headers["www-authenticate"] == "Bearer" and "Authorization: Bearer" in error["message"]
    assert submitted == []


@pytest.mark.parametrize(
    "authorization",
    ["Bearer s3cret-key-of-the-testZ", "Bearer s3cret", f"Bearer {KEY}-and-more", f"Basic {KEY}", "Bearer", KEY],
    ids=["same-length", "shorter", "longer", "other-scheme", "empty", "no-scheme"],
)
def test_a_wrong_key_is_refused(keyed_url, authorization):
    answer = post(keyed_url, "/v1/generate", Authorization=authorization)
    assert assert_refused(answer, 401, "unauthorized")["message"].startswith("the API key is wrong")
    assert answer.headers["www-authenticate"] == "Bearer"


def test_keys_are_compared_in_constant_time_whatever_their_length(keyed_url, monkeypatch):
    """hmac.compare_digest on the bytes, also for a key of another length (where == would return at once)."""
    compared = []
    compare_digest = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or compare_digest(a, b))
    assert post(keyed_url, "/v1/generate", Authorization="Bearer short").status_code == 401
    assert compared == [(b"short", KEY.encode())]


def test_the_right_key_generates_and_streams(keyed_url):
    assert httpx.get(f"{keyed_url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    answer = post(keyed_url, "/v1/generate", Authorization=f"bearer {KEY}")  # the scheme is case-insensitive
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.stream("POST", f"{keyed_url}/v1/generate/stream", content=json.dumps(BODY), headers=headers) as stream:
        assert stream.status_code == 200
        events = [line.removeprefix("event: ") for line in stream.iter_lines() if line.startswith("event: ")]
    assert events[0] == "queued" and events[-1] == "done"


def test_the_page_and_health_load_without_the_key(keyed_url):
    """The page must load to ask for the key; supervisors probe health without one."""
    for path in ("/", "/static/app.js", "/static/style.css", "/v1/health"):
        assert httpx.get(f"{keyed_url}{path}").status_code == 200, path


def test_the_host_is_checked_before_the_key(keyed_url):
    assert_refused(httpx.get(f"{keyed_url}/v1/model", headers={"Host": "evil.example"}), 403, "bad_host")


# ---- /v1/model names the folder, never its path --------------------------------------------------------


def test_the_model_is_named_by_its_folder_and_no_path_is_shown(tmp_path):
    folder = tiny_pipeline().save_pretrained(tmp_path / "tiny-model")
    with serve_in_background(app_with(folder=folder)) as url:
        answer = httpx.get(f"{url}/v1/model")
        png = httpx.post(f"{url}/v1/generate", json=BODY, headers={"Accept": "image/png"}, timeout=60)
        schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]["ModelInfo"]
    assert answer.json()["name"] == "tiny-model" and "folder" not in answer.json()
    for path in {str(tmp_path), str(tmp_path.resolve())}:
        assert path not in answer.text
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.text[MODEL_KEY] == "tiny-model"
    assert "folder" not in schema["properties"]


def test_a_post_from_the_servers_own_page_on_the_default_port_is_accepted(server_url):
    """Browsers leave the scheme's default port out of Origin: http://localhost is the page of localhost:80."""
    answer = post(server_url, "/v1/generate", Host="localhost:80", Origin="http://localhost")
    assert answer.status_code == 200, answer.text


def test_an_allowed_origin_on_its_default_port_matches_what_browsers_send():
    access = ServeAccess(allowed_origins=("https://studio.example:443",))
    assert access.origin_allowed("https://studio.example", "localhost:8000")


def test_a_websocket_is_refused_before_the_app_sees_it():
    """No route speaks websocket (and uvicorn without a websocket library never makes such a scope): where one
    arrives, the guard closes it with a policy violation."""
    import asyncio

    seen, sent = [], []

    async def app(scope, receive, send):
        seen.append(scope)

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    guard = AccessGuard(app, ServeAccess())
    scope = {"type": "websocket", "path": "/static/app.js", "headers": [(b"host", b"localhost:8000")]}
    asyncio.run(guard(scope, receive, send))
    assert seen == [] and sent == [{"type": "websocket.close", "code": 1008}]
