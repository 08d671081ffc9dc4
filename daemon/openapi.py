"""The daemon's HTTP API as an OpenAPI 3.0 document, served at GET /openapi.json.

Written by hand next to the routes (daemon/app.py) rather than generated: the webhook
reads raw bytes for speed, so there is no request model to derive it from. The webhook
body is described loosely on purpose: the daemon accepts any extra field Evolution sends
and answers 200 "ignored" for events that are not a lead's message, so a tighter schema
would describe something other than what the daemon does."""

from __future__ import annotations

from typing import Any

from daemon.config import Config

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


def _event_schema(required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": "an Evolution API v2 webhook; events other than messages.upsert, "
        "messages.edited and presence.update are answered 200 ignored. Any other field is "
        "accepted and unused.",
        "required": required,
        "properties": {
            "event": {
                "type": "string",
                "example": "messages.upsert",
                "description": "messages.upsert or presence.update, in any spelling "
                "(MESSAGES_UPSERT, messages-upsert); on /webhook/evolution/{event} the path names it",
            },
            "instance": {"type": "string", "nullable": True, "example": "sdr"},
            "data": {"anyOf": [_ref("MessageData"), _ref("PresenceData"), _ref("EditData")]},
            "apikey": {
                "type": "string",
                "nullable": True,
                "description": "the instance token (Evolution sends it with AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES"
                "=true): authenticates a webhook that carries no bearer header (the global webhook)",
            },
        },
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "one sentence: what was wrong, and the fix"}},
    },
    "MessageKey": {
        "type": "object",
        "required": ["remoteJid", "id"],
        "properties": {
            "remoteJid": {
                "type": "string",
                "example": "5511987654321@s.whatsapp.net",
                "description": "the chat: a lead is <8-15 digits>@s.whatsapp.net or <lid>@lid; groups "
                "(@g.us), broadcasts and newsletters are ignored",
            },
            "id": {
                "type": "string",
                "maxLength": 256,
                "example": "3EB0C767D26A8B4E1A2F",
                "description": "WhatsApp's message id: de-duplicates retried deliveries",
            },
            "fromMe": {"type": "boolean", "default": False, "description": "true = sent by us: ignored"},
            "participant": {"type": "string", "nullable": True},
            "remoteJidAlt": {
                "type": "string",
                "nullable": True,
                "example": "5511987654321@s.whatsapp.net",
                "description": "Evolution >= 2.3.5: with remoteJid <lid>@lid, the phone (when WhatsApp gives it)",
            },
            "addressingMode": {"type": "string", "nullable": True, "example": "lid"},
        },
    },
    "EditData": {
        "type": "object",
        "description": "messages.edited: the protocolMessage; key.id is the edited message's id",
        "required": ["key"],
        "properties": {
            "key": _ref("MessageKey"),
            "type": {"type": "string", "example": "MESSAGE_EDIT"},
            "editedMessage": {"type": "object", "properties": {"conversation": {"type": "string"}}},
            "timestampMs": {"type": "string", "nullable": True},
        },
    },
    "MediaPart": {
        "type": "object",
        "description": "a photo or voice note; the file itself is fetched from the Evolution API",
        "properties": {
            "mimetype": {"type": "string", "example": "image/jpeg"},
            "caption": {"type": "string"},
            "fileLength": {"type": "string"},
            "seconds": {"type": "integer"},
        },
    },
    "Message": {
        "type": "object",
        "description": "the content: the first of these present is used",
        "properties": {
            "conversation": {"type": "string", "description": "a plain text message"},
            "extendedTextMessage": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "description": "a text message with a link preview, quote or formatting",
            },
            "imageMessage": _ref("MediaPart"),
            "audioMessage": _ref("MediaPart"),
            "base64": {
                "type": "string",
                "description": "the decrypted file, when the instance has 'webhook base64' on",
            },
        },
    },
    "MessageData": {
        "type": "object",
        "required": ["key"],
        "properties": {
            "key": _ref("MessageKey"),
            "pushName": {"type": "string", "nullable": True, "description": "the lead's WhatsApp profile name"},
            "message": {"allOf": [_ref("Message")], "nullable": True},
            "messageType": {"type": "string", "nullable": True, "example": "conversation"},
            "messageTimestamp": {
                "oneOf": [{"type": "integer"}, {"type": "number"}, {"type": "string"}],
                "nullable": True,
                "description": "Unix time in seconds (milliseconds accepted); missing or invalid = now",
            },
        },
    },
    "PresenceData": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "example": "5511987654321@s.whatsapp.net"},
            "presences": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "lastKnownPresence": {
                            "type": "string",
                            "example": "composing",
                            "description": "composing or recording: the lead's buffer window waits longer",
                        }
                    },
                },
            },
        },
    },
    "WebhookEvent": _event_schema(["event", "data"]),
    "WebhookEventNamedInPath": _event_schema(["data"]),  # /webhook/evolution/{event}
    "WebhookResult": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["stored", "duplicate", "ignored", "presence", "edit", "takeover", "echo"],
                "description": "stored: kept durably, a reply follows; duplicate: already stored "
                "(a retried delivery); ignored: not a lead's message; presence: a typing event; "
                "edit: a lead's edit of one of its messages; takeover: a person wrote to the lead "
                "from the business's number, the bot is paused for that lead; echo: one of our own "
                "sends",
            },
            "reason": {
                "type": "string",
                "enum": ["own_send", "group", "broadcast", "event", "no_content", "not_a_phone", "presence", "edit"],
                "description": "why it was ignored (status ignored)",
            },
            "buffer": {
                "type": "string",
                "enum": ["extended", "ignored"],
                "description": "status presence: whether the lead's pending burst now waits longer",
            },
            "edit": {
                "type": "string",
                "enum": ["replaced", "correction", "duplicate", "unknown"],
                "description": "status edit: replaced in a burst still waiting; stored as a correction "
                "for the next turn; already stored; or an edit of a message we never saw",
            },
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["ready", "database", "redis", "buffer", "intake"],
        "properties": {
            "ready": {"type": "boolean"},
            "database": {"type": "string", "description": "ok, or down: <error>"},
            "redis": {"type": "string", "description": "ok, or down: <error>"},
            "buffer": {"type": "string", "description": "ok, or down: <error> (the buffer's own key)"},
            "intake": {"type": "string", "enum": ["ok", "stopped"]},
        },
    },
}


