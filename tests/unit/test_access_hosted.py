"""Who may do what, branch by branch: check_access on hosted names (Basic checked
against HTPASSWD_FILE, Bearer by the token's user and scopes and the rules now,
anonymous pulls only with HOSTED_ANONYMOUS_PULL, 403 DENIED naming the action, 401 with
the challenge for the scope), on proxied names (pulls only; pushes DENIED naming the
hosted patterns; Basic is the upstream login in PROXY_MODE=authenticated and a
passthrough user's in transparent mode), the base check, the catalog, Gate.grant and
Gate.may, and the failed-login limiter. The users are made by Debian's htpasswd."""

from __future__ import annotations

import base64
import dataclasses
import logging
import textwrap
from pathlib import Path

import pytest

from passthrough.config import ConfigError, Settings
from passthrough.errors import (
    Denied,
    InsufficientScope,
    LoginFailed,
    PassthroughError,
    TokenRequired,
    TooManyLogins,
)
from passthrough.observe import metrics
from passthrough.registry.access import (
    ANONYMOUS,
    Gate,
    Identity,
    LoginLimiter,
    check_access,
    check_catalog,
)
from passthrough.registry.tokens import Scope, TokenService
from passthrough.upstream.auth import Credentials
from tests.support.htpasswd import bcrypt_line
from tests.support.procs import free_port
from tests.unit.test_users import Counting

SECRET = "a shared secret for every replica"
PUBLIC = "https://registry.example"
REALM = f'Bearer realm="{PUBLIC}/v2/token",service="passthrough"'
PASSWORDS = {"alice": "alice-pw-7Hq", "bob": "bob-pw-3Zx", "carol": "carol-pw-9Lm"}
ACCESS = textwrap.dedent(
    """\
    groups:
      team-a: [alice, bob]
    rules:
      - repositories: ["team/*"]
        pull: [alice, "@team-a"]
        push: ["@team-a"]
        delete: [alice]
      - repositories: ["apps/**"]
        pull: ["*", anonymous]
        push: ["*"]
    """
)


def basic(user: str, password: str | None = None) -> str:
    secret = PASSWORDS.get(user, "x") if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("auth")
    users = root / "htpasswd"
    users.write_text("".join(bcrypt_line(u, p) + "\n" for u, p in PASSWORDS.items()))
    access = root / "access.yaml"
    access.write_text(ACCESS)
    return {"users": users, "access": access}


def settings_for(files: dict[str, Path], **changes: object) -> Settings:
    base = Settings(
        public_url=PUBLIC,
        token_secret=SECRET,
        htpasswd_file=str(files["users"]),
        hosted_repositories=("team/*", "apps/**"),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def transparent(files) -> Settings:
    return settings_for(files)


@pytest.fixture
def ruled(files) -> Settings:
    return settings_for(files, access_file=str(files["access"]))


@pytest.fixture
def authenticated(files) -> Settings:
    return settings_for(files, proxy_mode="authenticated", access_file=str(files["access"]))


@pytest.fixture
def tokens() -> TokenService:
    return TokenService(SECRET, 300)


def check(
    settings: Settings,
    header: str | None,
    name: str | None,
    action: str = "pull",
    *,
    gate: Gate | None = None,
    tokens: TokenService | None = None,
) -> Identity:
    return check_access(
        settings,
        tokens or TokenService(SECRET, 300),
        header,
        name,
        action,
        gate=gate or Gate.create(settings),
        client="192.0.2.7",
    )


# -- hosted names, no login ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "scope"), [("pull", "pull"), ("push", "pull,push"), ("delete", "delete")]
)
def test_no_login_on_a_hosted_name_is_the_challenge_for_its_scope(transparent, action, scope):
    with pytest.raises(TokenRequired) as caught:
        check(transparent, None, "team/app", action)
    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"] == (
        REALM + f',scope="repository:team/app:{scope}"'
    )


def test_anonymous_pull_of_hosted_needs_the_setting(files):
    settings = settings_for(files, hosted_anonymous_pull=True)
    assert check(settings, None, "team/app") == ANONYMOUS
    with pytest.raises(TokenRequired):
        check(settings, None, "team/app", "push")
    with pytest.raises(TokenRequired):
        check(settings, None, "team/app", "delete")


