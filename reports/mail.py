"""Email: SMTP settings from ``[smtp]``, MIME messages with an inline chart, and the transport.

Messages are multipart/alternative: text/plain first, then a multipart/related
holding the HTML and the burn-down PNG it shows by ``cid:``. Connection, TLS
and authentication problems raise :class:`MailError` before anything is sent;
a recipient the server refuses is reported per recipient and the rest go on.

Addresses are parsed and built with the standard library's header registry
(:class:`email.headerregistry.Address`), never by pasting text: a stored recipient or
a user name that does not make one plain ``local@domain`` address (:func:`mail_address`,
:func:`user_address`) is skipped and reported as that recipient's failure, so one bad
recipient never stops the others.
"""

from __future__ import annotations

import hashlib
import logging
import smtplib
import ssl
from dataclasses import dataclass
from datetime import datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from pathlib import Path

from ledger import schema
from ledger.config import Config, SmtpSection
from ledger.errors import ConfigError, LedgerError
from ledger.names import is_user_name

from .render import Rendered

DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}
MAX_ADDRESS = 254  # RFC 5321's limit on a path, and the send logs' column
log = logging.getLogger(__name__)


class MailError(LedgerError):
    """The SMTP server could not be reached, TLS failed or it refused our credentials."""


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: str
    sender: str
    user: str | None = None
    password: str | None = None
    ca_file: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_section(cls, section: dict, where: str = "[smtp]") -> SmtpSettings:
        """An ``[smtp]`` table (read with the schema, ledger.config.SmtpSection)."""
        return cls.from_parsed(schema.parse_table(SmtpSection, section, where), where)

    @classmethod
    def from_parsed(cls, smtp: SmtpSection | None, where: str = "[smtp]") -> SmtpSettings:
        """What sending needs, from a parsed ``[smtp]``: a host, one From address, a password
        from its file when a user is set, and TLS whenever a password is sent."""
        if smtp is None or not smtp.host:
            raise ConfigError(f"{where}: host is required to send mail")
        sender = smtp.sender
        if not sender or len(getaddresses([sender])) != 1 or "@" not in sender:
            raise ConfigError(f"{where}: from must be one email address")
        password = None
        if smtp.password_file:
            try:
                password = Path(smtp.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {where} password_file {smtp.password_file}: "
                                  f"{exc.strerror}") from None
        if smtp.user and password is None:
            raise ConfigError(f"{where}: user is set but password_file is not")
        if smtp.user and smtp.security == "none":
            raise ConfigError(f"{where}: refuses to send a password without TLS "
                              "(security = starttls or ssl)")
        port = smtp.port or DEFAULT_PORTS[smtp.security]
        return cls(host=smtp.host, port=port, security=smtp.security, sender=sender,
                   user=smtp.user, password=password, ca_file=smtp.ca_file,
                   timeout=smtp.timeout)

    @classmethod
    def from_config(cls, config: Config) -> SmtpSettings:
        return cls.from_parsed(config.smtp, f"{config.path}: [smtp]")

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx


class BadAddress(ValueError):
    """A recipient that cannot be one plain mail address; its text says why."""


def mail_address(text: str) -> Address:
    """``text`` as one plain address ``local@domain`` (printable ASCII, no display name,
    comment, group, route or quoted local part), parsed by the header registry; the parse
    must give back exactly ``text``. :class:`BadAddress` otherwise."""
    if not isinstance(text, str) or not text:
        raise BadAddress("empty mail address")
    if len(text) > MAX_ADDRESS or not all(" " < c <= "~" for c in text):
        raise BadAddress("not a mail address (control characters, blanks, non-ASCII or "
                         f"over {MAX_ADDRESS} characters)")
    try:
        addr = Address(addr_spec=text)
    except (ValueError, IndexError, MessageError) as exc:
        raise BadAddress(f"not a mail address ({exc})") from None
    if addr.addr_spec != text or text.startswith('"') or not addr.username or not addr.domain:
        raise BadAddress("not one plain mail address local@domain")
    return addr


def user_address(pattern: str, user: str) -> Address:
    """A user's address from ``[idle] user_mail`` (``"{user}@example.org"``), built as an
    :class:`Address` from the user name and the pattern's domain; :class:`BadAddress` for
    a name that is not a user name (``ledger.names``) or does not make a plain address."""
    if not is_user_name(user):
        raise BadAddress("not a valid user name: no mail address is made from it")
    local, at, domain = pattern.rpartition("@")
    if not at:
        raise BadAddress(f"user_mail {pattern!r} has no @domain")
    try:
        built = Address(username=local.format(user=user), domain=domain.format(user=user))
    except (ValueError, IndexError, KeyError, MessageError) as exc:
        raise BadAddress(f"no mail address for this user name ({exc})") from None
    try:
        return mail_address(built.addr_spec)
    except BadAddress as exc:
        raise BadAddress(f"no plain mail address for this user name: {exc}") from None


def sort_recipients(texts) -> tuple[list[str], dict[str, str]]:
    """(the valid addresses, in order; {each invalid one: why}), each invalid one logged."""
    good: list[str] = []
    bad: dict[str, str] = {}
    for text in dict.fromkeys(texts):
        try:
            mail_address(text)
        except BadAddress as exc:
            bad[text] = f"skipped: {exc}"
            log.warning("skipping recipient %r: %s", text, exc)
        else:
            good.append(text)
    return good, bad