def _webhook(config: Config, with_event: bool, with_token: bool = False) -> dict[str, Any]:
    limits = config.profile.limits
    body = "WebhookEventNamedInPath" if with_event else "WebhookEvent"
    params = [
        {
            "name": "event",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "the event name, for Evolution's 'webhook by events' URLs (or, alone, "
            "the webhook token: /webhook/evolution/<token>)",
        }
    ]
    if with_token:
        params.insert(
            0,
            {
                "name": "token",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "the webhook token, for set-ups that cannot send headers",
            },
        )
    op: dict[str, Any] = {
        "summary": "Receive an Evolution API webhook",
        "description": "Stores a lead's message durably and answers at once; the reply is "
        "sent later. Any non-2xx answer means it was not stored: Evolution retries.",
        "operationId": ("webhookByTokenAndEvent" if with_token else "webhookByEvent") if with_event else "webhook",
        "requestBody": {"required": True, "content": {_JSON: {"schema": _ref(body)}}},
        "responses": {
            "200": {
                "description": "stored, duplicate, ignored, or a typing event taken into account",
                "content": {_JSON: {"schema": _ref("WebhookResult")}},
            },
            "400": _error("the body is not valid JSON (or nests too deeply)"),
            "401": _error(
                "a token is configured and the request carries none of: the bearer header, "
                "the token in the path, the instance token in the body's apikey"
            ),
            "413": _error(f"the body is larger than [webhook] max_body_bytes ({config.webhook.max_body_bytes})"),
            "422": _error("valid JSON but not an Evolution event: the message names the field"),
            "429": {
                "description": f"this lead sent more than [limits] lead_rate ({limits.lead_rate:g}/s, "
                f"bursts of {limits.lead_burst}) to this daemon; retry after Retry-After seconds",
                "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}},
                "content": {_JSON: {"schema": _ref("Error")}},
            },
            "503": _error(
                "not stored: the daemon is shutting down, storage is down, or "
                f"[pools] webhooks_in_flight ({config.profile.pools.webhooks_in_flight}) webhooks are "
                "already being handled; retry"
            ),
        },
    }
    if with_event:
        op["parameters"] = params
    return {"post": op}


def openapi(config: Config) -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sdrctl daemon",
            "version": "1",
            "description": "The intake of a WhatsApp sales agent: Evolution API webhooks in, "
            "health and Prometheus metrics out.",
        },
        "paths": {
            "/webhook/evolution": _webhook(config, with_event=False),
            "/webhook/evolution/{event}": _webhook(config, with_event=True),
            "/webhook/evolution/{token}/{event}": _webhook(config, with_event=True, with_token=True),
            "/healthz": {
                "get": {
                    "summary": "Liveness: the process answers",
                    "operationId": "healthz",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "alive",
                            "content": {
                                _JSON: {
                                    "schema": {
                                        "type": "object",
                                        "required": ["status"],
                                        "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                    }
                                }
                            },
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: PostgreSQL and Redis answer and intake is open",
                    "operationId": "readyz",
                    "security": [],
                    "responses": {
                        "200": {"description": "ready", "content": {_JSON: {"schema": _ref("Readiness")}}},
                        "503": {
                            "description": "not ready: the failing check says why",
                            "content": {_JSON: {"schema": _ref("Readiness")}},
                        },
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "operationId": "metrics",
                    "security": [],
                    "responses": {"200": {"description": "the daemon's series", "content": text}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "security": [],
                    "responses": {
                        "200": {"description": "OpenAPI 3.0", "content": {_JSON: {"schema": {"type": "object"}}}}
                    },
                }
            },
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the token in the environment variable [webhook] token_env; "
                    "when unset the daemon binds to loopback only and asks for none",
                },
            },
        },
        # The webhook takes the token when one is configured, else nothing ({}).
        "security": [{"bearer": []}, {}],
    }