def test_access_file_narrows_anonymous_pull(files):
    settings = settings_for(files, hosted_anonymous_pull=True, access_file=str(files["access"]))
    assert check(settings, None, "apps/web/site") == ANONYMOUS
    # team/* names no anonymous puller.
    with pytest.raises(TokenRequired):
        check(settings, None, "team/app")
    # "anonymous" in ACCESS_FILE alone does not open a pull: the setting is off here.
    with pytest.raises(TokenRequired):
        check(settings_for(files, access_file=str(files["access"])), None, "apps/web/site")


# -- hosted names, Basic -----------------------------------------------------------------------


def test_basic_of_a_user_is_checked_and_is_that_user(transparent):
    identity = check(transparent, basic("alice"), "team/app", "push")
    assert identity == Identity(None, "alice", "basic", "alice")
    # Transparent mode: the credentials go nowhere upstream.
    assert identity.credentials is None
    assert check(transparent, basic("carol"), "apps/x", "delete").user == "carol"


@pytest.mark.parametrize(
    ("header", "reason"),
    [(basic("alice", "wrong"), "wrong_password"), (basic("mallory", "x"), "unknown_user")],
)
def test_a_wrong_login_is_401_with_the_challenge_and_counted(transparent, header, reason):
    before = metrics._metrics().login_failures.labels(reason)._value.get()
    with pytest.raises(LoginFailed) as caught:
        check(transparent, header, "team/app", "push")
    error = caught.value
    assert (error.status, error.code) == (401, "UNAUTHORIZED")
    assert error.message == "wrong user name or password"
    assert error.headers["WWW-Authenticate"] == REALM + ',scope="repository:team/app:pull,push"'
    assert metrics._metrics().login_failures.labels(reason)._value.get() == before + 1


def test_a_user_the_rules_leave_out_is_denied_naming_the_action(ruled):
    assert check(ruled, basic("bob"), "team/app", "push").user == "bob"
    with pytest.raises(Denied) as caught:
        check(ruled, basic("bob"), "team/app", "delete")
    assert (caught.value.status, caught.value.code) == (403, "DENIED")
    assert caught.value.message == "user 'bob' may not delete \"team/app\""
    with pytest.raises(Denied, match="may not pull"):
        check(ruled, basic("carol"), "team/app")
    # No rule names it: nobody may.
    with pytest.raises(Denied):
        check(
            dataclasses.replace(ruled, hosted_repositories=("team/*", "apps/**", "misc/*")),
            basic("alice"),
            "misc/x",
        )


def test_without_access_file_every_user_may_do_everything(transparent):
    for user in PASSWORDS:
        for action in ("pull", "push", "delete"):
            assert check(transparent, basic(user), "team/app", action).user == user


def test_authenticated_mode_checks_basic_on_hosted_names_and_carries_it(authenticated):
    identity = check(authenticated, basic("alice"), "team/app", "delete")
    assert identity.user == "alice"
    assert identity.credentials == Credentials("alice", PASSWORDS["alice"])
    with pytest.raises(LoginFailed):
        check(authenticated, basic("alice", "upstream-pw"), "team/app")
    with pytest.raises(LoginFailed):
        check(authenticated, basic("upstream-only", "x"), "team/app")


# -- hosted names, Bearer ----------------------------------------------------------------------


def scope(name: str, *actions: str) -> Scope:
    return Scope("repository", name, frozenset(actions))


def test_a_users_token_is_that_user(ruled, tokens):
    token = tokens.issue([scope("team/app", "pull", "push")], subject="bob", user="bob")["token"]
    identity = check(ruled, f"Bearer {token}", "team/app", "push", tokens=tokens)
    assert identity == Identity(None, "bob", "bearer", "bob")
    with pytest.raises(InsufficientScope) as caught:
        check(ruled, f"Bearer {token}", "apps/web", "pull", tokens=tokens)
    assert caught.value.headers["WWW-Authenticate"] == (
        REALM + ',scope="repository:apps/web:pull",error="insufficient_scope"'
    )


def test_a_token_lacking_a_scope_the_user_may_not_have_is_denied(ruled, tokens):
    # bob may not delete on team/*: the token service left delete out, and asking again
    # would not add it.
    token = tokens.issue([scope("team/app", "pull", "push")], subject="bob", user="bob")["token"]
    with pytest.raises(Denied, match="'bob' may not delete"):
        check(ruled, f"Bearer {token}", "team/app", "delete", tokens=tokens)
    # carol's token without push on apps/** (she may push there): ask for the scope.
    token = tokens.issue([scope("apps/x", "pull")], subject="carol", user="carol")["token"]
    with pytest.raises(InsufficientScope):
        check(ruled, f"Bearer {token}", "apps/x", "push", tokens=tokens)


