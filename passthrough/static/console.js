/* passthrough console: what this door holds, from its /api/v1 (plain JavaScript, no
   build step, nothing loaded from elsewhere). Browse and search repositories and tags,
   copy an image's tar URL, curl, IOS-XE and docker pull lines, log in (HTTP Basic on
   each request, kept in this page's memory only), see the store and, as an admin,
   delete a hosted tag, evict a cached image or run gc's dry run, each confirmed first.
   Errors show the API's own one-line message. */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const common = window.passthroughCommon;
  const humanSize = common.humanSize;
  const base = new URL(".", document.baseURI);
  const PAGE = 50;
  let info = { registry: { url: "", name: "" }, defaultPlatform: "linux/amd64", hosted: [],
               pullHost: null };
  let login = null; // {user, header}: never stored beyond this page
  let admin = false;
  let repoNext = null;
  // Only the latest listing is shown: an answer to an older search is dropped.
  const latest = { repositories: 0, tags: 0 };
  let openRepo = null; // {name, source, route: {prefix, repository, hosted}}
  let tagNext = null;
  let shown = null; // the image whose lines are on show

  // -- The API -------------------------------------------------------------------------

  class ApiError extends Error {}

  // The error a response stands for, as one readable line: the API's JSON message
  // (every {"errors":[{"message"}]} entry), else the first line of its text.
  async function errorOf(response) {
    const text = await response.text();
    let message = "";
    try {
      const body = JSON.parse(text);
      message = (body.errors || []).map((e) => e.message || e.code).filter(Boolean).join("; ");
    } catch (error) {
      // A plain-text answer (the tar routes): its first line, less a repeated status.
      message = text.trim().split("\n")[0].slice(0, 300)
        .replace(new RegExp("^" + response.status + " "), "");
    }
    return new ApiError("HTTP " + response.status + ": " + (message || response.statusText));
  }

  async function api(path, options) {
    const headers = { Accept: "application/json" };
    if (login) headers.Authorization = login.header;
    let response;
    try {
      response = await fetch(new URL(path, base), Object.assign(
        { headers: headers, cache: "no-store", credentials: "omit" }, options || {}));
    } catch (error) {
      throw new ApiError("The server did not answer: " + error.message);
    }
    if (!response.ok) throw await errorOf(response);
    const type = response.headers.get("Content-Type") || "";
    return type.startsWith("application/json") ? response.json() : response.text();
  }

  function showError(error) {
    $("console-error").textContent = error ? error.message : "";
    $("console-error").hidden = !error;
  }

  // -- Formatting ----------------------------------------------------------------------

  function when(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "—";
  }

  function cell(text, title) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "—" : String(text);
    if (title) td.title = title;
    return td;
  }

  // A page of rows: the next one appended ("More"), else in place of the old ones.
  function fillTable(id, rows, more) {
    const tbody = $(id).tBodies[0];
    if (more) tbody.append(...rows);
    else tbody.replaceChildren(...rows);
    return tbody;
  }

  function button(text, label, onClick, className) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    if (className) b.className = className;
    b.addEventListener("click", onClick);
    return b;
  }

  // -- Login ---------------------------------------------------------------------------

  async function logIn(event) {
    event.preventDefault();
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    if (!user) {
      showError(new ApiError("Enter a user name to log in."));
      return;
    }
    const bytes = new TextEncoder().encode(user + ":" + password);
    const previous = login;
    login = { user: user, header: "Basic " + btoa(String.fromCharCode(...bytes)) };
    try {
      await listRepositories(false);
    } catch (error) {
      login = previous;
      showError(new ApiError("Login failed: " + error.message));
      return;
    }
    $("login-password").value = "";
    showLogin();
    loadStore();
  }

  function logOut() {
    login = null;
    admin = false;
    showLogin();
    $("store").hidden = true;
    $("tags").hidden = true;
    $("lines").hidden = true;
    search();
  }

  function showLogin() {
    $("login-state").textContent = login ? "Logged in as " + login.user : "Anonymous";
    $("logout").hidden = !login;
    $("login").hidden = !!login;
  }

  // -- Repositories --------------------------------------------------------------------

  function search(event) {
    if (event) event.preventDefault();
    listRepositories(false).catch(showError);
  }

  async function listRepositories(more) {
    const query = new URLSearchParams({ n: String(PAGE) });
    const q = $("search-q").value.trim();
    const source = $("search-source").value;
    if (q) query.set("q", q);
    if (source) query.set("source", source);
    if (more && repoNext) query.set("last", repoNext);
    const ticket = ++latest.repositories;
    const body = await api("api/v1/repositories?" + query);
    if (ticket !== latest.repositories) return;
    showError(null);
    const tbody = fillTable("repo-table", body.repositories.map(repositoryRow), more);
    repoNext = body.next || null;
    $("repo-more").hidden = !repoNext;
    $("repo-empty").hidden = tbody.rows.length > 0;
  }

  function repositoryRow(repo) {
    const row = document.createElement("tr");
    const name = document.createElement("td");
    name.append(button(repo.name, "Show the tags of " + repo.name,
      () => openRepository(repo).catch(showError), "link"));
    const source = repo.upstream ? repo.source + " (" + repo.upstream + ")" : repo.source;
    row.append(name, cell(source), cell(repo.tags), cell(humanSize(repo.size)),
      cell(when(repo.last_pulled)), cell(repo.pulls));
    row.dataset.name = repo.name;
    return row;
  }

  // -- Tags ----------------------------------------------------------------------------

  async function openRepository(repo) {
    const route = await api("ui/route?name=" + encodeURIComponent(repo.name));
    openRepo = { name: repo.name, source: repo.source, route: route };
    tagNext = null;
    $("lines").hidden = true;
    await listTags(false);
    $("tags").hidden = false;
    $("tags").scrollIntoView({ block: "nearest" });
  }

  async function listTags(more) {
    const query = new URLSearchParams({ n: String(PAGE) });
    if (more && tagNext) query.set("last", tagNext);
    const path = "api/v1/repositories/" + openRepo.name + "/tags?" + query;
    const ticket = ++latest.tags;
    const body = await api(path);
    if (ticket !== latest.tags) return;
    showError(null);
    $("tags-name").textContent = openRepo.name;
    fillTable("tag-table", body.tags.map(tagRow), more);
    tagNext = body.next || null;
    $("tags-more").hidden = !tagNext;
  }

  function tagRow(tag) {
    const row = document.createElement("tr");
    row.dataset.tag = tag.tag;
    const platforms = document.createElement("td");
    const choices = tag.platforms && tag.platforms.length ? tag.platforms : [null];
    for (const platform of choices) {
      platforms.append(button(platform || "lines", "Show the lines for " + tag.tag +
        (platform ? " on " + platform : ""), () => showLines(tag, platform, choices.length > 1),
        "platform"));
    }
    const tar = tag.tar_size === null || tag.tar_size === undefined
      ? "unknown until cached" : humanSize(tag.tar_size);
    const digest = cell(tag.digest ? tag.digest.slice(0, 19) + "…" : "—", tag.digest);
    row.append(cell(tag.tag), digest, platforms, cell(humanSize(tag.compressed_size)),
      cell(tar), cell(when(tag.pushed || tag.created)), cell(when(tag.last_pulled)),
      cell(tag.pulls), actionsCell(tag));
    return row;
  }

  function actionsCell(tag) {
    const td = document.createElement("td");
    if (!admin) return td;
    const name = openRepo.name;
    if (openRepo.source === "hosted") {
      td.append(button("Delete", "Delete the tag " + name + ":" + tag.tag, () => confirmThen(
        "Delete the tag " + name + ":" + tag.tag + "? Its manifest stays until gc.",
        () => api("api/v1/repositories/" + name + "/tags/" + encodeURIComponent(tag.tag),
          { method: "DELETE" }).then(() => listTags(false))), "danger"));
    } else {
      td.append(button("Evict", "Evict " + name + ":" + tag.tag + " from the cache",
        () => confirmThen("Evict " + name + ":" + tag.tag + " from the cache? The next pull " +
          "fetches it from " + (openRepo.route.prefix || info.registry.name) + " again.",
        () => api("api/v1/cache/" + name + ":" + encodeURIComponent(tag.tag),
          { method: "DELETE" }).then(() => listTags(false))), "danger"));
    }
    return td;
  }

  // -- The lines for one image ---------------------------------------------------------

  // What the server names the file (reference.archive_filename, platform_filename).
  function fileName(repository, tag, platform) {
    const file = repository.split("/").join("__") + "_" + tag + ".tar";
    return common.platformFilename(file, platform, info.defaultPlatform);
  }

  function imageLines(tag, platform, several) {
    const route = openRepo.route;
    const repository = route.repository;
    const simple = !tag.tag.includes("_") && !repository.includes("_");
    const tail = simple
      ? "docker/" + repository.split("/").join("__") + "_" + tag.tag + ".tar"
      : "ref/" + repository + ":" + tag.tag + ".tar";
    const query = several && platform ? "?platform=" + platform : "";
    const url = base.href + route.prefix + tail + query;
    const file = fileName(repository, tag.tag, several ? platform : null);
    const auth = route.hosted && login;
    const pullHost = info.pullHost || base.host;
    return {
      url: url,
      file: file,
      curl: "curl -fL" + (auth ? " -u '" + login.user + "'" : "") + " -o " + file + " '" +
        url + "'",
      iosCopy: "copy " + (auth ? url.replace("://", "://" + login.user + ":PASSWORD@") : url) +
        " flash:" + file,
      docker: "docker pull " + (several && platform ? "--platform " + platform + " " : "") +
        pullHost + "/" + openRepo.name + ":" + tag.tag,
      auth: auth,
    };
  }

  function showLines(tag, platform, several) {
    const lines = imageLines(tag, platform, several);
    shown = lines;
    $("lines-image").textContent = openRepo.name + ":" + tag.tag +
      (several && platform ? " (" + platform + ")" : "");
    $("line-url").textContent = lines.url;
    $("line-curl").textContent = lines.curl;
    $("line-ios-copy").textContent = lines.iosCopy;
    $("line-docker").textContent = lines.docker;
    $("line-verify-row").hidden = true;
    $("line-verify").textContent = "";
    $("line-checksum-status").textContent = "";
    const notes = [];
    if (lines.auth) {
      notes.push("curl asks for the password; on the switch, replace PASSWORD with it.");
    }
    if (lines.url.includes("?")) {
      notes.push("The IOS-XE command line reads “?” as a request for help: type Ctrl-V " +
        "just before the “?” of the URL.");
    }
    $("line-notes").replaceChildren(...notes.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }));
    $("lines").hidden = false;
    $("lines").scrollIntoView({ block: "nearest" });
  }

  // The verify line needs the archive's MD5, which the checksum route (<tar URL>.md5)
  // answers when the server has it: asked for on demand, as it may read the archive.
  async function fetchChecksum() {
    if (!shown) return;
    const lines = shown;
    const [path, query] = lines.url.split("?");
    $("line-checksum-status").textContent = "Asking the server…";
    try {
      const text = await api(path + ".md5" + (query ? "?" + query : ""));
      const md5 = /\b[a-f0-9]{32}\b/.exec(String(text));
      if (!md5) throw new ApiError("the checksum route answered no MD5");
      if (shown !== lines) return;
      $("line-verify").textContent = "verify /md5 flash:" + lines.file + " " + md5[0];
      $("line-verify-row").hidden = false;
      $("line-checksum-status").textContent = "";
    } catch (error) {
      if (shown !== lines) return;
      $("line-checksum-status").textContent = "No checksum: " + error.message;
    }
  }

  // -- Store and admin actions ---------------------------------------------------------

  async function loadStore() {
    try {
      const store = await api("api/v1/store");
      admin = true;
      const part = (p) => p ? humanSize(p.bytes) + " in " + p.objects + " objects" : "—";
      $("store-backend").textContent = store.backend;
      $("store-used").textContent = part(store) +
        (store.cap ? " of " + humanSize(store.cap) + " (" +
          Math.round(100 * store.bytes / store.cap) + "%)" : " (no cap)");
      $("store-hosted").textContent = part((store.sources || {}).hosted);
      $("store-cached").textContent = part((store.sources || {}).cached);
      $("store-pinned").textContent = part(store.pinned);
      $("store-evictions").textContent = String(store.evictions);
      $("store").hidden = false;
    } catch (error) {
      admin = false; // not an admin (403), or no store: nothing to show
      $("store").hidden = true;
    }
  }

  async function gcDryRun() {
    confirmThen("Run garbage collection as a dry run? Nothing is deleted; it reads every " +
      "record of the store.", async () => {
      const report = await api("api/v1/gc", {
        method: "POST", body: JSON.stringify({ dry_run: true }),
        headers: Object.assign({ "Content-Type": "application/json",
          Accept: "application/json" }, login ? { Authorization: login.header } : {}),
      });
      $("gc-report").textContent = JSON.stringify(report, null, 2);
      $("gc-report").hidden = false;
    });
  }

  function confirmThen(question, action) {
    const dialog = $("confirm");
    $("confirm-text").textContent = question;
    const done = (ok) => {
      dialog.close();
      $("confirm-ok").onclick = null;
      $("confirm-cancel").onclick = null;
      if (ok) Promise.resolve().then(action).then(() => showError(null), showError);
    };
    $("confirm-ok").onclick = () => done(true);
    $("confirm-cancel").onclick = () => done(false);
    dialog.showModal();
  }

  // -- Views and wiring ----------------------------------------------------------------

  function showView() {
    const onConsole = location.hash === "#console";
    $("view-console").hidden = !onConsole;
    $("view-builder").hidden = onConsole;
    $("nav-console").classList.toggle("active", onConsole);
    $("nav-builder").classList.toggle("active", !onConsole);
    if (onConsole && !$("repo-table").tBodies[0].rows.length) search();
  }

  async function loadInfo() {
    try {
      const response = await fetch(new URL("ui/info", base), { cache: "no-store" });
      if (response.ok) info = await response.json();
    } catch (error) {
      /* keep the defaults */
    }
  }

  // The route builder's Describe uses this page's login too (hosted images need one).
  window.passthroughAuthorization = () => (login ? login.header : null);

  async function start() {
    $("login").addEventListener("submit", logIn);
    $("logout").addEventListener("click", logOut);
    $("search").addEventListener("submit", search);
    $("repo-more").addEventListener("click", () => listRepositories(true).catch(showError));
    $("tags-more").addEventListener("click", () => listTags(true).catch(showError));
    $("line-checksum").addEventListener("click", fetchChecksum);
    $("gc-dry-run").addEventListener("click", gcDryRun);
    window.addEventListener("hashchange", showView);
    await loadInfo();
    showView();
  }

  start();
})();