def message_id(kind: str, scope: str, period: str, sender: str) -> str:
    """The same id for the same report whoever receives it, so clients fold a duplicate."""
    domain = sender.rpartition("@")[2].strip(">") or "gpuledger.invalid"
    digest = hashlib.sha256(f"{kind}\0{scope}\0{period}".encode()).hexdigest()[:16]
    return f"<gpuledger.{kind}.{period}.{digest}@{domain}>"


def build_message(r: Rendered, *, sender: str, recipients: list[str], msg_id: str,
                  when: datetime, headers: dict[str, str] | None = None,
                  cid: str | None = None) -> EmailMessage:
    """text/plain + (text/html + inline PNG) as multipart/alternative; ``recipients`` must
    be valid addresses (:func:`sort_recipients`): the To header is built from Addresses."""
    msg = EmailMessage()
    msg["Subject"] = r.subject
    msg["From"] = sender
    msg["To"] = tuple(mail_address(r) for r in recipients)
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = msg_id
    msg["Auto-Submitted"] = "auto-generated"
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(r.text)
    msg.add_alternative(r.html, subtype="html")
    images = list(r.images)
    if r.chart is not None:
        if cid is None:
            raise ValueError("a report with a chart needs its content id")
        images.insert(0, (cid, r.chart, f"{r.name}.png"))
    if images:
        html_part = msg.get_payload()[1]
        for image_cid, png, filename in images:
            html_part.add_related(png, maintype="image", subtype="png", cid=f"<{image_cid}>",
                                  filename=filename, disposition="inline")
    return msg


def chart_cid(r_name: str, sender: str) -> str:
    domain = sender.rpartition("@")[2].strip(">") or "gpuledger.invalid"
    return f"burndown.{r_name}@{domain}"


class Mailer:
    """One SMTP session; ``send`` returns {recipient: error} for refused recipients."""

    def __init__(self, settings: SmtpSettings):
        self.s = settings
        self.smtp: smtplib.SMTP | None = None

    def __enter__(self) -> Mailer:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _where(self) -> str:
        return f"{self.s.host}:{self.s.port}"

    def connect(self) -> None:
        s = self.s
        try:
            if s.security == "ssl":
                smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout,
                                        context=s.tls_context())
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
            try:
                smtp.ehlo()
                if s.security == "starttls":
                    if not smtp.has_extn("starttls"):
                        raise MailError(f"SMTP server {self._where()} does not offer STARTTLS")
                    smtp.starttls(context=s.tls_context())
                    smtp.ehlo()
                if s.user:
                    smtp.login(s.user, s.password or "")
            except BaseException:
                _quiet_close(smtp)
                raise
        except MailError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise MailError(f"SMTP server {self._where()} rejected the credentials of user "
                            f"{s.user!r}: {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except smtplib.SMTPNotSupportedError as exc:
            raise MailError(f"SMTP server {self._where()} does not support "
                            f"{'AUTH' if s.user else 'the request'}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise MailError(f"TLS with SMTP server {self._where()} failed: certificate not "
                            f"trusted ({exc.verify_message}); set [smtp] ca_file") from None
        except ssl.SSLError as exc:
            raise MailError(f"TLS with SMTP server {self._where()} failed: "
                            f"{exc.reason or exc}") from None
        except smtplib.SMTPResponseException as exc:
            raise MailError(f"SMTP server {self._where()} refused the session: "
                            f"{exc.smtp_code} {_text(exc.smtp_error)}") from None
        except (TimeoutError, smtplib.SMTPException, OSError) as exc:
            raise MailError(f"cannot talk to SMTP server {self._where()}: "
                            f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                            ) from None
        self.smtp = smtp

    def close(self) -> None:
        if self.smtp is not None:
            _quiet_close(self.smtp)
            self.smtp = None

    def send(self, msg: EmailMessage, recipients: list[str]) -> dict[str, str]:
        """Send to ``recipients`` (the envelope); the refused ones map to the server's reason.

        A dropped connection is retried once on a fresh one; if that fails too, MailError.
        """
        for attempt in (1, 2):
            if self.smtp is None:
                self.connect()
            try:
                refused = self.smtp.send_message(msg, from_addr=self.s.sender,
                                                 to_addrs=recipients)
                return {r: f"{code} {_text(text)}" for r, (code, text) in refused.items()}
            except smtplib.SMTPRecipientsRefused as exc:
                return {r: f"{code} {_text(text)}" for r, (code, text) in exc.recipients.items()}
            except smtplib.SMTPSenderRefused as exc:
                raise MailError(f"SMTP server {self._where()} refused to take mail from "
                                f"{self.s.sender}: {exc.smtp_code} {_text(exc.smtp_error)}"
                                ) from None
            except smtplib.SMTPDataError as exc:
                _reset(self.smtp)
                why = f"{exc.smtp_code} {_text(exc.smtp_error)}"
                return {r: why for r in recipients}
            except (TimeoutError, smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                self.close()
                if attempt == 2:
                    raise MailError(f"SMTP server {self._where()} dropped the connection: "
                                    f"{exc}") from None
        raise AssertionError("unreachable")


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reset(smtp: smtplib.SMTP) -> None:
    try:
        smtp.rset()
    except (smtplib.SMTPException, OSError):
        pass


def _quiet_close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        try:
            smtp.close()
        except OSError:
            pass


def write_eml(msg: EmailMessage, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(msg))
    return path