def test_a_token_is_held_to_the_rules_of_now(files, ruled, tokens, tmp_path):
    # Issued while bob could push; the rules then change.
    token = tokens.issue([scope("team/app", "push")], subject="bob", user="bob")["token"]
    stricter = tmp_path / "access.yaml"
    stricter.write_text("rules:\n  - repositories: ['team/*']\n    push: [alice]\n")
    settings = dataclasses.replace(ruled, access_file=str(stricter))
    with pytest.raises(Denied, match="may not push"):
        check(settings, f"Bearer {token}", "team/app", "push", tokens=tokens)


def test_a_token_of_a_removed_user_is_denied(ruled, tokens):
    token = tokens.issue([scope("team/app", "push")], subject="dave", user="dave")["token"]
    with pytest.raises(Denied):
        check(ruled, f"Bearer {token}", "team/app", "push", tokens=tokens)


def test_an_upstream_subject_is_no_user(authenticated, tokens):
    # A token for an upstream login named like a passthrough user grants it nothing here.
    token = tokens.issue(
        [scope("team/app", "push")], credentials=Credentials("alice", "hub-pw"), subject="alice"
    )["token"]
    with pytest.raises(TokenRequired):
        check(authenticated, f"Bearer {token}", "team/app", "push", tokens=tokens)


def test_an_anonymous_token_pulls_hosted_only_with_the_setting(files, tokens):
    token = tokens.issue([scope("team/app", "pull")])["token"]
    allowed = settings_for(files, hosted_anonymous_pull=True)
    assert check(allowed, f"Bearer {token}", "team/app", tokens=tokens).user is None
    with pytest.raises(TokenRequired):
        check(settings_for(files), f"Bearer {token}", "team/app", tokens=tokens)


# -- proxied names -------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["push", "delete"])
@pytest.mark.parametrize(
    "header", [None, basic("alice"), basic("alice", "wrong"), "Bearer x"], ids=str
)
def test_writes_to_a_proxied_name_are_denied_naming_the_hosted_patterns(
    transparent, authenticated, action, header
):
    for settings in (transparent, authenticated):
        with pytest.raises(Denied) as caught:
            check(settings, header, "library/nginx", action)
        assert caught.value.status == 403
        assert caught.value.message == (
            '"library/nginx" is not a hosted repository; pushes go to: team/*, apps/**'
        )


def test_with_nothing_hosted_the_denial_says_so(files):
    settings = Settings(proxy_mode="authenticated", public_url=PUBLIC, token_secret=SECRET)
    with pytest.raises(Denied, match="hosts none"):
        check_access(settings, None, None, "library/nginx", "push")


def test_transparent_mode_pulls_proxied_names_without_a_login(transparent):
    assert check(transparent, None, "library/nginx") == ANONYMOUS
    # The base check still challenges: docker login needs the 401 to find the realm.
    with pytest.raises(TokenRequired) as caught:
        check(transparent, None, None)
    assert caught.value.headers["WWW-Authenticate"] == REALM


def test_transparent_mode_checks_basic_on_proxied_names(transparent):
    assert check(transparent, basic("bob"), "library/nginx").user == "bob"
    with pytest.raises(LoginFailed):
        check(transparent, basic("bob", "wrong"), "library/nginx")
    with pytest.raises(LoginFailed):
        check(transparent, basic("hub-user", "hub-pw"), "library/nginx")


def test_authenticated_mode_leaves_basic_on_proxied_names_to_upstream(authenticated, monkeypatch):
    gate = Gate.create(authenticated)
    counting = Counting(monkeypatch)
    for header, user in ((basic("alice", "hub-pw"), "alice"), (basic("hub-user", "x"), "hub-user")):
        identity = check(authenticated, header, "library/nginx", gate=gate)
        assert identity.user is None and identity.subject == user and identity.via == "basic"
        assert identity.credentials is not None
    assert counting.calls == []
    with pytest.raises(TokenRequired):
        check(authenticated, None, "library/nginx", gate=gate)


# -- the base check ------------------------------------------------------------------------------


