"""The route-builder page and the console in a real browser: Debian's chromium and
chromedriver, driven by selenium, headless, against passthrough under gunicorn whose
REGISTRY_URL is a rig registry. Fill the form, read the URL it builds, download it and
load and run the archive in the rig's dockerd; click Describe and read the platforms;
check the URL forms for other choices. The console, against a hosted area skopeo pushed
into: it loads, lists, searches, logs in, shows the right lines and the API's error
message. Selenium never fetches a driver (Service names /usr/bin/chromedriver,
SE_OFFLINE=true), and every browser process is gone by pid at the end."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.hosted import Hosted, hosted_server
from tests.support.images import multi_platform_index, push_index
from tests.support.loaders import docker_load_and_run, skopeo
from tests.support.registry import RegistryServer

pytestmark = pytest.mark.rig

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,2000",
)
WAIT = 30.0


def _processes_using(marker: str) -> set[int]:
    """Pids whose command line holds ``marker`` (the run's own --user-data-dir)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    profile = tmp_path / f"chromium-profile-{secrets.token_hex(4)}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    pids = {service.process.pid} | _processes_using(str(profile))
    try:
        driver.set_page_load_timeout(WAIT)
        yield driver
    finally:
        driver.quit()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = {pid for pid in pids | _processes_using(str(profile)) if _alive(pid)}
        for pid in left:  # ours, by pid, never by name
            os.kill(pid, signal.SIGKILL)
        assert not left, f"browser processes outlived driver.quit(): {sorted(left)}"


def wait_for(driver: Any, condition: Any, message: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition, message)


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    text: str = driver.find_element(By.ID, element_id).text
    return text


def fill(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def choose(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def test_route_builder_builds_a_working_url(browser: Any, registry_anon: RegistryServer,
                                            passthrough_server: Any, docker_host: str,
                                            tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    repository = f"ui/app{secrets.token_hex(3)}"
    marker = f"ui-{secrets.token_hex(4)}"
    index = multi_platform_index(marker)  # linux/amd64 and linux/arm64/v8, with attestations
    push_index(registry_anon.url, repository, "1.0", index)
    push_index(registry_anon.url, repository, "1.0_beta", index)
    server = passthrough_server({"REGISTRY_URL": registry_anon.url})
    port = registry_anon.host.rsplit(":", 1)[1]

    driver.get(server.url + "/")
    assert driver.title.startswith("passthrough")
    wait_for(driver, lambda d: registry_anon.host in text_of(d, "server-registry"),
             "the page shows the server's registry (from /ui/info)")

    choose(driver, "registry", "custom")
    choose(driver, "custom-scheme", "http")
    fill(driver, "custom-host", "127.0.0.1")
    fill(driver, "custom-port", port)
    fill(driver, "image", repository)
    fill(driver, "tag", "1.0")
    choose(driver, "platform", "linux/amd64")

    filename = repository.replace("/", "__") + "_1.0.tar"
    # The custom host is the server's own registry: the short /docker/ form.
    expected = f"{server.url}/docker/{filename}?platform=linux/amd64"
    wait_for(driver, lambda d: text_of(d, "out-url") == expected, f"the URL becomes {expected}")
    assert text_of(driver, "out-curl") == f"curl -fL -o {filename} '{expected}'"
    assert text_of(driver, "out-ios-copy") == f"copy {expected} flash:{filename}"
    appid = repository.rsplit("/", 1)[1]
    assert text_of(driver, "out-ios-install") == (
        f"app-hosting install appid {appid} package flash:{filename}"
    )
    assert driver.find_element(By.ID, "out-link").get_attribute("href") == expected

    # Download what the page built and run it.
    archive = tmp_path / filename
    http = requests.Session()
    http.trust_env = False
    with http.get(text_of(driver, "out-url"), stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        with archive.open("wb") as out:
            for chunk in response.iter_content(1 << 20):
                out.write(chunk)
    run = docker_load_and_run(docker_host, archive, f"{registry_anon.host}/{repository}:1.0",
                              marker=f"{marker} linux/amd64")
    assert run.repo_tags == [f"{registry_anon.host}/{repository}:1.0"]

    # The verify line, completed with the md5 of exactly the bytes downloaded.
    verify = f"verify /md5 flash:{filename}"
    assert text_of(driver, "out-ios-verify") == verify
    driver.find_element(By.ID, "md5-button").click()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    wait_for(driver, lambda d: text_of(d, "out-ios-verify") == f"{verify} {md5}",
             "the verify line gets the archive's md5")

    # Describe shows the image's platforms (attestations left out) and its size.
    driver.find_element(By.ID, "describe-button").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "describe-result").is_displayed(),
             "the description appears")
    rows = driver.find_elements(By.CSS_SELECTOR, "#describe-platforms tbody tr")
    platforms = [row.find_element(By.CSS_SELECTOR, "td").text for row in rows]
    assert platforms == ["linux/amd64 (selected)", "linux/arm64/v8"]
    amd64 = index.image_for("linux", "amd64")
    size = sum(layer.size for layer in amd64.layers)
    assert text_of(driver, "describe-total").endswith(f"({size:,} bytes)")
    assert text_of(driver, "describe-total").split()[1] in ("KiB", "MiB")
    assert text_of(driver, "describe-layers") == str(len(amd64.layers))
    assert text_of(driver, "describe-digest") == index.digest
    screenshot = tmp_path / "route-builder.png"
    assert driver.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")

    # "Use" on a platform row picks it in the form and describes again.
    rows[1].find_element(By.CSS_SELECTOR, "button").click()
    wait_for(driver, lambda d: text_of(d, "describe-selected") == "linux/arm64/v8",
             "describe follows the chosen platform")
    assert text_of(driver, "out-url").endswith("?platform=linux/arm64/v8")

    # A tag with "_" cannot be a /docker/ filename: the /ref/ form.
    fill(driver, "tag", "1.0_beta")
    ref_url = f"{server.url}/ref/{repository}:1.0_beta.tar?platform=linux/arm64/v8"
    wait_for(driver, lambda d: text_of(d, "out-url") == ref_url, "the /ref/ form")
    head = http.head(ref_url, timeout=60)
    assert head.status_code == 200, head.text
    assert head.headers["Docker-Content-Digest"] == index.image_for("linux", "arm64").digest

    # Client credentials: /registry-auth with the host's ':' as %3A and a -u placeholder.
    driver.find_element(By.ID, "cred-client").click()
    auth_url = (f"{server.url}/registry-auth/http/127.0.0.1%3A{port}/ref/{repository}"
                f":1.0_beta.tar?platform=linux/arm64/v8")
    wait_for(driver, lambda d: text_of(d, "out-url") == auth_url, "the /registry-auth form")
    assert " -u 'USER:PASSWORD' " in text_of(driver, "out-curl")
    assert text_of(driver, "out-ios-copy").startswith("copy http://USER:PASSWORD@127.0.0.1:")

    # Another registry, from a full reference pasted into the image field: the server's
    # credentials are not offered, /registry/ is used.
    driver.find_element(By.ID, "cred-none").click()
    choose(driver, "platform", "")
    fill(driver, "image", "ghcr.io/org/app:v1" + Keys.TAB)
    wait_for(driver, lambda d: d.find_element(By.ID, "registry").get_attribute("value")
             == "ghcr", "the pasted reference's registry is chosen")
    assert driver.find_element(By.ID, "image").get_attribute("value") == "org/app"
    assert driver.find_element(By.ID, "tag").get_attribute("value") == "v1"
    wait_for(driver, lambda d: text_of(d, "out-url")
             == f"{server.url}/registry/https/ghcr.io/docker/org__app_v1.tar", "/registry/")
    assert not driver.find_element(By.ID, "cred-server").is_enabled()

    # Pinned by digest: always /ref/<repo>@<digest>.tar.
    fill(driver, "tag", index.digest)
    wait_for(driver, lambda d: text_of(d, "out-url")
             == f"{server.url}/registry/https/ghcr.io/ref/org/app@{index.digest}.tar", "@digest")

    # Bad input is explained, not turned into a URL.
    fill(driver, "image", "Org/App")
    wait_for(driver, lambda d: d.find_element(By.ID, "form-error").is_displayed(),
             "an invalid name is reported")
    assert not driver.find_element(By.ID, "output").is_displayed()

    # Copy buttons answer (clipboard API or the execCommand fallback).
    fill(driver, "image", "org/app")
    button = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR,
                      "button[data-copy=out-url]"), "copy button")
    button.click()
    wait_for(driver, lambda d: button.text in ("Copied", "Press Ctrl+C"), "copy feedback")
    logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert logs == [], f"errors in the browser console: {logs}"


# -- the console ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosted]:
    """One hosted server for the console tests (users alice and bob, no ACCESS_FILE)."""
    with hosted_server(tmp_path_factory.mktemp("console"), patterns="team/**") as server:
        yield server


def skopeo_push(source: str, hosted: Hosted, name: str) -> None:
    """Copy an image (every platform) from the rig's anonymous registry into the hosted
    area as alice, the way a team would."""
    skopeo(
        "copy", "--quiet", "--all", "--preserve-digests", "--src-tls-verify=false",
        "--src-no-creds", "--dest-tls-verify=false",
        "--dest-creds", f"alice:{hosted.users['alice']}", source, f"docker://{hosted.host}/{name}",
    )  # fmt: skip


def rows_of(driver: Any, table_id: str) -> list[str]:
    """The names (or tags) of a console table's rows, read at once (the table is
    re-rendered as answers arrive)."""
    rows: list[str] = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map((row) => row.dataset.name || row.dataset.tag);",
        f"#{table_id} tbody tr",
    )
    return rows


