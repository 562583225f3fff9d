"""Log output: `[log] format = "text"` (key=value lines) or `"json"` (one object per line, for collectors).

Our lines are already structured as `event key=value ...`; the JSON formatter keeps the whole
message and lifts the event name and each key=value pair into fields, so a collector can filter
on `outcome` or `project` without parsing text.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_PAIR = re.compile(r"""(?:^|\s)([a-z_]+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
_RESERVED = {"time", "level", "logger", "message", "event"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        first = message.split(" ", 1)[0]
        if first and "=" not in first:
            entry["event"] = first
        for key, value in _PAIR.findall(message):
            if key not in _RESERVED:
                entry.setdefault(key, value[1:-1] if value[:1] in "'\"" and value[-1:] == value[:1] else value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str = "text", *, access_log: bool = False) -> None:
    """Root handler on stderr in the chosen format; aiosmtpd's per-command chatter kept out."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # aiosmtpd logs every SMTP command at INFO; our own one line per message is the useful record.
    smtp_log = logging.getLogger("mail.log")
    smtp_log.setLevel(logging.WARNING)
    # aiosmtpd itself sets the deprecated Session.login_data on every successful AUTH and warns
    # about its own assignment: a warning per message that no operator can act on.
    smtp_log.addFilter(lambda record: "login_data is deprecated" not in record.getMessage())
    # ...and warns per connection that AUTH without TLS is allowed; the relay says it once at start.
    smtp_log.addFilter(lambda record: "auth_require_tls == False" not in record.getMessage())
    logging.getLogger("inflight.access").setLevel(logging.INFO if access_log else logging.WARNING)