def test_the_base_check(transparent, authenticated):
    assert check(transparent, basic("alice"), None).user == "alice"
    with pytest.raises(LoginFailed):
        check(transparent, basic("hub-user", "x"), None)
    # Authenticated mode: a passthrough user is checked, another login is upstream's.
    assert check(authenticated, basic("alice"), None).user == "alice"
    with pytest.raises(LoginFailed):
        check(authenticated, basic("alice", "wrong"), None)
    upstream = check(authenticated, basic("hub-user", "x"), None)
    assert (upstream.user, upstream.subject) == (None, "hub-user")


def test_users_without_their_gate_is_a_server_error(transparent):
    with pytest.raises(PassthroughError, match="HTPASSWD_FILE") as caught:
        check_access(transparent, None, basic("alice"), "team/app")
    assert caught.value.status == 500


def test_access_file_without_users_is_a_config_error(files):
    settings = Settings(
        proxy_mode="authenticated",
        public_url=PUBLIC,
        token_secret=SECRET,
        access_file=str(files["access"]),
    )
    with pytest.raises(ConfigError, match="ACCESS_FILE needs HTPASSWD_FILE"):
        Gate.create(settings)


def test_gate_creation_warns_of_unknown_users_and_idle_anonymous(files, tmp_path, caplog):
    access = tmp_path / "access.yaml"
    access.write_text("rules:\n  - repositories: ['team/*']\n    pull: [alicee, anonymous]\n")
    Gate.create(settings_for(files, access_file=str(access)))
    messages = [r.getMessage() for r in caplog.records]
    assert any("HTPASSWD_FILE lacks: alicee" in m for m in messages)
    assert any("HOSTED_ANONYMOUS_PULL is off" in m for m in messages)


# -- the catalog -------------------------------------------------------------------------------


def test_the_catalog_is_for_users(ruled, tokens):
    gate = Gate.create(ruled)
    catalog_challenge = REALM + ',scope="registry:catalog:*"'
    with pytest.raises(TokenRequired) as caught:
        check_catalog(ruled, tokens, None, gate=gate)
    assert caught.value.headers["WWW-Authenticate"] == catalog_challenge
    assert check_catalog(ruled, tokens, basic("carol"), gate=gate).user == "carol"
    with pytest.raises(LoginFailed):
        check_catalog(ruled, tokens, basic("carol", "no"), gate=gate)
    granted = gate.grant("carol", [Scope("registry", "catalog", frozenset({"*"}))])
    token = tokens.issue(granted, subject="carol", user="carol")["token"]
    assert check_catalog(ruled, tokens, f"Bearer {token}", gate=gate).user == "carol"
    # An anonymous token, or one without the catalog scope, does not list.
    for other in (tokens.issue(granted)["token"], tokens.issue([], user="carol")["token"]):
        with pytest.raises(InsufficientScope):
            check_catalog(ruled, tokens, f"Bearer {other}", gate=gate)
    # The listing is filtered by what the user may pull.
    carol = Identity(None, "carol", "bearer", "carol")
    names = ["team/app", "apps/web/site", "team/db"]
    assert [n for n in names if gate.may(carol, n, "pull")] == ["apps/web/site"]


# -- grants ------------------------------------------------------------------------------------


def asked(*scopes: str) -> list[Scope]:
    from passthrough.registry.tokens import parse_scopes

    return parse_scopes(scopes)


def granted_map(scopes: tuple[Scope, ...]) -> dict[str, set[str]]:
    return {f"{s.type}:{s.name}": set(s.actions) for s in scopes}


def test_grants_per_user(ruled, files):
    gate = Gate.create(ruled)
    request = asked(
        "repository:team/app:pull,push,delete",
        "repository:apps/a/b:*",
        "repository:library/nginx:pull,push",
        "registry:catalog:*",
        "repository:other/thing:pull",
    )
    assert granted_map(gate.grant("alice", request)) == {
        "repository:team/app": {"pull", "push", "delete"},
        "repository:apps/a/b": {"pull", "push"},
        "repository:library/nginx": {"pull"},
        "registry:catalog": {"*"},
        "repository:other/thing": {"pull"},
    }
    assert granted_map(gate.grant("bob", request))["repository:team/app"] == {"pull", "push"}
    assert "repository:team/app" not in granted_map(gate.grant("carol", request))
    anonymous = granted_map(gate.grant(None, request))
    assert anonymous == {"repository:library/nginx": {"pull"}, "repository:other/thing": {"pull"}}
    with_anonymous = Gate.create(dataclasses.replace(ruled, hosted_anonymous_pull=True))
    assert granted_map(with_anonymous.grant(None, request))["repository:apps/a/b"] == {"pull"}