def click(driver: Any, selector: str) -> None:
    """Click the element once it is there, again if the console re-rendered it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def attempt(d: Any) -> bool:
        try:
            element = d.find_element(By.CSS_SELECTOR, selector)
            d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(driver, attempt, selector)


def log_in(driver: Any, user: str, password: str) -> None:
    fill(driver, "login-user", user)
    fill(driver, "login-password", password)
    click(driver, "#login-button")


def test_console_lists_searches_logs_in_and_copies_the_lines(
    browser: Any, door: Hosted, registry_anon: RegistryServer, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    mark = secrets.token_hex(3)
    web, api = f"team/web{mark}", f"team/api{mark}"
    index = multi_platform_index(f"console-{mark}")
    push_index(registry_anon.url, f"console/src{mark}", "1.0", index)
    source = f"docker://{registry_anon.host}/console/src{mark}:1.0"
    skopeo_push(source, door, f"{web}:1.0")
    skopeo_push(source, door, f"{api}:2.0")

    driver.get(door.public_url + "/#console")
    wait_for(driver, lambda d: d.find_element(By.ID, "view-console").is_displayed(),
             "the console view")
    assert not driver.find_element(By.ID, "view-builder").is_displayed()
    # Anonymous may pull nothing hosted here (HOSTED_ANONYMOUS_PULL is off).
    wait_for(driver, lambda d: d.find_element(By.ID, "repo-empty").is_displayed(),
             "an anonymous listing without the hosted repositories")

    # A wrong password: the API's one-line message, not a raw body.
    log_in(driver, "alice", "not-the-password")
    wait_for(driver, lambda d: d.find_element(By.ID, "console-error").is_displayed(),
             "the failed login is reported")
    error = text_of(driver, "console-error")
    assert error.startswith("Login failed: HTTP 401: "), error
    assert "{" not in error and "errors" not in error, error
    assert text_of(driver, "login-state") == "Anonymous"

    log_in(driver, "alice", door.users["alice"])
    wait_for(driver, lambda d: text_of(d, "login-state") == "Logged in as alice", "logged in")
    assert not driver.find_element(By.ID, "console-error").is_displayed()
    assert driver.find_element(By.ID, "login-password").get_attribute("value") == ""
    wait_for(driver, lambda d: {web, api} <= set(rows_of(d, "repo-table")), "both listed")

    fill(driver, "search-q", f"web{mark}")
    click(driver, "#search-button")
    wait_for(driver, lambda d: rows_of(d, "repo-table") == [web], "the search keeps one")

    click(driver, f"#repo-table tr[data-name='{web}'] button")
    wait_for(driver, lambda d: rows_of(d, "tag-table") == ["1.0"], "the tags of web")
    assert text_of(driver, "tags-name") == web
    buttons = driver.find_elements(By.CSS_SELECTOR, "#tag-table button.platform")
    platforms = [b.text for b in buttons]
    assert platforms == ["linux/amd64", "linux/arm64/v8"]

    # The lines of the arm64 image: URL with ?platform=, the file named for it.
    click(driver, "#tag-table button[aria-label$='linux/arm64/v8']")
    wait_for(driver, lambda d: d.find_element(By.ID, "lines").is_displayed(), "the lines")
    stem = web.replace("/", "__") + "_1.0"
    url = f"{door.public_url}/docker/{stem}.tar?platform=linux/arm64/v8"
    file = f"{stem}_linux-arm64-v8.tar"
    assert text_of(driver, "line-url") == url
    assert text_of(driver, "line-curl") == f"curl -fL -u 'alice' -o {file} '{url}'"
    assert text_of(driver, "line-ios-copy") == (
        f"copy {url.replace('://', '://alice:PASSWORD@')} flash:{file}"
    )
    assert text_of(driver, "line-docker") == (
        f"docker pull --platform linux/arm64/v8 {door.host}/{web}:1.0"
    )
    # The server names the file the same way, and the URL delivers the arm64 image.
    http = door.session("alice")
    head = http.head(url, timeout=60)
    assert head.status_code == 200, head.text
    assert head.headers["Content-Disposition"] == f'attachment; filename="{file}"'
    assert head.headers["Docker-Content-Digest"] == index.image_for("linux", "arm64").digest

    # The verify line: the checksum route answers with the archive's md5.
    click(driver, "#line-checksum")
    wait_for(driver, lambda d: d.find_element(By.ID, "line-verify-row").is_displayed()
             or text_of(d, "line-checksum-status").startswith("No checksum: HTTP"),
             "the checksum is asked for")
    assert driver.find_element(By.ID, "line-verify-row").is_displayed(), text_of(
        driver, "line-checksum-status"
    )
    verify = text_of(driver, "line-verify")
    assert verify.startswith(f"verify /md5 flash:{file} ") and len(verify.split()[-1]) == 32
    assert verify.split()[-1] == hashlib.md5(http.get(url, timeout=60).content).hexdigest()

    # Copy answers (clipboard API or the execCommand fallback).
    click(driver, "button[data-copy=line-curl]")
    copy = driver.find_element(By.CSS_SELECTOR, "button[data-copy=line-curl]")
    wait_for(driver, lambda d: copy.text in ("Copied", "Press Ctrl+C"), "copy feedback")

    console_shot = tmp_path / "console.png"
    assert driver.save_screenshot(str(console_shot))
    print(f"screenshot: {console_shot}")

    # The route builder's hosted option, describing with the console's login.
    driver.find_element(By.ID, "nav-builder").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "view-builder").is_displayed(), "builder")
    choose(driver, "registry", "hosted")
    fill(driver, "image", api)
    fill(driver, "tag", "2.0")
    choose(driver, "platform", "linux/arm64")
    driver.find_element(By.ID, "cred-client").click()
    api_stem = api.replace("/", "__") + "_2.0"
    api_url = f"{door.public_url}/docker/{api_stem}.tar?platform=linux/arm64"
    wait_for(driver, lambda d: text_of(d, "out-url") == api_url, "the hosted URL")
    assert text_of(driver, "out-curl") == (
        f"curl -fL -u 'USER:PASSWORD' -o {api_stem}_linux-arm64.tar '{api_url}'"
    )
    driver.find_element(By.ID, "describe-button").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "describe-result").is_displayed(),
             "the hosted image is described")
    assert text_of(driver, "describe-selected") == "linux/arm64/v8"
    assert text_of(driver, "describe-filename") == f"{api_stem}_linux-arm64.tar"
    # The same image as web's: computing its checksum above stored its layer tars, so the
    # archive's size is known exactly (a cold image's estimate: tests/unit/test_describe_hosted).
    assert text_of(driver, "describe-tar").endswith(" bytes, exact)"), "warm: exact"

    screenshot = tmp_path / "builder-hosted.png"
    assert driver.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    # Answers of 4xx (the failed login, a missing checksum route, the store for a
    # non-admin) are logged by Chromium as network errors; a script error is not allowed.
    logs = [e for e in driver.get_log("browser")
            if e.get("level") == "SEVERE" and e.get("source") != "network"]
    assert logs == [], f"script errors in the browser console: {logs}"


def test_console_admin_actions_are_confirmed_first(
    browser: Any, door: Hosted, registry_anon: RegistryServer
) -> None:
    """As an admin (every user: no ACCESS_FILE here): the store, a hosted tag deleted only
    after the dialog's Confirm (Cancel keeps it), gc's dry run."""
    from selenium.webdriver.common.by import By

    http = door.session("alice")
    driver = browser
    mark = secrets.token_hex(3)
    name = f"team/adm{mark}"
    index = multi_platform_index(f"admin-{mark}")
    push_index(registry_anon.url, f"console/adm{mark}", "1.0", index)
    for tag in ("1.0", "2.0"):
        skopeo_push(f"docker://{registry_anon.host}/console/adm{mark}:1.0", door, f"{name}:{tag}")

    driver.get(door.public_url + "/#console")
    log_in(driver, "alice", door.users["alice"])
    wait_for(driver, lambda d: d.find_element(By.ID, "store").is_displayed(), "the store")
    assert text_of(driver, "store-backend") == "filesystem"
    fill(driver, "search-q", f"adm{mark}")
    click(driver, "#search-button")
    wait_for(driver, lambda d: rows_of(d, "repo-table") == [name], "the search")
    click(driver, f"#repo-table tr[data-name='{name}'] button")
    wait_for(driver, lambda d: rows_of(d, "tag-table") == ["1.0", "2.0"], "both tags")

    delete = "#tag-table tr[data-tag='1.0'] button.danger"
    click(driver, delete)
    dialog = driver.find_element(By.ID, "confirm")
    wait_for(driver, lambda d: dialog.is_displayed(), "the confirmation")
    assert "Delete the tag" in text_of(driver, "confirm-text")
    driver.find_element(By.ID, "confirm-cancel").click()
    wait_for(driver, lambda d: not dialog.is_displayed(), "cancelled")
    assert rows_of(driver, "tag-table") == ["1.0", "2.0"]
    assert http.get(door.url(f"/v2/{name}/manifests/1.0"), timeout=30).status_code == 200

    click(driver, delete)
    wait_for(driver, lambda d: dialog.is_displayed(), "the confirmation again")
    driver.find_element(By.ID, "confirm-ok").click()
    wait_for(driver, lambda d: rows_of(d, "tag-table") == ["2.0"], "the tag is gone")
    assert http.get(door.url(f"/v2/{name}/manifests/1.0"), timeout=30).status_code == 404

    click(driver, "#gc-dry-run")
    wait_for(driver, lambda d: dialog.is_displayed(), "gc is confirmed first")
    driver.find_element(By.ID, "confirm-ok").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "gc-report").is_displayed()
             or d.find_element(By.ID, "console-error").is_displayed(), "the dry run's report")
    assert not driver.find_element(By.ID, "console-error").is_displayed(), text_of(
        driver, "console-error")
    assert text_of(driver, "gc-report").startswith("{")
