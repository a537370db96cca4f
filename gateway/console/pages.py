"""The console's pages. Each reads or acts through the same Store calls as the admin API's REST
handlers (gateway/admin.py), checks its input with the same models (gateway/admin_models.py), and
is declared with the role it needs; gateway/console/app.py runs them behind a session.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.admin import known
from gateway.admin_models import BlockRequest, DecisionRequest, NoteRequest, ReverseRequest
from gateway.admin_requests import refusal
from gateway.appeals import ID
from gateway.console import queries
from gateway.console.app import Console, Page
from gateway.console.charts import stacked_columns
from gateway.console.forms import Form
from gateway.console.sessions import Session
from gateway.users import decode_cursor
from middleware.errors import GatewayError
from middleware.users import user_id_problem

PAGE_SIZE = 50
TIMELINE = 200
# What a redirect after an action says on the next page; only these words are ever shown.
DONE = {
    "blocked": "The user is blocked.",
    "unblocked": "The user is unblocked.",
    "noted": "Your note is on the timeline.",
    "reversed": "The event is reversed.",
    "accepted": "The appeal is accepted: its event is reversed.",
    "rejected": "The appeal is rejected.",
}
CSV_COLUMNS = (
    "id", "at", "type", "user_id", "app", "categories", "detector", "rule", "path", "shadow", "counted",
    "points", "actor", "operator", "reason", "text", "blocked_until", "permanent", "event_id",
    "reversed_at", "reversed_by", "reverse_reason",
)  # fmt: skip
# A spreadsheet runs a cell starting with one of these as a formula (CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _bad(message: str) -> GatewayError:
    return GatewayError(400, "invalid_request", message)


def _checked[M: BaseModel](model: type[M], values: dict[str, Any]) -> M:
    """`values` as `model`, or the admin API's 400 naming the first fault."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise refusal(exc.errors()[0]) from None


def _user_id(value: str) -> str:
    problem = user_id_problem(value)
    if problem is not None:
        raise _bad(f"The user id {problem}.")
    return value


def _done(request: Request) -> str | None:
    return DONE.get(request.query_params.get("done", ""))


def _to_user(console: Console, request: Request, user_id: str, done: str) -> Response:
    return console.redirect(request, "/user?" + urlencode({"id": user_id, "done": done}))


# -- reading ------------------------------------------------------------------------------------


async def overview(console: Console, request: Request, session: Session, form: Form) -> Response:
    found = await queries.overview(console.store.database)
    charts = [stacked_columns(series, chart_id=f"chart{index}") for index, series in enumerate(found.charts)]
    return console.render(request, "overview.html", session, overview=found, charts=charts)


async def users(console: Console, request: Request, session: Session, form: Form) -> Response:
    prefix = request.query_params.get("q", "").strip()
    if prefix:
        _user_id(prefix)
    shown = request.query_params.get("blocked", "")
    blocked = {"": None, "yes": True, "no": False}.get(shown)
    if blocked is None and shown:
        raise _bad("blocked is yes, no or empty.")
    after = request.query_params.get("after") or None
    try:
        if after is not None:
            decode_cursor(after)
        page, cursor = await console.store.list_users(blocked=blocked, limit=PAGE_SIZE, after=after, prefix=prefix)
    except ValueError:
        raise _bad("after is not the cursor of a previous page.") from None
    following = None if cursor is None else "?" + urlencode({"q": prefix, "blocked": shown, "after": cursor})
    return console.render(request, "users.html", session, users=page, q=prefix, blocked=shown, following=following)


async def user(console: Console, request: Request, session: Session, form: Form) -> Response:
    user_id = _user_id(request.query_params.get("id", ""))
    status = known(await console.store.status(user_id))
    standing = await console.store.standing(user_id)
    events = await console.store.events(user_id, limit=TIMELINE) or []
    appealed = {appeal["event_id"]: appeal for appeal in standing["appeals"]}
    return console.render(
        request,
        "user.html",
        session,
        status=status,
        standing=standing,
        events=events,
        appealed=appealed,
        done=_done(request),
        may_act=session.operator.may("moderator"),
    )


async def appeals(console: Console, request: Request, session: Session, form: Form) -> Response:
    status = request.query_params.get("status", "open")
    if status not in ("open", "accepted", "rejected"):
        raise _bad("status is open, accepted or rejected.")
    after = request.query_params.get("after") or None
    try:
        page, cursor = await console.store.list_appeals(status, limit=PAGE_SIZE, after=after)  # type: ignore[arg-type]
    except ValueError:
        raise _bad("after is not the cursor of a previous page.") from None
    following = None if cursor is None else "?" + urlencode({"status": status, "after": cursor})
    return console.render(
        request,
        "appeals.html",
        session,
        appeals=page,
        status=status,
        following=following,
        done=_done(request),
        may_act=session.operator.may("moderator"),
    )


# -- acting (each a POST behind the CSRF check, redirecting to what changed) ---------------------


