"""The access check every /v2 request goes through: who the client is (its upstream
identity, and the passthrough user it logged in as) and whether it may do what it asks.

With PROXY_MODE=authenticated or HTPASSWD_FILE, /v2/ answers the Bearer challenge;
clients then bring a Bearer token from passthrough's token service, or Basic
credentials sent straight with the request. A Basic challenge would not do: dockerd
without credentials drops a mirror whose /v2/ asks for Basic and pulls from Docker Hub
instead, while it follows a Bearer challenge anonymously. The challenge's realm is
PUBLIC_URL, never the Host header, which the client controls.

Who may do what (:class:`Gate`):

- hosted names (HOSTED_REPOSITORIES): pull, push and delete need a user from
  HTPASSWD_FILE (Basic is checked against it; a token carries the user the token
  service checked), narrowed by ACCESS_FILE; anonymous pull only with
  HOSTED_ANONYMOUS_PULL. A user lacking the permission gets 403 DENIED; a client
  without a login gets 401 with the challenge for the scope it needs.
- proxied names: pull only (push and delete are 403 DENIED naming the hosted
  patterns). In PROXY_MODE=authenticated their Basic credentials are the client's
  upstream login, judged upstream, never here; in transparent mode anonymous pulls go
  straight through and Basic credentials must be a passthrough user's.
- failed logins are counted (``passthrough_login_failures_total{reason}``) and limited
  per client address (:class:`LoginLimiter` per worker process, or
  :class:`RedisLoginLimiter` across workers and replicas with REDIS_URL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from passthrough.config import ConfigError, Settings
from passthrough.errors import (
    BadRequest,
    Denied,
    InsufficientScope,
    LoginFailed,
    PassthroughError,
    TokenInvalid,
    TokenRequired,
    TooManyLogins,
)
from passthrough.observe import metrics
from passthrough.oci.reference import quote_input
from passthrough.registry.routing import check_name, is_hosted
from passthrough.registry.rules import ACTIONS, AccessFile
from passthrough.registry.tokens import (
    SERVICE,
    Grant,
    Scope,
    TokenService,
    grantable_scopes,
    is_repository_name,
)
from passthrough.registry.users import Users
from passthrough.upstream.auth import Credentials, parse_basic_authorization

log = logging.getLogger(__name__)

Via = Literal["none", "bearer", "basic"]

#: The catalog's scope (GET /v2/_catalog), as distribution's token servers name it.
CATALOG_SCOPE = "registry:catalog:*"
#: Failed logins one client address may make per window before it is refused (429).
LOGIN_FAILURES_ALLOWED = 10
LOGIN_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Identity:
    """The client of one /v2 request: the upstream credentials it brought (in a token or
    as Basic), a name for logs (the username, never the password), how it came, and
    ``user``: the passthrough user (HTPASSWD_FILE) it proved to be, if any."""

    credentials: Credentials | None = field(repr=False)
    subject: str | None
    via: Via
    user: str | None = None


ANONYMOUS = Identity(None, None, "none")


def token_realm(settings: Settings) -> str:
    """Where clients fetch tokens: PUBLIC_URL + /v2/token."""
    if settings.public_url is None:
        # load_settings refuses authenticated mode without PUBLIC_URL; a Settings built
        # by hand may still lack it, and the Host header is no substitute.
        raise PassthroughError("PUBLIC_URL is not set: there is no token realm to send clients to")
    return settings.public_url.rstrip("/") + "/v2/token"


def challenge(
    settings: Settings,
    repository: str | None = None,
    action: str = "pull",
    error: str | None = None,
    *,
    scope: str | None = None,
) -> str:
    """The WWW-Authenticate value for a 401 from /v2. ``action`` may list several
    (``pull,push``); ``scope`` gives a whole scope instead (``registry:catalog:*``)."""
    parts = [f'realm="{token_realm(settings)}"', f'service="{SERVICE}"']
    # Only a well-formed name goes into the header: it comes from the request path.
    actions_ok = all(a.isalpha() for a in action.split(","))
    if scope is not None:
        parts.append(f'scope="{scope}"')
    elif repository is not None and is_repository_name(repository) and actions_ok:
        parts.append(f'scope="repository:{repository}:{action}"')
    if error is not None:
        parts.append(f'error="{error}"')
    return "Bearer " + ",".join(parts)


def _scope_actions(action: str) -> str:
    # A push also reads (blob HEADs, mounts): clients ask for both, as docker does.
    return "pull,push" if action == "push" else action


def not_hosted(settings: Settings, repository: str) -> Denied:
    """The one refusal of a push or delete on a proxied name (403 DENIED), naming where
    pushes go: whoever asks, no credentials make a proxied name writable."""
    if not settings.hosted_repositories:
        return Denied(
            f"{quote_input(repository)} is not a hosted repository; this service hosts "
            "none (HOSTED_REPOSITORIES is not set), it only proxies"
        )
    return Denied(
        f"{quote_input(repository)} is not a hosted repository; pushes go to: "
        + ", ".join(settings.hosted_repositories)
    )


def may_read_hosted(
    settings: Settings, gate: Gate | None, identity: Identity, repository: str
) -> bool:
    """Whether ``identity`` may read ``repository`` as a hosted repository: the source
    of a cross-repository mount, an entry of the catalog. A proxied or malformed name
    never is one; ``gate`` is None when authentication is off (then every client may)."""
    try:
        hosted = is_hosted(settings, check_name(repository))
    except BadRequest:
        return False
    return hosted and (gate is None or gate.may(identity, repository, "pull"))


class LoginLimiter:
    """Failed logins per client address in a sliding window. Per worker process: with
    W gunicorn workers an address gets at most W times the limit before every worker
    refuses it, which still turns a brute force from thousands of guesses a minute into
    a few dozen."""

    def __init__(
        self,
        limit: int = LOGIN_FAILURES_ALLOWED,
        window: float = LOGIN_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 65536,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_clients = max_clients
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def retry_after(self, client: str) -> int | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        with self._lock:
            now = self._clock()
            failures = self._recent(client, now)
            if failures is None or len(failures) < self.limit:
                return None
            # The window opens again when the oldest failure in it leaves.
            return max(1, int(failures[0] + self.window - now + 0.999))

    def failed(self, client: str) -> None:
        with self._lock:
            now = self._clock()
            failures = self._recent(client, now)
            if failures is None:
                failures = self._failures[client] = deque(maxlen=self.limit)
            failures.append(now)
            self._failures.move_to_end(client)
            # Bounded memory whatever the number of addresses: the stalest go first.
            while len(self._failures) > self._max_clients:
                self._failures.popitem(last=False)


class RedisLoginLimiter(LoginLimiter):
    """The failed-login count shared by every worker and replica through REDIS_URL: one
    key per address (``passthrough:login-failures:<address>``) counting the failures of a
    window that starts with the first. While Redis cannot be reached, each worker's own
    count (kept all along) decides, so an outage neither locks everyone out nor lifts the
    limit."""

    def __init__(
        self,
        url: str,
        limit: int = LOGIN_FAILURES_ALLOWED,
        window: float = LOGIN_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        namespace: str = "passthrough:login-failures:",
    ) -> None:
        super().__init__(limit, window, clock=clock)
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)
        self._namespace = namespace
        self._warned_at = -1e9

    def _down(self, exc: BaseException) -> None:
        now = self._clock()
        # Once a minute at most, and never the URL (it may hold a password).
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning(
                "REDIS_URL failed for the login limiter (%s); counting per worker",
                type(exc).__name__,
            )

    def retry_after(self, client: str) -> int | None:
        local = super().retry_after(client)
        try:
            pipe = self._client.pipeline()
            pipe.get(self._namespace + client)
            pipe.pttl(self._namespace + client)
            count, ttl = pipe.execute()
        except self._errors as exc:
            self._down(exc)
            return local
        if count is None or int(count) < self.limit:
            return local
        return max(1, -(-int(ttl) // 1000)) if int(ttl) > 0 else int(self.window)

    def failed(self, client: str) -> None:
        super().failed(client)
        key = self._namespace + client
        try:
            pipe = self._client.pipeline()
            # The window starts with the first failure: the key expires with it.
            pipe.set(key, 0, ex=max(1, int(self.window)), nx=True)
            pipe.incr(key)
            pipe.execute()
        except self._errors as exc:
            self._down(exc)


@dataclass
class Gate:
    """Who may do what: the users (HTPASSWD_FILE), the rules (ACCESS_FILE) and the
    failed-login limiter. One per app (worker); :meth:`create` validates the files."""

    settings: Settings
    users: Users | None = None
    access: AccessFile | None = None
    limiter: LoginLimiter = field(default_factory=LoginLimiter)

    @classmethod
    def create(cls, settings: Settings) -> Gate:
        """The gate for ``settings``; ConfigError for a bad HTPASSWD_FILE or ACCESS_FILE."""
        if settings.access_file is not None and settings.htpasswd_file is None:
            raise ConfigError("ACCESS_FILE needs HTPASSWD_FILE: its rules name users")
        users = Users(settings.htpasswd_file) if settings.htpasswd_file else None
        access = AccessFile(settings.access_file) if settings.access_file else None
        if access is not None and users is not None:
            rules = access.rules()
            if rules.mentions_anonymous and not settings.hosted_anonymous_pull:
                log.warning(
                    "ACCESS_FILE lets anonymous pull, but HOSTED_ANONYMOUS_PULL is off: "
                    "anonymous clients pull no hosted repository"
                )
            named = {
                name for rule in rules.rules for names in rule.allowed.values() for name in names
            } - {"*", "anonymous"}
            unknown = sorted(named - users.names())
            if unknown:
                log.warning("ACCESS_FILE names users HTPASSWD_FILE lacks: %s", ", ".join(unknown))
        limiter = LoginLimiter()
        if users is not None and settings.redis_url:
            # One count for every worker and replica, as REDIS_URL already shares the lock.
            limiter = RedisLoginLimiter(settings.redis_url)
        return cls(settings, users, access, limiter)

    # -- logins ------------------------------------------------------------------------------

    def is_user(self, username: str) -> bool:
        return self.users is not None and self.users.exists(username)

    def login(self, credentials: Credentials, client: str | None, headers: dict[str, str]) -> str:
        """The user ``credentials`` prove, or LoginFailed (401 with ``headers``, counted
        against ``client``) or TooManyLogins (429) when ``client`` failed too often."""
        address = client or "unknown"
        wait = self.limiter.retry_after(address)
        if wait is not None:
            metrics.login_failure("rate_limited")
            log.info("login refused: too many failures from %s", address)
            raise TooManyLogins(
                f"too many failed logins from this address; try again in {wait} s",
                headers={"Retry-After": str(wait)},
            )
        if self.users is not None and self.users.verify(credentials.username, credentials.password):
            return credentials.username
        reason = "wrong_password" if self.is_user(credentials.username) else "unknown_user"
        self.limiter.failed(address)
        metrics.login_failure(reason)
        # Neither the password nor the user name (a password typed into the wrong field).
        log.info("login refused (%s) from %s", reason, address)
        raise LoginFailed("wrong user name or password", headers=headers)

    # -- permissions -------------------------------------------------------------------------

    def is_admin(self, user: str | None) -> bool:
        """Whether ``user`` (None: anonymous, never) administers the door: the inventory of
        cached images, sync runs, evictions. With ACCESS_FILE, the members of its ``admin``
        group; without it every HTPASSWD_FILE user, who may already do everything."""
        if user is None or not self.is_user(user):
            return False
        return self.access is None or self.access.rules().is_admin(user)

    def user_may(self, user: str | None, repository: str, action: str) -> bool:
        """Whether ``user`` (None: anonymous) may ``action`` on ``repository``."""
        if not is_hosted(self.settings, repository):
            # Proxied: pulls only, and upstream has the last word on those.
            return action == "pull"
        if action not in ACTIONS:
            return False
        if user is None:
            if action != "pull" or not self.settings.hosted_anonymous_pull:
                return False
        elif not self.is_user(user):
            # Removed from HTPASSWD_FILE since its token was issued.
            return False
        if self.access is None:
            return True
        return self.access.rules().allows(user, repository, action)

    def may(self, identity: Identity, repository: str, action: str) -> bool:
        """Whether ``identity`` may ``action`` (pull, push, delete) on ``repository``:
        for the catalog's filter and the push routes."""
        return self.user_may(identity.user, repository, action)

    def grant(self, user: str | None, requested: Iterable[Scope]) -> tuple[Scope, ...]:
        """What the token service grants ``user`` (None: anonymous) of ``requested``:
        on hosted names the actions the user may do, on proxied names pull, the
        catalog to users; whatever else is asked is dropped, not refused."""
        granted: list[Scope] = []
        proxied: list[Scope] = []
        for scope in requested:
            if scope.type == "registry" and scope.name == "catalog":
                if user is not None and ("*" in scope.actions or not scope.actions):
                    granted.append(Scope("registry", "catalog", frozenset({"*"})))
                continue
            if scope.type != "repository" or not is_hosted(self.settings, scope.name):
                proxied.append(scope)
                continue
            asked = set(ACTIONS) if "*" in scope.actions else set(scope.actions)
            actions = frozenset(
                a for a in asked if a in ACTIONS and self.user_may(user, scope.name, a)
            )
            if actions:
                granted.append(Scope("repository", scope.name, actions))
        return (*grantable_scopes(self.settings, proxied), *granted)


