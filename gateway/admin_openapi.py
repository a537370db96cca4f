"""The admin API's operations and the OpenAPI 3.1 document made from their models.

Operations are declared once, on their handlers, with the models of their parameters, body and
answer (as aiohttp's `RouteTableDef` declares routes): `gateway.admin` routes them, and
`build_document` describes them for `/admin/openapi.json`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, models_json_schema

from gateway.admin_answers import Error
from gateway.admin_models import never_null
from gateway.admin_requests import MAX_BODY_BYTES
from gateway.operators import ROLES, Operator, Role

type Handler = Callable[[Any, Any, Any, Operator], Awaitable[BaseModel]]


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    params: type[BaseModel]
    body: type[BaseModel] | None
    response: type[BaseModel]
    handler: Handler
    role: Role  # the lowest role allowed to call it
    status: int  # of a success: 200, 201 when it creates something, 204 when it answers no body
    not_found: bool  # may answer 404 (`user_not_found`, `operator_not_found`, `appeal_not_found`, ...)
    conflict: bool  # may answer 409 (`operator_exists`, `appeal_decided`)


class Operations:
    """The admin API's operations, declared by decorating their handlers, in routing order.

    A handler takes its parameters and its body (None for operations without one) as their
    models, and the operator calling; it returns its answer's model. mypy holds the handler to
    the models it declares. `role` is the lowest role that may call it: others get 403
    `insufficient_role` before anything of the request is read.
    """

    def __init__(self) -> None:
        self._operations: list[Operation] = []

    def __iter__(self) -> Iterator[Operation]:
        return iter(self._operations)

    def __call__[S, P: BaseModel, B: BaseModel, R: BaseModel](
        self,
        method: str,
        path: str,
        operation_id: str,
        summary: str,
        *,
        params: type[P],
        body: type[B] | None = None,
        response: type[R],
        role: Role,
        status: int = 200,
        not_found: bool = False,
        conflict: bool = False,
    ) -> Callable[[Callable[[S, P, B, Operator], Awaitable[R]]], Callable[[S, P, B, Operator], Awaitable[R]]]:
        def declare(
            handler: Callable[[S, P, B, Operator], Awaitable[R]],
        ) -> Callable[[S, P, B, Operator], Awaitable[R]]:
            self._operations.append(
                Operation(
                    method,
                    path,
                    operation_id,
                    summary,
                    params,
                    body,
                    response,
                    handler,
                    role,
                    status,
                    not_found,
                    conflict,
                )
            )
            return handler

        return declare


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: object) -> bool:
        return False  # a title would only repeat the property's name


_REF = "#/components/schemas/{model}"


def _response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def build_document(operations: Operations) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`, its schemas made from their models."""
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [(Error, "serialization")]
    for operation in operations:
        if operation.status != 204:
            models.append((operation.response, "serialization"))
        if operation.body is not None:
            models.append((operation.body, "validation"))
    refs, schemas = models_json_schema(list(dict.fromkeys(models)), ref_template=_REF, schema_generator=_Schema)
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        described: dict[str, Any] = {
            "operationId": operation.operation_id,
            "summary": operation.summary,
            "x-role": operation.role,
        }
        if parameters := _parameters(operation):
            described["parameters"] = parameters
        if operation.status == 204:
            responses: dict[str, Any] = {"204": {"description": _doc(operation.response)}}
        else:
            success = _response(_doc(operation.response), refs[(operation.response, "serialization")])
            responses = {str(operation.status): success}
        responses["400"] = {"$ref": "#/components/responses/BadRequest"}
        responses["401"] = {"$ref": "#/components/responses/Unauthorized"}
        if operation.role != ROLES[0]:
            responses["403"] = {"$ref": "#/components/responses/Forbidden"}
        if operation.not_found:
            responses["404"] = {"$ref": "#/components/responses/NotFound"}
        if operation.conflict:
            responses["409"] = {"$ref": "#/components/responses/Conflict"}
        description = [f"Role: `{operation.role}` or higher."]
        if operation.body is not None:
            if operation.body.__doc__:
                description.append(_doc(operation.body))
            schema = refs[(operation.body, "validation")]
            required = any(field.is_required() for field in operation.body.model_fields.values())
            described["requestBody"] = {"required": required, "content": {"application/json": {"schema": schema}}}
            responses["413"] = {"$ref": "#/components/responses/TooLarge"}
        described["description"] = "\n\n".join(description)
        responses["503"] = {"$ref": "#/components/responses/Unavailable"}
        described["responses"] = responses
        paths.setdefault(operation.path, {})[operation.method.lower()] = described
    paths["/openapi.json"] = {
        "get": {
            "operationId": "getOpenAPI",
            "summary": "This document (no token needed while the admin API is enabled)",
            "security": [],
            "responses": {
                "200": {"description": "The OpenAPI document.", "content": {"application/json": {}}},
                "503": {"$ref": "#/components/responses/Unavailable"},
            },
        }
    }
    error = {"$ref": _REF.format(model="Error")}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chat-gateway admin API",
            "version": "1",
            "description": (
                "Inspect users, block and unblock them, read their audit trail, decide appeals, reverse "
                "mistakes, erase users, manage operators. Each operation names the lowest role that may "
                "call it (`x-role`): `viewer` reads, `moderator` also acts on users and decides appeals, "
                "`admin` also erases users and manages operators. Disabled (503 "
                "`admin_disabled`) while GATEWAY_ADMIN_TOKEN is unset and no operator is stored. "
                "Errors are OpenAI-shaped."
            ),
        },
        "servers": [{"url": "/admin"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An operator's token, or GATEWAY_ADMIN_TOKEN (the built-in operator `admin`).",
                },
            },
            "responses": {
                "BadRequest": _response(
                    "A bad user id, body or parameter; `error.param` names it (`error.code`: `invalid_user_id`, "
                    "`invalid_json`, `invalid_request`).",
                    error,
                ),
                "Unauthorized": _response(
                    "Missing or wrong bearer token (`error.code`: `invalid_admin_token`).", error
                ),
                "Forbidden": _response(
                    "The operator's role is below the operation's (`error.code`: `insufficient_role`).", error
                ),
                "NotFound": _response(
                    "The gateway has never recorded this user (`error.code`: `user_not_found`), no such operator "
                    "is stored (`operator_not_found`), or there is no such appeal (`appeal_not_found`) or "
                    "violation, warning or block (`event_not_found`).",
                    error,
                ),
                "Conflict": _response(
                    "An operator of that name exists (`error.code`: `operator_exists`), or the appeal was decided "
                    "already (`appeal_decided`).",
                    error,
                ),
                "TooLarge": _response(
                    f"The body is over {MAX_BODY_BYTES} bytes (`error.code`: `request_too_large`).", error
                ),
                "Unavailable": _response(
                    "The admin API is disabled or the database does not answer (`error.code`: `admin_disabled`, "
                    "`store_unavailable`).",
                    error,
                ),
            },
            "schemas": schemas["$defs"],
        },
    }


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "")


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    model = operation.params
    schema = model.model_json_schema(ref_template=_REF, schema_generator=_Schema)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema.get("properties", {}).items():
        where = "path" if f"{{{name}}}" in operation.path else "query"
        if model.model_fields[name].default is None:
            never_null(field)  # a query string cannot say null
        parameter = {"name": name, "in": where, "required": where == "path" or name in required}
        if "description" in field:
            parameter["description"] = field.pop("description")
        parameters.append({**parameter, "schema": field})
    return parameters
