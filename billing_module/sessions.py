"""Sessions the module can trust (issue 12, items 0 and 5).

ahserver 1.2.0 (``AuthAPI.setupAuth``) derives the secret of its encrypted session cookie and of
its auth tickets from the listening port and a constant string, so anyone who knows the port
can mint a session for any user. Therefore:

* the standalone host never runs that setup: its sessions live in the database
  (``web_session``; the cookie carries a random key, the table only the key's SHA-256), so a
  cookie nobody issued names no session, and logout deletes the row, which ends the session on
  the server. The auth tickets inside are signed with a random secret kept 0600 in the data dir.
* inside a host, a session becomes a caller only when the host's sessions are not ahserver's
  default (checked once at start-up, ``check_host_sessions``): an admin caller with a platform
  role in rbac (``auth.host_admin_roles``), a customer caller of the user's organisation with a
  customer role (``auth.customer_roles``). ``harden_host_sessions`` is the host-side fix.
"""
import base64
import hashlib
import json
import logging
import os
import secrets

import aiohttp_session
from aiohttp import web
from aiohttp_auth import auth as aiohttp_auth
from aiohttp_auth.auth.ticket_auth import TktAuthentication
from aiohttp_session.cookie_storage import EncryptedCookieStorage
from cryptography.fernet import Fernet, InvalidToken

from . import datadir
from .errors import Unauthorized
from .session_store import SessionStore

log = logging.getLogger("billing_module.sessions")

SESSION_COOKIE = "AIOHTTP_SESSION"
SECRET_FILE = ".session_secret"
_AHSERVER_PAD = b"iqwertyuiopasdfghjklzxcvbnm12345"


def ahserver_default_secret(port) -> bytes:
    """The secret ahserver 1.2.0 uses when a host keeps its default session setup."""
    b = str(port).encode("utf-8")
    return b + _AHSERVER_PAD[:32 - len(b)]


def session_secret(data_dir: str) -> bytes:
    """32 random bytes (as 43 url-safe characters) generated once into ``<data_dir>/.session_secret``
    (mode 600)."""
    return datadir.secret_file(data_dir, SECRET_FILE, 32).encode("ascii")


def request_is_https(request: web.BaseRequest, behind_proxy: bool) -> bool:
    if behind_proxy and request.headers.get("X-Forwarded-Proto", "").lower() == "https":
        return True
    return request.scheme == "https"


class DatabaseSessionStorage(aiohttp_session.AbstractStorage):
    """aiohttp_session storage with the session data on the server: the cookie is a random key
    (HttpOnly, SameSite=Lax, Secure under https), an empty (logged-out) session deletes its row."""

    def __init__(self, core, server_config):
        super().__init__(cookie_name=SESSION_COOKIE, max_age=server_config.session_lifetime_seconds,
                         httponly=True, samesite="Lax")
        self._core, self._server_config = core, server_config

    @property
    def _store(self) -> SessionStore:
        # the core's, looked up per request: the core builds its services again after close()
        return self._core.sessions

    async def forget(self, key: str) -> None:
        """Delete the stored session ``key`` (a login replaces the session the browser brought)."""
        await self._store.delete(key)

    async def load_session(self, request):
        key = self.load_cookie(request)
        row = await self._store.load(key) if key else None
        if row is None:
            return aiohttp_session.Session(None, data=None, new=True, max_age=self.max_age)
        return aiohttp_session.Session(key, data=json.loads(row.data), new=False, max_age=self.max_age)

    async def save_session(self, request, response, session):
        key = session.identity
        if session.empty:
            if key:
                await self._store.delete(key)
            response.del_cookie(self.cookie_name, path="/")
            return
        if key is None:
            key = secrets.token_urlsafe(32)
            session.set_new_identity(key)
        assert self.max_age is not None, "the storage is built with the configured session lifetime"
        await self._store.save(key, json.dumps(self._get_session_data(session)), self.max_age)
        response.set_cookie(self.cookie_name, key, max_age=self.max_age, path="/", httponly=True, samesite="Lax",
                            secure=request_is_https(request, self._server_config.behind_proxy))