def _refuse(
    settings: Settings, identity: Identity, repository: str, action: str
) -> PassthroughError:
    """403 for a user lacking the permission; 401 with the challenge for no login."""
    if identity.user is not None:
        return Denied(f"user {identity.user!r} may not {action} {quote_input(repository)}")
    return TokenRequired(
        f"{action} on {quote_input(repository)} needs a login",
        headers={"WWW-Authenticate": challenge(settings, repository, _scope_actions(action))},
    )


def check_access(
    settings: Settings,
    tokens: TokenService | None,
    authorization: str | None,
    repository: str | None,
    action: str = "pull",
    *,
    gate: Gate | None = None,
    client: str | None = None,
) -> Identity:
    """The identity of a /v2 request, or the error that refuses it: 401 with the Bearer
    challenge (no or a wrong login), 403 DENIED (a push to a proxied name, a user
    lacking the permission), 429 (too many failed logins from ``client``).

    ``repository`` None is the ``/v2/`` base check: any valid token will do, and Basic
    credentials naming a passthrough user are checked. ``gate`` is the app's
    :class:`Gate`; it is required with HTPASSWD_FILE.
    """
    if not settings.auth_enabled:
        # Transparent mode: the service's own identity goes upstream; the header means
        # nothing here, a token from the (optional) endpoint included.
        return ANONYMOUS
    if gate is None:
        if settings.htpasswd_file is not None:
            raise PassthroughError("HTPASSWD_FILE is set but its users were not loaded")
        gate = Gate(settings)
    hosted = repository is not None and is_hosted(settings, repository)
    if repository is not None and not hosted and action != "pull":
        raise not_hosted(settings, repository)
    wanted = _scope_actions(action)
    scheme, _, value = (authorization or "").strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        # A malformed Basic header is a 400 (parse_basic_authorization), as on the tar routes.
        credentials = parse_basic_authorization(authorization)
        assert credentials is not None
        if _is_upstream_login(settings, gate, credentials, repository, hosted):
            return Identity(credentials, credentials.username, "basic")
        header = {"WWW-Authenticate": challenge(settings, repository, wanted)}
        identity = _user_login(settings, gate, credentials, client, header)
    elif scheme == "bearer":
        identity = _bearer_identity(settings, gate, tokens, value, repository, action, hosted)
    elif hosted:
        identity = ANONYMOUS  # the gate below says whether anonymous may
    elif settings.proxy_mode == "authenticated" or repository is None:
        raise TokenRequired(
            "authentication required: get a Bearer token from the token service",
            headers={"WWW-Authenticate": challenge(settings, repository, wanted)},
        )
    else:
        # Transparent mode, a proxied name: pulls need no login (the service's own
        # identity goes upstream), so curl and scripts keep working without one.
        return ANONYMOUS
    # A token's scopes were the rules when it was issued; the rules now decide.
    if hosted and repository is not None and not gate.may(identity, repository, action):
        raise _refuse(settings, identity, repository, action)
    return identity