# -- the limiter ------------------------------------------------------------------------------


def test_ten_failures_a_minute_then_429_with_retry_after(transparent):
    clock = Clock()
    gate = Gate.create(transparent)
    gate.limiter = LoginLimiter(clock=clock)
    before = metrics._metrics().login_failures.labels("rate_limited")._value.get()
    for _ in range(10):
        with pytest.raises(LoginFailed):
            check(transparent, basic("alice", "guess"), "team/app", gate=gate)
        clock.now += 1
    # The right password too: the address is refused before any check.
    with pytest.raises(TooManyLogins) as caught:
        check(transparent, basic("alice"), "team/app", gate=gate)
    error = caught.value
    assert (error.status, error.code) == (429, "TOOMANYREQUESTS")
    assert error.headers == {"Retry-After": "50"}
    assert metrics._metrics().login_failures.labels("rate_limited")._value.get() == before + 1
    # Another address is not held back.
    other = check_access(
        transparent, None, basic("alice"), "team/app", gate=gate, client="198.51.100.1"
    )
    assert other.user == "alice"
    clock.now += 50
    assert check(transparent, basic("alice"), "team/app", gate=gate).user == "alice"


def test_the_limiter_window_slides_and_stays_bounded():
    clock = Clock()
    limiter = LoginLimiter(limit=3, window=10, clock=clock, max_clients=100)
    for _ in range(3):
        limiter.failed("a")
        clock.now += 4
    # Failures at 0, 4, 8; now 12: the first has left the window.
    assert limiter.retry_after("a") is None
    limiter.failed("a")
    assert limiter.retry_after("a") == 2
    for n in range(500):
        limiter.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter._failures) == 100


# -- nothing secret in a log or a message ------------------------------------------------------


def test_no_password_or_hash_in_any_log_or_message(files, ruled, authenticated, caplog):
    caplog.set_level(logging.DEBUG)
    messages: list[str] = []
    for settings in (ruled, authenticated):
        for header in (
            basic("alice"),
            basic("alice", "wrong-" + PASSWORDS["bob"]),
            basic("bob"),
            basic("mallory", PASSWORDS["carol"]),
        ):
            for name, action in (("team/app", "delete"), ("library/x", "pull"), (None, "pull")):
                try:
                    check(settings, header, name, action)
                except PassthroughError as exc:
                    messages.append(exc.message)
                    messages.extend(exc.headers.values())
    hashes = [line.split(":", 1)[1] for line in files["users"].read_text().splitlines()]
    text = "\n".join(messages + [r.getMessage() for r in caplog.records])
    assert messages and "login refused" in text
    for secret in [*PASSWORDS.values(), *hashes]:
        assert secret not in text
    assert "mallory" not in text


# -- the limiter shared through Redis -------------------------------------------------------------


def fail_login(gate: Gate, settings: Settings, client: str) -> None:
    with pytest.raises(LoginFailed):
        check_access(settings, None, basic("alice", "guess"), "team/app", gate=gate, client=client)


def test_without_redis_each_worker_counts_its_own(transparent, caplog):
    settings = dataclasses.replace(transparent, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    first, second = Gate.create(settings), Gate.create(settings)
    for _ in range(10):
        fail_login(first, settings, "192.0.2.50")
    with pytest.raises(TooManyLogins):
        check_access(settings, None, basic("alice"), "team/app", gate=first, client="192.0.2.50")
    # The other worker never saw those failures.
    assert (
        check_access(
            settings, None, basic("alice"), "team/app", gate=second, client="192.0.2.50"
        ).user
        == "alice"
    )
    warnings = [r.getMessage() for r in caplog.records if "login limiter" in r.getMessage()]
    # Once per worker however many logins (twelve here), never naming the URL.
    assert len(warnings) == 2
    assert not any("127.0.0.1" in w for w in warnings)


def test_administrators_are_the_admin_group_or_every_user_without_rules(files, tmp_path):
    assert Gate.create(settings_for(files)).is_admin("carol")
    assert not Gate.create(settings_for(files)).is_admin("mallory")
    assert not Gate.create(settings_for(files)).is_admin(None)
    access = tmp_path / "admins.yaml"
    access.write_text(
        "groups:\n  admin: [carol]\nrules:\n  - repositories: ['team/*']\n    pull: ['*']\n"
    )
    gate = Gate.create(settings_for(files, access_file=str(access)))
    assert gate.is_admin("carol")
    assert not gate.is_admin("alice")