async def block(console: Console, request: Request, session: Session, form: Form) -> Response:
    user_id = _user_id(form.text("user_id"))
    reason = _checked(ReverseRequest, {"reason": form.text("reason")}).reason
    if form.text("permanent") == "on":
        values: dict[str, Any] = {"permanent": True, "reason": reason}
    else:
        try:
            hours = float(form.text("hours"))
        except ValueError:
            raise _bad("hours: give the block's length in hours, or tick permanent.") from None
        values = {"seconds": hours * 3600, "reason": reason}
    body = _checked(BlockRequest, values)
    await console.store.block(
        user_id, seconds=body.seconds, permanent=body.permanent, reason=body.reason, operator=session.operator.name
    )
    return _to_user(console, request, user_id, "blocked")


async def unblock(console: Console, request: Request, session: Session, form: Form) -> Response:
    user_id = _user_id(form.text("user_id"))
    reason = _checked(ReverseRequest, {"reason": form.text("reason")}).reason
    known(await console.store.unblock(user_id, reason=reason, operator=session.operator.name))
    return _to_user(console, request, user_id, "unblocked")


async def note(console: Console, request: Request, session: Session, form: Form) -> Response:
    user_id = _user_id(form.text("user_id"))
    text = _checked(NoteRequest, {"text": form.text("text")}).text
    known(await console.store.add_note(user_id, session.operator.name, text))
    return _to_user(console, request, user_id, "noted")


async def reverse(console: Console, request: Request, session: Session, form: Form) -> Response:
    event_id = form.text("event_id")
    if not ID.fullmatch(event_id):
        raise _bad("event_id is an event's number.")
    reason = _checked(ReverseRequest, {"reason": form.text("reason")}).reason
    status = await console.store.reverse_event(int(event_id), reason=reason, operator=session.operator.name)
    return _to_user(console, request, status.user_id, "reversed")


async def decide(console: Console, request: Request, session: Session, form: Form) -> Response:
    appeal_id = form.text("appeal_id")
    if not ID.fullmatch(appeal_id):
        raise _bad("appeal_id is an appeal's number.")
    body = _checked(DecisionRequest, {"decision": form.text("decision"), "reason": form.text("reason")})
    await console.store.decide_appeal(
        int(appeal_id), accept=body.decision == "accept", reason=body.reason, operator=session.operator.name
    )
    return console.redirect(request, "/appeals?done=" + ("accepted" if body.decision == "accept" else "rejected"))


# -- export -------------------------------------------------------------------------------------


async def export(console: Console, request: Request, session: Session, form: Form) -> Response:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return console.render(
        request,
        "export.html",
        session,
        start=_field(now - timedelta(days=1)),
        end=_field(now + timedelta(minutes=1)),
        max_days=queries.MAX_EXPORT.days,
    )


async def export_csv(console: Console, request: Request, session: Session, form: Form) -> Response:
    start = _moment(request.query_params.get("start", ""), "start")
    end = _moment(request.query_params.get("end", ""), "end")
    if end <= start:
        raise _bad("end must be after start.")
    if end - start > queries.MAX_EXPORT:
        raise _bad(f"An export covers at most {queries.MAX_EXPORT.days} days: export a longer span in parts.")

    async def rows() -> AsyncIterator[str]:
        yield _csv_line(CSV_COLUMNS)
        async for event in queries.export_events(console.store.database, start, end):
            yield _csv_line(_csv_value(event, column) for column in CSV_COLUMNS)

    name = f"events-{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}.csv"
    return StreamingResponse(
        rows(), media_type="text/csv; charset=utf-8", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


def csv_cell(value: object) -> str:
    """One CSV cell's text; text a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        value = " ".join(str(item) for item in value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def _csv_value(event: dict[str, Any], column: str) -> object:
    if column == "blocked_until" and event.get("type") not in ("block", "unblock"):
        return None
    return event.get(column)


def _csv_line(cells: Any) -> str:
    out = io.StringIO()
    csv.writer(out).writerow([csv_cell(cell) for cell in cells])
    return out.getvalue()


def _field(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M}"


def _moment(value: str, name: str) -> datetime:
    """A datetime-local field's value, read as UTC."""
    try:
        moment = datetime.fromisoformat(value)
        # An offset can push a moment at the calendar's edge past it (0001-01-01T00:30+01:00).
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _bad(f"{name} is a date and time such as 2026-12-01T09:30 (UTC).") from None


PAGES = [
    Page("GET", "/", "viewer", overview),
    Page("GET", "/users", "viewer", users),
    Page("GET", "/user", "viewer", user),
    Page("GET", "/appeals", "viewer", appeals),
    Page("GET", "/export", "viewer", export),
    Page("GET", "/export.csv", "viewer", export_csv),
    Page("POST", "/user/block", "moderator", block),
    Page("POST", "/user/unblock", "moderator", unblock),
    Page("POST", "/user/note", "moderator", note),
    Page("POST", "/event/reverse", "moderator", reverse),
    Page("POST", "/appeals/decide", "moderator", decide),
]
