"""What Evolution API 2.2-2.3 posts to a webhook, read into what the gateway acts on.

Pure functions over the decoded JSON body: no Flask, no database. The shapes follow
Evolution's own code (``prepareMessage`` and the ``messages.upsert`` / ``messages.update``
handlers of its Baileys channel) and the payloads its users report. Evolution never retries
a 4xx, so `Malformed` is kept for bodies that are not Evolution webhooks at all; anything
else Evolution may send is either acted on or `Ignored` with one of IGNORE_REASONS.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from app.vocabulary import IGNORE_REASONS  # noqa: F401 - the parser's answers

MESSAGE_EVENT = "messages.upsert"
UPDATE_EVENT = "messages.update"

_PHONE_JID = re.compile(r"^\+?([0-9]{5,20})(?::[0-9]+)?(?:@(?:s\.whatsapp\.net|c\.us))?$")
_LID_JID = re.compile(r"^([0-9]{1,30})(?::[0-9]+)?@lid$")
# Wrappers WhatsApp puts around the real content; each holds {"message": {...}}.
_WRAPPERS = ("ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
             "viewOnceMessageV2Extension", "documentWithCaptionMessage")
_CAPTIONED = ("imageMessage", "videoMessage", "documentMessage")
# Keys of `message` that describe context, not content.
_NOT_CONTENT = {"messageContextInfo", "senderKeyDistributionMessage", "base64", "mediaUrl",
                "speechToText"}
_RECEIPTS = {"DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read",
             3: "delivered", 4: "read", 5: "read"}
# messageTimestamp outside these bounds is not a WhatsApp time: not recorded.
_TS_MIN = dt.datetime(2009, 1, 1, tzinfo=dt.timezone.utc).timestamp()


class Malformed(ValueError):
    """Not an Evolution webhook; str() names what is wrong (the 400's message)."""


@dataclass(frozen=True)
class Ignored:
    """A valid webhook the gateway does not act on."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Inbound:
    """A user's text message to process."""

    message_id: str
    text: str
    message_type: str
    remote_jid: str
    phone: str | None       # digits, when the payload names the sender's phone
    lid: str | None         # digits of the sender's LID, when addressed by LID
    platform_ts: dt.datetime | None

    @property
    def reply_number(self) -> str:
        """The sendText `number`: the phone's digits, else the LID JID."""
        return self.phone if self.phone else f"{self.lid}@lid"


@dataclass(frozen=True)
class Receipt:
    """A delivery or read receipt of a message the instance sent."""

    message_id: str
    status: str             # delivered | read


def normalize_event(name: str) -> str:
    """`MESSAGES_UPSERT`, `messages-upsert` and `messages.upsert` are one event."""
    return name.strip().lower().replace("_", ".").replace("-", ".")


def read_webhook(body: dict) -> Inbound | Receipt | Ignored:
    """Classify a decoded webhook body whose `event` is a string; Malformed if it is no webhook."""
    event = normalize_event(body["event"])
    if event == MESSAGE_EVENT:
        return _read_upsert(body.get("data"))
    if event == UPDATE_EVENT:
        return _read_update(body.get("data"))
    return Ignored("event", f"event {body['event'][:64]} is not handled")


def _read_upsert(data: Any) -> Inbound | Ignored:
    if isinstance(data, list):
        return Ignored("list_data", "data is a list, not one message")
    if not isinstance(data, dict):
        raise Malformed("missing field: data" if data is None else "wrong type for field: data")
    key = data.get("key")
    if not isinstance(key, dict):
        raise Malformed("missing field: data.key" if key is None else "wrong type for field: data.key")
    jid = _required_str(key, "remoteJid", "data.key.remoteJid")
    if "@" not in jid:  # every address Evolution sends is a JID: user@server
        raise Malformed("data.key.remoteJid is not a WhatsApp JID (user@server)")
    msg_id = _required_str(key, "id", "data.key.id")
    if len(msg_id) > 128:
        raise Malformed("data.key.id must be 1 to 128 characters")
    if "\x00" in msg_id:  # PostgreSQL text cannot hold NUL; an id is never rewritten
        raise Malformed("data.key.id must not contain NUL characters")

    if _truthy(key.get("fromMe")):
        return Ignored("from_me", "message sent by this instance (fromMe)")
    if jid.endswith("@g.us"):
        return Ignored("group", "group messages are not handled")
    if jid.endswith("@broadcast") or jid.endswith("@newsletter"):
        return Ignored("broadcast", "status, broadcast and channel messages are not handled")
    phone, lid = _address(jid, key, data)
    if phone is None and lid is None:
        return Ignored("unsupported_jid", f"not a WhatsApp user address: {jid[:64]}")

    message = _unwrap(data.get("message"))
    declared = data.get("messageType")
    message_type = (declared if isinstance(declared, str) and declared
                    else _content_type(message) or "unknown")[:64]
    if not message:
        return Ignored("no_message", "message is empty (a stub or an undecryptable message)")
    skip = _not_text(message)
    if skip is not None:
        return skip
    text = _text(message)
    if text is None:
        kind = _content_type(message) or message_type
        if kind == "audioMessage" or kind == "pttMessage":
            return Ignored("audio", "voice notes and audio are not handled")
        if kind == "stickerMessage":
            return Ignored("sticker", "stickers are not handled")
        return Ignored("no_text", f"{kind[:64]} has no text")
    return Inbound(message_id=msg_id, text=text, message_type=message_type, remote_jid=jid,
                   phone=phone, lid=lid, platform_ts=platform_time(data.get("messageTimestamp")))


def _read_update(data: Any) -> Receipt | Ignored:
    if isinstance(data, list):
        return Ignored("list_data", "data is a list, not one update")
    if not isinstance(data, dict):
        return Ignored("receipt", "messages.update without data")
    # 2.x flattens the key into data (keyId, fromMe, status); older builds kept key/update.
    key: dict = data["key"] if isinstance(data.get("key"), dict) else data
    update: dict = data["update"] if isinstance(data.get("update"), dict) else data
    msg_id = data.get("keyId") if isinstance(data.get("keyId"), str) else key.get("id")
    status = update.get("status")
    if isinstance(update.get("message"), dict) or status == "EDITED":
        return Ignored("edited", "message edits are not handled")
    if status == "DELETED":
        return Ignored("revoked", "deleted messages are not handled")
    kind = _RECEIPTS.get(status) if isinstance(status, (str, int)) and not isinstance(status, bool) else None
    if kind is None:
        return Ignored("receipt", f"status {str(status)[:32]} is not a delivery or read receipt")
    if not _truthy(key.get("fromMe")):
        return Ignored("receipt", "receipt of a message the instance received, not sent")
    if not isinstance(msg_id, str) or not 1 <= len(msg_id) <= 128 or "\x00" in msg_id:
        return Ignored("receipt", "receipt without a message id")
    return Receipt(message_id=msg_id, status=kind)


def _required_str(obj: dict, name: str, path: str) -> str:
    value = obj.get(name)
    if value is None or value == "":
        raise Malformed(f"missing field: {path}")
    if not isinstance(value, str):
        raise Malformed(f"wrong type for field: {path}")
    return value


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _phone(value: Any) -> str | None:
    if not isinstance(value, str) or "@lid" in value:
        return None
    match = _PHONE_JID.match(value.strip())
    return match.group(1) if match else None


def _lid(value: Any) -> str | None:
    match = _LID_JID.match(value.strip()) if isinstance(value, str) else None
    return match.group(1) if match else None


def _address(jid: str, key: dict, data: dict) -> tuple[str | None, str | None]:
    """(phone digits, LID digits) of the sender of a one-to-one message.

    WhatsApp's LID migration puts `<lid>@lid` in remoteJid with the phone JID in
    remoteJidAlt (Baileys 7) or senderPn (earlier builds); builds that swap them back put
    the phone in remoteJid and the LID in remoteJidAlt or senderLid.
    """
    if _lid(jid) is None and _phone(jid) is None:
        return None, None
    alts = (key.get("remoteJidAlt"), key.get("senderPn"), data.get("senderPn"))
    phone = _phone(jid) or next((p for p in map(_phone, alts) if p), None)
    lid = _lid(jid) or next((x for x in map(_lid, (key.get("remoteJidAlt"), key.get("senderLid"),
                                                    data.get("senderLid"))) if x), None)
    return phone, lid


def _unwrap(message: Any) -> dict:
    for _ in range(4):  # wrappers nest (an ephemeral view-once message): a few levels at most
        if not isinstance(message, dict):
            return {}
        inner = next((message[w].get("message") for w in _WRAPPERS
                      if isinstance(message.get(w), dict) and isinstance(message[w].get("message"), dict)),
                     None)
        if inner is None:
            return message
        message = inner
    return message if isinstance(message, dict) else {}


def _content_type(message: dict) -> str | None:
    return next((k for k in message if k not in _NOT_CONTENT), None)


def _not_text(message: dict) -> Ignored | None:
    if "reactionMessage" in message:
        return Ignored("reaction", "reactions are not handled")
    if "editedMessage" in message:
        return Ignored("edited", "message edits are not handled")
    proto = message.get("protocolMessage")
    if proto is not None:
        proto = proto if isinstance(proto, dict) else {}
        kind = proto.get("type")
        if "editedMessage" in proto or kind in ("MESSAGE_EDIT", 14):
            return Ignored("edited", "message edits are not handled")
        if kind in ("REVOKE", 0):
            return Ignored("revoked", "deleted messages are not handled")
        return Ignored("protocol", f"protocol message {str(kind)[:32]} is not handled")
    return None


def _text(message: dict) -> str | None:
    candidates: list[Any] = [message.get("conversation")]
    ext = message.get("extendedTextMessage")
    if isinstance(ext, dict):
        candidates.append(ext.get("text"))
    for kind in _CAPTIONED:
        media = message.get(kind)
        if isinstance(media, dict):
            candidates.append(media.get("caption"))
    # A tap on a button or list row is the user's answer, in words.
    for kind, field in (("buttonsResponseMessage", "selectedDisplayText"),
                        ("templateButtonReplyMessage", "selectedDisplayText"),
                        ("listResponseMessage", "title")):
        reply = message.get(kind)
        if isinstance(reply, dict):
            candidates.append(reply.get(field))
    return next((c for c in candidates if isinstance(c, str) and c.strip()), None)


def platform_time(value: Any) -> dt.datetime | None:
    """WhatsApp's messageTimestamp (seconds; a number, a digit string or a protobuf Long
    object {low, high, unsigned}) as a UTC datetime; None when absent or implausible."""
    seconds: float | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip().isdigit():
        seconds = float(value.strip())
    elif isinstance(value, dict) and isinstance(value.get("low"), int) and isinstance(value.get("high", 0), int):
        seconds = float(((value.get("high", 0) & 0xFFFFFFFF) << 32) | (value["low"] & 0xFFFFFFFF))
    if seconds is None or seconds != seconds:
        return None
    if seconds > 1e12:  # milliseconds
        seconds /= 1000.0
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    if not _TS_MIN <= seconds <= now + 86_400:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