def _is_upstream_login(
    settings: Settings,
    gate: Gate,
    credentials: Credentials,
    repository: str | None,
    hosted: bool,
) -> bool:
    """Whether Basic credentials are the client's upstream login, passed on unchecked
    (only upstream can judge them): always without HTPASSWD_FILE; in authenticated mode
    on a proxied name, and on the base check when they name no passthrough user."""
    if gate.users is None:
        return True
    if settings.proxy_mode != "authenticated" or hosted:
        return False
    return repository is not None or not gate.is_user(credentials.username)


def _bearer_identity(
    settings: Settings,
    gate: Gate,
    tokens: TokenService | None,
    value: str,
    repository: str | None,
    action: str,
    hosted: bool,
) -> Identity:
    """The identity a Bearer token carries, when it grants ``action`` on ``repository``
    (401 for an invalid token or one lacking the scope; 403 when its user may not)."""
    wanted = _scope_actions(action)
    grant = _verify_bearer(tokens, value, challenge(settings, repository, wanted, "invalid_token"))
    identity = Identity(grant.credentials, grant.subject, "bearer", grant.user)
    if repository is None or grant.allows(repository, action):
        return identity
    if hosted and grant.user is not None and not gate.may(identity, repository, action):
        # The token lacks the scope because the user may not: asking again would not
        # help, so say so (docker shows "denied: …", not a login prompt).
        raise _refuse(settings, identity, repository, action)
    raise InsufficientScope(
        f"the token does not grant {action} on this repository; ask for its scope",
        headers={"WWW-Authenticate": challenge(settings, repository, wanted, "insufficient_scope")},
    )


