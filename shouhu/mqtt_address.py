"""Where the MQTT broker is and how to reach it: ``SHOUHU_MQTT_URL`` (``mqtt://`` or
``mqtts://``, with optional credentials) taken apart for paho, with the TLS files of
``SHOUHU_MQTT_CA_FILE``, ``…_CERT_FILE`` and ``…_KEY_FILE``. The hub, the gateway, the
API's connections and the simulated devices all connect with it.

Code passes the broker around as one URL string; ``broker_url`` folds the TLS settings
into that URL's query (``?ca_file=…``), so every client that parses it trusts the same CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from shouhu.settings import Settings

TLS_FILES = ("ca_file", "cert_file", "key_file")


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    # With tls: the CA to trust (None: the system's), a client certificate and its key.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        query = parse_qs(parts.query)
        files = {name: query[name][-1] if name in query else None for name in TLS_FILES}
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or (8883 if tls else 1883),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            **files,
        )

    def configure(self, client: mqtt.Client) -> None:
        """Give ``client`` the credentials and, for ``mqtts``, TLS verifying the broker's
        certificate and host name against the CA."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(ca_certs=self.ca_file, certfile=self.cert_file, keyfile=self.key_file)


def with_tls_files(url: str, ca_file: str = "", cert_file: str = "", key_file: str = "") -> str:
    """``url`` with the TLS files given added to its query (those already there stay)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    for name, value in zip(TLS_FILES, (ca_file, cert_file, key_file), strict=True):
        if value and name not in query:
            query[name] = [value]
    return urlunsplit(parts._replace(query=urlencode(query, doseq=True)))


def broker_url(settings: Settings) -> str:
    """The configured broker with its TLS files, or the embedded broker's address."""
    if not settings.mqtt_url:
        from shouhu.embedded.broker import DEFAULT_PORT

        return f"mqtt://127.0.0.1:{DEFAULT_PORT}"
    return with_tls_files(settings.mqtt_url, settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file)
