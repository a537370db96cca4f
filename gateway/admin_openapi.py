"""The OpenAPI 3.1 document of the admin API, served at `/admin/openapi.json`.

`tests/test_admin.py` holds it against the admin routes, so a route without a description
(or a description without a route) fails the suite.
"""

from __future__ import annotations

from typing import Any


def _error(description: str, codes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "description": f"{description} (`error.code`: {', '.join(f'`{code}`' for code in codes)}).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _limit(default: int, max_limit: int) -> dict[str, Any]:
    return {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "How many items to return at most.",
        "schema": {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default},
    }


def build_document(
    *, max_user_id: int, max_reason: int, max_limit: int, default_limit: int, max_seconds: int
) -> dict[str, Any]:
    """The admin API's OpenAPI document; the limits are those `gateway.admin` enforces."""
    user_id = {"$ref": "#/components/parameters/UserId"}
    common = {
        "401": {"$ref": "#/components/responses/Unauthorized"},
        "503": {"$ref": "#/components/responses/Unavailable"},
    }
    bad_request = {"$ref": "#/components/responses/BadRequest"}
    not_found = {"$ref": "#/components/responses/NotFound"}
    reason = {
        "type": ["string", "null"],
        "maxLength": max_reason,
        "description": "Why; kept in the audit trail (no NUL characters).",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chat-gateway admin API",
            "version": "1",
            "description": (
                "Inspect users, block and unblock them, read their audit trail. Disabled (503 "
                "`admin_disabled`) while GATEWAY_ADMIN_TOKEN is unset. Errors are OpenAI-shaped."
            ),
        },
        "servers": [{"url": "/admin"}],
        "security": [{"bearerAuth": []}],
        "paths": {
            "/users": {
                "get": {
                    "operationId": "listUsers",
                    "summary": "List users, oldest user id first, one page at a time",
                    "parameters": [
                        {
                            "name": "blocked",
                            "in": "query",
                            "required": False,
                            "description": "Only blocked (`true`) or only unblocked (`false`) users.",
                            "schema": {"type": "string", "enum": ["true", "false"]},
                        },
                        _limit(default_limit, max_limit),
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "The `next` cursor of the previous page.",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {"200": _ok("One page of users.", "UserList"), "400": bad_request, **common},
                }
            },
            "/users/{user_id}": {
                "get": {
                    "operationId": "getUser",
                    "summary": "A user's status",
                    "parameters": [user_id],
                    "responses": {
                        "200": _ok("The user's status.", "UserStatus"),
                        "400": bad_request,
                        "404": not_found,
                        **common,
                    },
                }
            },
            "/users/{user_id}/events": {
                "get": {
                    "operationId": "listUserEvents",
                    "summary": "A user's audit trail, newest first",
                    "parameters": [user_id, _limit(default_limit, max_limit)],
                    "responses": {
                        "200": _ok("The user's events, newest first.", "EventList"),
                        "400": bad_request,
                        "404": not_found,
                        **common,
                    },
                }
            },
            "/block/{user_id}": {
                "put": {
                    "operationId": "blockUser",
                    "summary": "Block a user (creates unknown users)",
                    "description": (
                        "No body, or neither `seconds` nor `permanent: true`: the block lasts "
                        "GATEWAY_BLOCK_SECONDS. A new block replaces the one in force."
                    ),
                    "parameters": [user_id],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BlockRequest"}}},
                    },
                    "responses": {
                        "200": _ok("The user's status after the block.", "UserStatus"),
                        "400": bad_request,
                        **common,
                    },
                }
            },
            "/unblock/{user_id}": {
                "put": {
                    "operationId": "unblockUser",
                    "summary": "Lift a user's block and reset strikes to 0 (idempotent)",
                    "parameters": [user_id],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/UnblockRequest"}}},
                    },
                    "responses": {
                        "200": _ok("The user's status after the unblock.", "UserStatus"),
                        "400": bad_request,
                        "404": not_found,
                        **common,
                    },
                }
            },
            "/stats": {
                "get": {
                    "operationId": "getStats",
                    "summary": "Blocked users now; violations and blocks over the last 24 hours",
                    "responses": {"200": _ok("The numbers.", "Stats"), **common},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "getOpenAPI",
                    "summary": "This document (no token needed while the admin API is enabled)",
                    "security": [],
                    "responses": {
                        "200": {"description": "The OpenAPI document.", "content": {"application/json": {}}},
                        "503": {"$ref": "#/components/responses/Unavailable"},
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "GATEWAY_ADMIN_TOKEN"},
            },
            "parameters": {
                "UserId": {
                    "name": "user_id",
                    "in": "path",
                    "required": True,
                    "description": (
                        "The user id, as sent in the user header; percent-encode it "
                        "(`a/b` is `a%2Fb`). No control characters."
                    ),
                    "schema": {"type": "string", "minLength": 1, "maxLength": max_user_id},
                }
            },
            "responses": {
                "BadRequest": _error(
                    "A bad user id, body or query parameter; `error.param` names it",
                    ("invalid_user_id", "invalid_json", "invalid_request"),
                ),
                "Unauthorized": _error("Missing or wrong bearer token", ("invalid_admin_token",)),
                "NotFound": _error("The gateway has never recorded this user", ("user_not_found",)),
                "Unavailable": _error(
                    "The admin API is disabled or the database does not answer",
                    ("admin_disabled", "store_unavailable"),
                ),
            },
            "schemas": {
                "UserStatus": {
                    "type": "object",
                    "required": [
                        "user_id",
                        "strikes",
                        "max_strikes",
                        "blocked",
                        "blocked_until",
                        "permanent",
                        "blocks",
                    ],
                    "properties": {
                        "user_id": {"type": "string"},
                        "strikes": {"type": "integer", "minimum": 0, "description": "0 once a block expired."},
                        "max_strikes": {"type": "integer", "minimum": 1},
                        "blocked": {"type": "boolean"},
                        "blocked_until": {
                            "type": ["string", "null"],
                            "format": "date-time",
                            "description": "UTC; null when not blocked or blocked for good.",
                        },
                        "permanent": {"type": "boolean"},
                        "blocks": {"type": "integer", "minimum": 0, "description": "Policy blocks so far."},
                    },
                },
                "UserList": {
                    "type": "object",
                    "required": ["data", "next"],
                    "properties": {
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/UserStatus"}},
                        "next": {
                            "type": ["string", "null"],
                            "description": "Pass as `after` for the next page; null on the last page.",
                        },
                    },
                },
                "Event": {
                    "type": "object",
                    "required": ["id", "type", "at"],
                    "properties": {
                        "id": {"type": "integer"},
                        "type": {"type": "string", "enum": ["violation", "block", "unblock"]},
                        "at": {"type": "string", "format": "date-time"},
                        "categories": {"type": "array", "items": {"type": "string"}},
                        "detector": {"type": ["string", "null"]},
                        "rule": {"type": ["string", "null"]},
                        "path": {"type": ["string", "null"]},
                        "text_sha256": {"type": ["string", "null"]},
                        "scores": {"type": ["object", "null"], "additionalProperties": {"type": "number"}},
                        "shadow": {"type": "boolean"},
                        "actor": {"type": ["string", "null"], "enum": ["admin", "policy", "expiry", None]},
                        "reason": {"type": ["string", "null"]},
                        "block_number": {"type": ["integer", "null"]},
                        "blocked_until": {"type": ["string", "null"], "format": "date-time"},
                        "permanent": {"type": "boolean"},
                    },
                    "description": (
                        "Violations carry categories, detector, rule, path, text_sha256, scores, shadow; "
                        "blocks and unblocks carry actor, reason, block_number, blocked_until, permanent."
                    ),
                },
                "EventList": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}},
                },
                "Stats": {
                    "type": "object",
                    "required": ["blocked_users", "violations_24h", "blocks_24h", "violations_by_category_24h"],
                    "properties": {
                        "blocked_users": {"type": "integer", "minimum": 0},
                        "violations_24h": {"type": "integer", "minimum": 0},
                        "blocks_24h": {"type": "integer", "minimum": 0},
                        "violations_by_category_24h": {
                            "type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 0},
                        },
                        "shadow_violations_24h": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Violations recorded in shadow mode (no strike).",
                        },
                    },
                },
                "BlockRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": max_seconds},
                        "permanent": {"type": "boolean", "description": "`true`: blocked until unblocked."},
                        "reason": reason,
                    },
                    "not": {"required": ["seconds", "permanent"], "properties": {"permanent": {"const": True}}},
                },
                "UnblockRequest": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"reason": reason},
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "param", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": {"type": ["string", "null"]},
                                "code": {"type": "string"},
                            },
                        }
                    },
                },
            },
        },
    }