def _user_login(
    settings: Settings,
    gate: Gate,
    credentials: Credentials,
    client: str | None,
    header: dict[str, str],
) -> Identity:
    """A passthrough user's Basic login (401 with ``header``, or 429, when it fails);
    in authenticated mode the credentials travel on, as the client's upstream login."""
    user = gate.login(credentials, client, header)
    carried = credentials if settings.proxy_mode == "authenticated" else None
    return Identity(carried, user, "basic", user)


def _verify_bearer(tokens: TokenService | None, value: str, invalid_challenge: str) -> Grant:
    """The grant of a Bearer token; an invalid or expired one is TokenInvalid (401)
    carrying ``invalid_challenge``."""
    if tokens is None:
        raise PassthroughError("TOKEN_SECRET is not set: Bearer tokens cannot be verified")
    try:
        return tokens.verify(value.strip())
    except TokenInvalid as exc:
        raise TokenInvalid(exc.message, headers={"WWW-Authenticate": invalid_challenge}) from None


def check_catalog(
    settings: Settings,
    tokens: TokenService | None,
    authorization: str | None,
    *,
    gate: Gate,
    client: str | None = None,
) -> Identity:
    """GET /v2/_catalog: users only (Basic checked here, or a token granting
    ``registry:catalog:*`` to a user); filter the listing with :meth:`Gate.may`."""
    if not settings.auth_enabled:
        return ANONYMOUS
    header = {"WWW-Authenticate": challenge(settings, scope=CATALOG_SCOPE)}
    credentials = parse_basic_authorization(authorization)
    if credentials is not None:
        if gate.users is None:
            raise LoginFailed(
                "the catalog lists hosted repositories: it needs a user", headers=header
            )
        return _user_login(settings, gate, credentials, client, header)
    scheme, _, value = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        raise TokenRequired("the catalog needs a login", headers=header)
    invalid = challenge(settings, scope=CATALOG_SCOPE, error="invalid_token")
    grant = _verify_bearer(tokens, value, invalid)
    allowed = any(
        s.type == "registry" and s.name == "catalog" and "*" in s.actions for s in grant.scopes
    )
    if grant.user is None or not allowed or not gate.is_user(grant.user):
        raise InsufficientScope(
            "the token does not grant the catalog; ask for registry:catalog:*",
            headers={
                "WWW-Authenticate": challenge(
                    settings, scope=CATALOG_SCOPE, error="insufficient_scope"
                )
            },
        )
    return Identity(grant.credentials, grant.subject, "bearer", grant.user)
