"""The admin REST API (`/admin`): users, blocks, audit events, notes, stats, the policy, appeals,
reversal, erasure and operators.

Each operation is declared on its handler with the pydantic models of its parameters, body and
answer (`gateway.admin_models`, `gateway.admin_answers`) and the lowest role that may call it:
the models check the request, and the OpenAPI document is made from them
(`gateway.admin_openapi`). `gateway.admin_http` serves them: routing on the raw path, the
operator's token and role, the request read into its models, the answer written.
"""

from __future__ import annotations

import orjson

from gateway.admin_answers import (
    AddedOperator,
    Appeal,
    AppealList,
    Event,
    EventList,
    NoContent,
    OperatorInfo,
    OperatorList,
    PolicyDocument,
    RemovedOperator,
    Stats,
    UserList,
    UserStatus,
)
from gateway.admin_http import OperationsApp
from gateway.admin_models import (
    AppealParams,
    BlockRequest,
    DecisionRequest,
    EventParams,
    ListAppealsParams,
    ListUsersParams,
    NewOperator,
    NoParams,
    NoteRequest,
    OperatorParams,
    ReverseRequest,
    UnblockRequest,
    UserEventsParams,
    UserParams,
)
from gateway.admin_openapi import Operations, build_document
from gateway.appeals import not_found as appeal_not_found
from gateway.operators import Operator, OperatorExists, Operators
from gateway.settings import Settings
from gateway.store import Store
from gateway.throttle import AuthThrottle
from middleware.errors import GatewayError

operations = Operations()


