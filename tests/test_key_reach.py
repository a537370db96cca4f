"""What the gateway's own OpenAI key carries, end to end: with OPENAI_API_KEY set, routes that mint
direct access and headers that aim the key at another organization or project get 403
route_not_allowed unless GATEWAY_ALLOWED_ROUTES opens them; without the key they pass."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import SettingsFactory
from tests.judging import ADMIN, USER, error, gateway, reached
from tests.upstream import MockUpstream

KEY = "sk-gateway"
SECRETS = "/v1/realtime/client_secrets"
SESSION = {"type": "realtime", "model": "gpt-realtime"}


def sdk(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-client", default_headers=USER, max_retries=0, **kwargs)


def hello(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])


def test_with_the_key_a_realtime_client_secret_is_refused_in_any_spelling_and_method(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    with gateway(settings_factory, upstream, openai_api_key=KEY) as url:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk(url).realtime.client_secrets.create(session=SESSION)  # type: ignore[arg-type]
        assert caught.value.code == "route_not_allowed"
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert "/v1/realtime/client_secrets" in caught.value.message
        with httpx2.Client(base_url=url, headers=USER) as client:
            for method, path in [
                ("POST", "/v1/Realtime//Client_Secrets/"),
                ("POST", "/v1/re%61ltime/client_secrets"),  # an upstream decodes it to the same route
                ("POST", "/v1/realtime/sessions"),
                ("POST", "/v1/realtime/calls?model=gpt-realtime"),
                ("POST", "/v1/live/sessions"),
                ("GET", "/v1/realtime/calls/rtc_1"),
                ("POST", "/v1/organization/admin_api_keys"),
            ]:
                answer = client.request(method, path, json={})
                assert (answer.status_code, error(answer)["code"]) == (403, "route_not_allowed"), path
                assert answer.json()["error"]["type"] == "permission_error"
    assert upstream.requests == []


def test_without_the_key_the_clients_own_key_goes_and_nothing_is_refused(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    upstream.behaviors[SECRETS] = "echo"
    with gateway(settings_factory, upstream) as url:
        sdk(url).realtime.client_secrets.create(session=SESSION)  # type: ignore[arg-type]
        assert hello(sdk(url, organization="org-theirs", project="proj_theirs")).choices
    secrets, chat = reached(upstream, SECRETS)[0], reached(upstream, "/v1/chat/completions")[0]
    assert secrets.headers["Authorization"] == "Bearer sk-client"
    assert (chat.headers["OpenAI-Organization"], chat.headers["OpenAI-Project"]) == ("org-theirs", "proj_theirs")


def test_the_allowlist_opens_a_route_on_the_gateways_key(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    upstream.behaviors[SECRETS] = "echo"
    allowed = "realtime/client_secrets"
    with gateway(settings_factory, upstream, openai_api_key=KEY, allowed_routes=allowed) as url:
        sdk(url).realtime.client_secrets.create(session=SESSION)  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as caught:  # opened that route, no other
            sdk(url).post("/realtime/sessions", body={}, cast_to=object)
        assert caught.value.code == "route_not_allowed"
    (forwarded,) = reached(upstream, SECRETS)
    assert forwarded.headers["Authorization"] == f"Bearer {KEY}"


def test_organization_and_project_headers_ride_only_where_allowed(
    settings_factory: SettingsFactory, upstream: MockUpstream
) -> None:
    with gateway(settings_factory, upstream, openai_api_key=KEY) as url:
        for kwargs in ({"organization": "org-other"}, {"project": "proj_other"}):
            with pytest.raises(openai.PermissionDeniedError) as caught:
                hello(sdk(url, **kwargs))
            assert caught.value.code == "route_not_allowed"
        assert hello(sdk(url)).choices  # without them the call goes
    with gateway(settings_factory, upstream, openai_api_key=KEY, allowed_routes="OpenAI-Project") as url:
        assert hello(sdk(url, project="proj_other")).choices
        with pytest.raises(openai.PermissionDeniedError):
            hello(sdk(url, organization="org-other"))
    first, second = reached(upstream, "/v1/chat/completions")
    assert "OpenAI-Project" not in first.headers
    assert second.headers["OpenAI-Project"] == "proj_other"
    assert second.headers["Authorization"] == f"Bearer {KEY}"


def test_the_keys_reach_is_checked_before_the_block(settings_factory: SettingsFactory, upstream: MockUpstream) -> None:
    with (
        gateway(settings_factory, upstream, openai_api_key=KEY, admin_token="admin-secret") as url,
        httpx2.Client(base_url=url, headers=USER) as client,
    ):
        assert client.put("/admin/block/alice", headers=ADMIN).status_code == 200
        # a refusal that holds whatever the user's standing: it says what the gateway carries
        assert error(client.post(SECRETS, json={}))["code"] == "route_not_allowed"
        assert error(client.post("/v1/chat/completions", json={}))["code"] == "user_blocked"
    assert upstream.requests == []