def setup_standalone_sessions(app: web.Application, core, secret: bytes) -> None:
    """What ``AuthAPI.setupAuth`` does, minus its port-derived secret: database sessions and auth
    tickets signed with ``secret``, both living ``server.session_lifetime_seconds``."""
    lifetime = core.config.server.session_lifetime_seconds
    storage = DatabaseSessionStorage(core, core.config.server)
    aiohttp_session.setup(app, storage)
    policy = aiohttp_auth.SessionTktAuthentication(secret, lifetime, reissue_time=max(1, lifetime // 4),
                                                   include_ip=True)
    aiohttp_auth.setup(app, policy)


async def end_session(request: web.Request) -> None:
    """Logout: the session is emptied, so its row is deleted and the old cookie names nothing."""
    session = await aiohttp_session.get_session(request)
    session.invalidate()


async def start_session(request: web.Request, userid: str, orgid: str = "") -> None:
    """Login: a new session (a new key, never one the browser brought along) holding the ticket."""
    from ahserver.auth_api import user_login
    old = await aiohttp_session.get_session(request)
    old.invalidate()
    storage = request.get(aiohttp_session.STORAGE_KEY)
    if old.identity and isinstance(storage, DatabaseSessionStorage):
        await storage.forget(old.identity)
    await aiohttp_session.new_session(request)
    await user_login(request, userid, username=userid, userorgid=orgid or "")


# --- host mode -------------------------------------------------------------------------------------
def _closure_objects(app):
    for middleware in app.middlewares:
        for cell in getattr(middleware, "__closure__", None) or ():
            try:
                yield cell.cell_contents
            except ValueError:   # an empty cell
                continue


def _fernet_accepts(storage: EncryptedCookieStorage, secret: bytes) -> bool:
    probe = Fernet(base64.urlsafe_b64encode(secret)).encrypt(b"probe")
    try:
        storage._fernet.decrypt(probe)
        return True
    except (InvalidToken, AttributeError):
        return False


def default_secret_problem(app: web.Application, port) -> str:
    """Why the app's sessions can be forged by an outsider, or "" when they cannot be (as far as
    can be seen: ahserver's default secret in its cookie storage or its ticket policy)."""
    default = ahserver_default_secret(port)
    for obj in _closure_objects(app):
        if isinstance(obj, EncryptedCookieStorage) and _fernet_accepts(obj, default):
            return "its session cookies are encrypted with ahserver's default (port-derived) secret"
        if isinstance(obj, TktAuthentication) and getattr(obj._ticket, "_secret", None) == default:
            return "its auth tickets are signed with ahserver's default (port-derived) secret"
    return ""


async def check_host_sessions(app: web.Application) -> None:
    """Start-up check (on_startup): decide once whether this host's sessions may be trusted."""
    from ahserver.serverenv import ServerEnv
    from appPublic.jsonConfig import getConfig
    core = ServerEnv().billing_core
    if core is None:
        return
    problem = default_secret_problem(app, getConfig().website.port)
    core.host_sessions_trusted = not problem
    if problem:
        log.error("host sessions are NOT trusted by billing_module: %s; anyone who knows the port can "
                  "forge them. Session callers are refused; use API keys, or fix the host "
                  "(README: 'Sessions, CSRF and the host's session secret').", problem)


async def session_caller(core, request: web.Request):
    """The ``Caller`` of a logged-in session (``Caller.for_session``: a platform role reaches every
    customer, a customer role only its organisation), None without a session; Unauthorized when
    the host's sessions cannot be trusted or the user is gone, Forbidden without a billing role."""
    from ahserver.auth_api import get_session_userinfo

    from .api.registry import Caller
    try:
        info = await get_session_userinfo(request)
    except RuntimeError:   # no session middleware (a bare test app)
        return None
    userid = info.get("userid") if info else None
    if not userid:
        return None
    if not getattr(core, "host_sessions_trusted", False):
        raise Unauthorized("this server's sessions cannot be trusted (see the server log); send an API key")
    roles, organisation = await _user_identity(core, userid, info.get("userorgid"))
    return Caller.for_session(core.config.auth, userid, roles, organisation)


async def _user_identity(core, userid: str, host_orgid):
    """(roles, organisation) of a session's user. Standalone: the configured admin, else a page
    user read now (a disabled one is logged out). In a host: rbac's roles and the ticket's
    ``userorgid`` (what rbac's login put there)."""
    standalone_admin = getattr(core, "standalone_admin", None)
    if standalone_admin is not None:
        if userid == standalone_admin:
            return core.config.auth.host_admin_roles, None
        from .page_users import ADMIN_ROLE
        user = await core.page_users.find(userid)
        if user is None:
            raise Unauthorized("this user is disabled or no longer exists; log in again")
        admin_roles = core.config.auth.host_admin_roles
        return (admin_roles if user.role == ADMIN_ROLE else (user.role,)), user.customer_id
    from ahserver.serverenv import ServerEnv
    get_user_roles = ServerEnv().get_user_roles     # registered by rbac's load_rbac()
    if get_user_roles is None:
        log.error("no rbac get_user_roles in ServerEnv: session callers cannot be checked and are refused")
        return (), None
    roles = get_user_roles(userid)
    if hasattr(roles, "__await__"):
        roles = await roles
    return tuple(roles or ()), host_orgid or None


def harden_host_sessions(secret_file: str, lifetime_seconds: int = 8 * 3600) -> None:
    """The host-side fix: call from the host's ``init()`` (before the app is built). ahserver's
    ``setupAuth`` is replaced by one whose cookie storage and tickets use a random secret kept
    in ``secret_file`` (created 0600 on first use), with SameSite=Lax cookies."""
    from ahserver.auth_api import AuthAPI
    directory, name = os.path.split(os.path.abspath(secret_file))
    os.makedirs(directory, exist_ok=True)
    secret = hashlib.sha256(datadir.secret_file(directory, name, 32).encode("ascii")).digest()

    async def setupAuth(self, app):
        storage = EncryptedCookieStorage(secret, httponly=True, samesite="Lax", max_age=lifetime_seconds)
        aiohttp_session.setup(app, storage)
        policy = aiohttp_auth.SessionTktAuthentication(secret, lifetime_seconds,
                                                       reissue_time=max(1, lifetime_seconds // 4), include_ip=True)
        aiohttp_auth.setup(app, policy)
        app.middlewares.append(self.checkAuth)
    AuthAPI.setupAuth = setupAuth