class AdminAPI(OperationsApp):
    """The admin ASGI app; mount it at `/admin`. Its operations are declared below, on their
    handlers; `OperationsApp` routes to them under the operator's role."""

    def __init__(self, store: Store, operators: Operators, *, throttle: AuthThrottle | None = None) -> None:
        super().__init__(operations, _OPENAPI_BYTES, operators, throttle)
        self._store = store

    # -- operations, in routing order ----------------------------------------------------------

    @operations(
        "GET",
        "/users",
        "listUsers",
        "List users, oldest user id first, one page at a time",
        params=ListUsersParams,
        response=UserList,
        role="viewer",
    )
    async def _list_users(self, params: ListUsersParams, body: None, operator: Operator) -> UserList:
        page, cursor = await self._store.list_users(
            blocked=params.blocked, limit=params.limit, after=params.after, prefix=params.prefix or ""
        )
        return UserList(data=[UserStatus.model_validate(status.to_json()) for status in page], next=cursor)

    @operations(
        "GET",
        "/users/{user_id}",
        "getUser",
        "A user's status",
        params=UserParams,
        response=UserStatus,
        role="viewer",
        not_found=True,
    )
    async def _get_user(self, params: UserParams, body: None, operator: Operator) -> UserStatus:
        status = known(await self._store.status(params.user_id))
        return UserStatus.model_validate(status.to_json())

    @operations(
        "GET",
        "/users/{user_id}/events",
        "listUserEvents",
        "A user's audit trail, newest first",
        params=UserEventsParams,
        response=EventList,
        role="viewer",
        not_found=True,
    )
    async def _events(self, params: UserEventsParams, body: None, operator: Operator) -> EventList:
        events = known(await self._store.events(params.user_id, limit=params.limit))
        return EventList(data=[Event.model_validate(event) for event in events])

    @operations(
        "PUT",
        "/block/{user_id}",
        "blockUser",
        "Block a user (creates unknown users)",
        params=UserParams,
        body=BlockRequest,
        response=UserStatus,
        role="moderator",
    )
    async def _block(self, params: UserParams, body: BlockRequest, operator: Operator) -> UserStatus:
        # No span given: the store blocks for the policy's first step (GATEWAY_BLOCK_SECONDS without a file).
        status = await self._store.block(
            params.user_id, seconds=body.seconds, permanent=body.permanent, reason=body.reason, operator=operator.name
        )
        return UserStatus.model_validate(status.to_json())

    @operations(
        "PUT",
        "/unblock/{user_id}",
        "unblockUser",
        "Lift a user's block and reset strikes to 0 (idempotent)",
        params=UserParams,
        body=UnblockRequest,
        response=UserStatus,
        role="moderator",
        not_found=True,
    )
    async def _unblock(self, params: UserParams, body: UnblockRequest, operator: Operator) -> UserStatus:
        status = known(await self._store.unblock(params.user_id, reason=body.reason, operator=operator.name))
        return UserStatus.model_validate(status.to_json())

    @operations(
        "POST",
        "/users/{user_id}/notes",
        "addNote",
        "Add a moderator's note to a user's timeline",
        params=UserParams,
        body=NoteRequest,
        response=Event,
        role="moderator",
        status=201,
        not_found=True,
    )
    async def _add_note(self, params: UserParams, body: NoteRequest, operator: Operator) -> Event:
        return Event.model_validate(known(await self._store.add_note(params.user_id, operator.name, body.text)))

    @operations(
        "GET",
        "/stats",
        "getStats",
        "Blocked users now; violations and blocks over the last 24 hours",
        params=NoParams,
        response=Stats,
        role="viewer",
    )
    async def _stats(self, params: NoParams, body: None, operator: Operator) -> Stats:
        return Stats.model_validate(await self._store.stats())

    @operations(
        "DELETE",
        "/users/{user_id}",
        "eraseUser",
        "Erase a user's state, events and appeals; one `erased` event keeps only a SHA-256 of the id",
        params=UserParams,
        response=NoContent,
        role="admin",
        status=204,
        not_found=True,
    )
    async def _erase(self, params: UserParams, body: None, operator: Operator) -> NoContent:
        if not await self._store.erase_user(params.user_id, operator=operator.name):
            known(None)
        return NoContent()

    @operations(
        "GET",
        "/policy",
        "getPolicy",
        "The enforcement policy in force",
        params=NoParams,
        response=PolicyDocument,
        role="viewer",
    )
    async def _policy(self, params: NoParams, body: None, operator: Operator) -> PolicyDocument:
        return PolicyDocument.model_validate(self._store.policy.to_json())

    @operations(
        "GET",
        "/appeals",
        "listAppeals",
        "Appeals in one status (the open queue by default), oldest first, one page at a time",
        params=ListAppealsParams,
        response=AppealList,
        role="viewer",
    )
    async def _list_appeals(self, params: ListAppealsParams, body: None, operator: Operator) -> AppealList:
        page, cursor = await self._store.list_appeals(params.status, limit=params.limit, after=params.after)
        return AppealList(data=[Appeal.model_validate(appeal.to_admin_json()) for appeal in page], next=cursor)

    @operations(
        "GET",
        "/appeals/{appeal_id}",
        "getAppeal",
        "An appeal",
        params=AppealParams,
        response=Appeal,
        role="viewer",
        not_found=True,
    )
    async def _get_appeal(self, params: AppealParams, body: None, operator: Operator) -> Appeal:
        appeal = await self._store.appeal(params.appeal_id)
        if appeal is None:
            raise appeal_not_found(params.appeal_id)
        return Appeal.model_validate(appeal.to_admin_json())

    @operations(
        "POST",
        "/appeals/{appeal_id}/decision",
        "decideAppeal",
        "Accept or reject an open appeal",
        params=AppealParams,
        body=DecisionRequest,
        response=Appeal,
        role="moderator",
        not_found=True,
        conflict=True,
    )
    async def _decide(self, params: AppealParams, body: DecisionRequest, operator: Operator) -> Appeal:
        appeal = await self._store.decide_appeal(
            params.appeal_id, accept=body.decision == "accept", reason=body.reason, operator=operator.name
        )
        return Appeal.model_validate(appeal.to_admin_json())

    @operations(
        "POST",
        "/events/{event_id}/reverse",
        "reverseEvent",
        "Reverse a violation, warning or block and what it caused; the user's status after it",
        params=EventParams,
        body=ReverseRequest,
        response=UserStatus,
        role="moderator",
        not_found=True,
    )
    async def _reverse(self, params: EventParams, body: ReverseRequest, operator: Operator) -> UserStatus:
        status = await self._store.reverse_event(params.event_id, reason=body.reason, operator=operator.name)
        return UserStatus.model_validate(status.to_json())

    @operations(
        "GET",
        "/operators",
        "listOperators",
        "The operators and their roles",
        params=NoParams,
        response=OperatorList,
        role="admin",
    )
    async def _list_operators(self, params: NoParams, body: None, operator: Operator) -> OperatorList:
        listed = await self._operators.list()
        return OperatorList(data=[OperatorInfo.model_validate(record.to_json()) for record in listed])

    @operations(
        "POST",
        "/operators",
        "addOperator",
        "Add an operator; the answer holds its token, shown this once",
        params=NoParams,
        body=NewOperator,
        response=AddedOperator,
        role="admin",
        status=201,
        conflict=True,
    )
    async def _add_operator(self, params: NoParams, body: NewOperator, operator: Operator) -> AddedOperator:
        try:
            record, token = await self._operators.add(body.name, body.role, by=operator.name)
        except OperatorExists:
            raise GatewayError(
                409,
                "operator_exists",
                f"An operator named {body.name} exists: remove it first to give the name a new token or role.",
                param="name",
            ) from None
        return AddedOperator.model_validate({**record.to_json(), "token": token})

    @operations(
        "DELETE",
        "/operators/{name}",
        "removeOperator",
        "Remove an operator: its token and console sessions stop working at once",
        params=OperatorParams,
        response=RemovedOperator,
        role="admin",
        not_found=True,
    )
    async def _remove_operator(self, params: OperatorParams, body: None, operator: Operator) -> RemovedOperator:
        removed = await self._operators.remove(params.name, by=operator.name)
        if removed is None:
            raise GatewayError(404, "operator_not_found", f"No operator named {params.name} is stored.")
        return RemovedOperator.model_validate(removed.to_json())


OPENAPI = build_document(operations)
_OPENAPI_BYTES = orjson.dumps(OPENAPI)


def admin_app(
    store: Store, settings: Settings, *, operators: Operators | None = None, throttle: AuthThrottle | None = None
) -> AdminAPI:
    """The admin API as an ASGI app, to mount at `/admin`; its operators by default in the store's database."""
    if operators is None:
        operators = Operators(store.database, settings)
    return AdminAPI(store, operators, throttle=throttle)


def known[T](found: T | None) -> T:
    """What the store found about a user; None means it never recorded the user: 404."""
    if found is None:
        raise GatewayError(404, "user_not_found", "The gateway has never recorded this user.")
    return found
