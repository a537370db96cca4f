import pytest
from hypothesis import given
from hypothesis import strategies as st

from middleware.access import REFUSED_HEADERS, REFUSED_ROUTES, KeyReach, parse_allowed

# every route in OpenAI's API reference (openai/openai-openapi, 2026-08; the Live API as the
# openai 3.57 SDK calls it) that hands out access bypassing the gateway
MINTING = [
    "/realtime/client_secrets",
    "/realtime/sessions",
    "/realtime/transcription_sessions",
    "/realtime/translations/client_secrets",
    "/realtime/calls",
    "/realtime/calls/rtc_1/accept",
    "/realtime/calls/rtc_1/refer",
    "/live/sessions",
    "/live/sessions/sess_1/fork",
    "/live/sessions/sess_1/accept",
    "/chatkit/sessions",
    "/organization/admin_api_keys",
    "/organization/projects/proj_1/service_accounts",
    "/organization/projects/proj_1/service_accounts/svc_1/api_keys",
    "/organization/invites",
    "/projects/proj_1/roles",
]
CARRIED = [
    "/chat/completions",
    "/responses",
    "/files",
    "/models",
    "/chatkit/threads",
    "/chatkit/sessions_x",
    "/realtimes",
    "/lives",
    "/organizations",
    "/audio/transcriptions",
]
NO_HEADERS: dict[bytes, bytes] = {}


def test_minting_routes_are_refused_by_default() -> None:
    reach = KeyReach()
    for path in MINTING:
        error = reach.refusal(path, NO_HEADERS)
        assert error is not None, path
        assert (error.status, error.code) == (403, "route_not_allowed")
        assert (b"x-should-retry", b"false") in error.response_headers()
        assert path.lower() in error.message
    for path in CARRIED:
        assert reach.refusal(path, NO_HEADERS) is None, path


@pytest.mark.parametrize(
    "path",
    [
        "/Realtime/Client_Secrets",
        "//realtime//client_secrets/",
        "/realtime;x=1/client_secrets",
        "/realtime/client_secrets\x00",
        "/realtime /sessions",
        "realtime/sessions",
        "/ORGANIZATION/admin_api_keys",
    ],
)
def test_spellings_of_a_minting_route_are_refused_too(path: str) -> None:
    error = KeyReach().refusal(path, NO_HEADERS)
    assert error is not None
    assert error.code == "route_not_allowed"


def test_headers_that_aim_the_key_elsewhere_are_refused() -> None:
    reach = KeyReach()
    for name in (b"openai-organization", b"openai-project"):
        error = reach.refusal("/chat/completions", {name: b"org-other"})
        assert error is not None
        assert (error.status, error.code) == (403, "route_not_allowed")
        assert name.decode() in error.message.lower()
    # even empty: the upstream decides what an empty header means, not the gateway
    assert reach.refusal("/chat/completions", {b"openai-project": b""}) is not None
    assert reach.refusal("/chat/completions", {b"openai-beta": b"assistants=v2"}) is None


def test_the_allowlist_opens_what_it_names_and_no_more() -> None:
    reach = KeyReach(["realtime/calls", "OpenAI-Project"])
    assert reach.refusal("/realtime/calls", NO_HEADERS) is None
    assert reach.refusal("/realtime/calls/rtc_1/accept", NO_HEADERS) is None
    assert reach.refusal("/realtime/client_secrets", NO_HEADERS) is not None
    assert reach.refusal("/chatkit/sessions", NO_HEADERS) is not None
    assert reach.refusal("/chat/completions", {b"openai-project": b"proj_1"}) is None
    assert reach.refusal("/chat/completions", {b"openai-organization": b"org_1"}) is not None
    opened = KeyReach([*REFUSED_ROUTES, *REFUSED_HEADERS])
    for path in MINTING:
        assert opened.refusal(path, {b"openai-organization": b"o", b"openai-project": b"p"}) is None


def test_allowlist_entries_are_parsed_once_and_checked() -> None:
    assert parse_allowed(" realtime/Calls/ , openai-organization,,realtime/calls") == (
        "realtime/calls",
        "openai-organization",
    )
    assert parse_allowed("") == ()
    assert parse_allowed(["organization"]) == ("organization",)


@pytest.mark.parametrize(
    "entry", ["chat/completions", "realtimes", "realtime;x", "realtime//calls", "Authorization", "*", "/", ".."]
)
def test_an_allowlist_entry_that_opens_nothing_is_an_error(entry: str) -> None:
    with pytest.raises(ValueError, match="neither a refused route nor a refused header") as caught:
        parse_allowed(f"realtime/calls,{entry}")
    assert repr(entry) in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="neither"):
        KeyReach([entry])


@given(st.text(max_size=30), st.dictionaries(st.binary(max_size=20), st.binary(max_size=5), max_size=3))
def test_refusal_never_raises(path: str, headers: dict[bytes, bytes]) -> None:
    error = KeyReach(["realtime/calls"]).refusal(path, headers)
    assert error is None or error.status == 403
