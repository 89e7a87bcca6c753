/* passthrough route builder: plain JavaScript, no build step, nothing loaded from
   elsewhere. Turns the form into a download URL (the /docker/<filename> form when the
   filename rules can express the image, else /ref/), a curl command and the IOS-XE
   lines; "Describe" asks /describe/<same path> what the URL would deliver. */
"use strict";

(function () {
  // The server's own grammar (passthrough/reference.py).
  const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
  const TAG = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
  const DIGEST = /^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;
  const HOST = /^(?:\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)$/;
  const APPID = /^[A-Za-z][A-Za-z0-9_]{0,31}$/;
  const HUB_URL = "https://registry-1.docker.io";
  const HUB_ALIASES = ["docker.io", "index.docker.io", "registry-1.docker.io"];
  const MAX_REPOSITORY = 255;

  const $ = (id) => document.getElementById(id);
  const common = window.passthroughCommon;
  const humanSize = common.humanSize;
  // Download URLs are built on the page's own origin (and any path prefix before it).
  const base = new URL(".", document.baseURI);
  let info = { registry: { url: HUB_URL, name: "docker.io" }, defaultPlatform: "linux/amd64",
               clientAuth: "optional" };
  let current = null; // {path, file, ...} of the URL on show
  let described = null; // the path Describe last answered for

  class InputError extends Error {}

  function registryOf(choice) {
    if (choice === "hosted") {
      // The hosted area answers on the environment's routes, whatever REGISTRY_URL is.
      return { scheme: base.protocol.replace(":", ""), host: base.host, url: null, hosted: true };
    }
    if (choice === "server") {
      const url = new URL(info.registry.url);
      const host = info.registry.url === HUB_URL ? "docker.io" : url.host;
      return { scheme: url.protocol.replace(":", ""), host: host, url: info.registry.url };
    }
    if (choice === "dockerhub") return { scheme: "https", host: "docker.io", url: HUB_URL };
    if (choice === "ghcr") return { scheme: "https", host: "ghcr.io", url: "https://ghcr.io" };
    const scheme = $("custom-scheme").value;
    const host = $("custom-host").value.trim().toLowerCase();
    const port = $("custom-port").value.trim();
    if (!host) throw new InputError("Enter the registry host.");
    if (!HOST.test(host)) throw new InputError("The registry host is not a valid host name.");
    if (port && !(/^\d{1,5}$/.test(port) && +port >= 1 && +port <= 65535)) {
      throw new InputError("The port is a number from 1 to 65535.");
    }
    if (!port && HUB_ALIASES.includes(host)) {
      return { scheme: "https", host: "docker.io", url: HUB_URL };
    }
    const hostport = port ? host + ":" + port : host;
    return { scheme: scheme, host: hostport, url: scheme + "://" + hostport };
  }

  function repositoryOf(text) {
    const repo = text.trim().replace(/^\/+|\/+$/g, "");
    if (!repo) throw new InputError("");
    if (repo.length > MAX_REPOSITORY) {
      throw new InputError("The repository name is longer than 255 characters.");
    }
    for (const part of repo.split("/")) {
      if (!COMPONENT.test(part)) {
        throw new InputError("“" + part + "” is not a valid repository path component: " +
          "lowercase letters and digits, separated by “.”, “_”, “__” or “-”.");
      }
    }
    return repo;
  }

  function tagOf(text) {
    let value = text.trim() || "latest";
    let digest = null;
    const at = value.indexOf("@");
    if (at >= 0) {
      digest = value.slice(at + 1);
      value = value.slice(0, at);
    } else if (/^sha(256|512):/.test(value)) {
      digest = value;
      value = "";
    }
    if (digest !== null && !DIGEST.test(digest)) {
      throw new InputError("A digest is sha256: and 64 lowercase hex digits.");
    }
    if (value && !TAG.test(value)) {
      throw new InputError("A tag is 1 to 128 of A–Z a–z 0–9 _ . - and does not start " +
        "with “.” or “-”.");
    }
    return { tag: value || null, digest: digest };
  }

  // The /docker/<filename> form: "__" separates path components and the last "_" the
  // tag, so neither a component nor the tag may hold "_".
  function dockerFilename(repo, tag) {
    if (!tag || tag.includes("_") || repo.includes("_")) return null;
    return repo.split("/").join("__") + "_" + tag + ".tar";
  }

  // What the server names a /ref/ download (reference.archive_filename).
  function archiveFilename(repo, tag, digest) {
    const label = tag || digest.replace(":", "-").slice(0, 19);
    return repo.split("/").join("__") + "_" + label + ".tar";
  }

  function platformFilename(file, platform) {
    return common.platformFilename(file, platform, info.defaultPlatform);
  }

  // HOSTED_REPOSITORIES globs: "*" one path component, "**" one or more.
  function isHosted(repo) {
    return (info.hosted || []).some((pattern) => {
      const parts = pattern.split("/").map((part) => part === "**" ? "[^/]+(?:/[^/]+)*"
        : part.split("*").map((piece) => piece.replace(/[.+?^${}()|[\]\\]/g, "\\$&"))
          .join("[^/]*"));
      return new RegExp("^" + parts.join("/") + "$").test(repo);
    });
  }

  function appIdOf(repo) {
    const given = $("appid").value.trim();
    if (given) return given;
    let name = repo.split("/").pop().replace(/[^A-Za-z0-9_]/g, "_");
    if (!/^[A-Za-z]/.test(name)) name = "app_" + name;
    return name.slice(0, 32);
  }

  function credentialMode(sameAsServer) {
    const server = $("cred-server");
    const client = $("cred-client");
    server.disabled = !sameAsServer;
    client.disabled = info.clientAuth === "off";
    if ((server.checked && server.disabled) || (client.checked && client.disabled)) {
      $("cred-none").checked = true;
    }
    return document.querySelector("input[name=cred]:checked").value;
  }

  function build() {
    const notes = [];
    let reg, repo, ref;
    try {
      reg = registryOf($("registry").value);
      repo = repositoryOf($("image").value);
      ref = tagOf($("tag").value);
    } catch (error) {
      if (!(error instanceof InputError)) throw error;
      show(null, error.message || "Enter an image name to build its URL.", !!error.message);
      return;
    }
    const sameAsServer = reg.url === info.registry.url;
    const mode = credentialMode(sameAsServer && !reg.hosted);
    $("cred-client-hint").textContent = reg.hosted
      ? "(a passthrough user, HTTP Basic; checked here, never sent on)"
      : "(HTTP Basic, passed on to the registry)";
    const withCredentials = mode === "client" || info.clientAuth === "required";

    let prefix = "";
    if (reg.hosted) {
      notes.push("The hosted area: images teams pushed into this server. Unless anonymous " +
        "pull is on, choose “My credentials”: a passthrough user with pull permission.");
      if (!isHosted(repo)) {
        notes.push("“" + repo + "” is not a hosted name (" + info.hosted.join(", ") +
          "): this URL goes to the server's registry instead.");
      }
    } else if (mode === "client") {
      prefix = "registry-auth/" + reg.scheme + "/" + encodeURIComponent(reg.host) + "/";
    } else if (!sameAsServer) {
      prefix = "registry/" + reg.scheme + "/" + encodeURIComponent(reg.host) + "/";
    } else {
      notes.push("This is the server's own registry (" + info.registry.name + "): the " +
        "server pulls with its configured credentials, if it has any.");
    }

    const filename = ref.digest ? null : dockerFilename(repo, ref.tag);
    let tail, file;
    if (filename) {
      tail = "docker/" + filename;
      file = filename;
    } else {
      const name = repo + (ref.tag ? ":" + ref.tag : "") + (ref.digest ? "@" + ref.digest : "");
      tail = "ref/" + name + ".tar";
      file = archiveFilename(repo, ref.tag, ref.digest);
      if (!ref.digest) {
        notes.push("The tag or a path component holds “_”, which the /docker/ filename " +
          "form cannot express, so the URL uses the /ref/ form.");
      } else if (!ref.tag) {
        notes.push("Pinned by digest: the archive's RepoTags gets the tag " +
          ref.digest.replace(":", "-") + ".");
      }
    }

    const platform = $("platform").value;
    file = platformFilename(file, platform);
    const query = [];
    if (platform) query.push("platform=" + platform);
    if ($("format").value !== "docker") query.push("format=" + $("format").value);
    if ($("layers").value !== "tar") query.push("layers=" + $("layers").value);
    const search = query.length ? "?" + query.join("&") : "";
    const path = prefix + tail + search;
    const url = base.href + path;
    const md5Url = base.href + prefix + tail + ".md5" + search;

    const iosUrl = withCredentials ? url.replace("://", "://USER:PASSWORD@") : url;
    const appid = appIdOf(repo);
    if (!APPID.test(appid)) {
      notes.push("IOx app IDs are a letter, then letters, digits and “_” (32 at most).");
    }
    if (query.length) {
      notes.push("The IOS-XE command line reads “?” as a request for help: type Ctrl-V " +
        "just before the “?” of the URL.");
    }
    if (withCredentials) {
      notes.push(reg.hosted
        ? "Replace USER:PASSWORD with your passthrough login (HTPASSWD_FILE)."
        : "Replace USER:PASSWORD with your registry login; this server passes it on to " +
          "the registry and keeps nothing.");
      if (base.protocol === "http:") {
        notes.push("This server is reached over plain HTTP: credentials cross the network " +
          "unencrypted.");
      }
    }
    show({
      path: path,
      url: url,
      file: file,
      curl: "curl -fL" + (withCredentials ? " -u 'USER:PASSWORD'" : "") + " -o " + file +
        " '" + url + "'",
      iosCopy: "copy " + iosUrl + " flash:" + file,
      iosVerify: "verify /md5 flash:" + file,
      md5Url: md5Url,
      iosInstall: "app-hosting install appid " + appid + " package flash:" + file,
      notes: notes,
    });
  }

  function show(route, message, isError) {
    current = route;
    $("output").hidden = !route;
    $("describe").hidden = !route;
    $("form-error").hidden = !isError;
    $("form-error").textContent = isError ? message : "";
    $("form-hint").hidden = !!route || isError;
    if (!route) return;
    $("out-url").textContent = route.url;
    $("out-link").href = route.url;
    $("out-curl").textContent = route.curl;
    $("out-ios-copy").textContent = route.iosCopy;
    $("out-ios-verify").textContent = route.iosVerify;
    $("out-md5-link").href = route.md5Url;
    $("out-ios-install").textContent = route.iosInstall;
    const list = $("notes");
    list.replaceChildren(...route.notes.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }));
    if (described !== null && described !== route.path) clearDescription();
  }

  // -- Checksum: the verify line with the MD5 of exactly what the URL sends -----------

  async function fillMd5() {
    if (!current) return;
    const route = current;
    $("out-ios-verify").textContent = route.iosVerify + " (asking the server…)";
    let text = "";
    try {
      const response = await fetch(route.md5Url, {
        cache: "no-store", credentials: "same-origin",
      });
      text = (await response.text()).trim();
      if (!response.ok) throw new Error(text);
    } catch (error) {
      if (current === route) {
        $("out-ios-verify").textContent = route.iosVerify + "  ! " + error.message;
      }
      return;
    }
    if (current === route) {
      $("out-ios-verify").textContent = route.iosVerify + " " + text.split(/\s+/)[0];
    }
  }

  // -- Describe ----------------------------------------------------------------------

  function clearDescription() {
    described = null;
    $("describe-result").hidden = true;
    setStatus("", false);
  }

  function setStatus(text, isError) {
    const status = $("describe-status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  function shortDigest(digest) {
    return digest ? digest.slice(0, 19) + "…" : "—";
  }

  async function runDescribe() {
    if (!current) return;
    const path = current.path;
    $("describe-result").hidden = true;
    setStatus("Asking the registry…", false);
    let response;
    try {
      // The console's login, if any (a hosted image needs a passthrough user); else the
      // browser answers a Basic challenge itself.
      const headers = { Accept: "application/json" };
      const login = window.passthroughAuthorization ? window.passthroughAuthorization() : null;
      if (login) headers.Authorization = login;
      response = await fetch(new URL("describe/" + path, base), {
        headers: headers, cache: "no-store", credentials: "same-origin",
      });
    } catch (error) {
      setStatus("The server did not answer: " + error.message, true);
      return;
    }
    if (!current || current.path !== path) return; // the form changed meanwhile
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("application/json")) {
      setStatus((await response.text()).trim(), true);
      return;
    }
    const doc = await response.json();
    described = path;
    render(doc);
    setStatus(response.ok ? "" : (doc.error || "HTTP " + response.status), !response.ok);
  }

  function render(doc) {
    const selected = doc.selected || null;
    $("describe-reference").textContent = doc.reference;
    $("describe-digest").textContent = doc.digest;
    $("describe-selected").textContent = selected ? selected.platform : "none";
    $("describe-layers").textContent = selected ? String(selected.layerCount) : "—";
    $("describe-total").textContent = selected
      ? humanSize(selected.compressedSize) + " (" +
        selected.compressedSize.toLocaleString("en") + " bytes)"
      : "—";
    $("describe-repotag").textContent = doc.download ? doc.download.repoTag : "—";
    $("describe-filename").textContent = doc.download && doc.download.filename || "—";
    $("describe-tar").textContent = !selected || selected.tarSize === undefined ? "—"
      : selected.tarSizeExact
        ? humanSize(selected.tarSize) + " (" + selected.tarSize.toLocaleString("en") +
          " bytes, exact)"
        : "about " + humanSize(selected.tarSize) + " (an estimate: the layers are not " +
          "cached yet; exact after a first download)";
    const rows = (doc.platforms || []).map((entry) => {
      const row = document.createElement("tr");
      const isSelected = selected && entry.platform === selected.platform;
      if (isSelected) row.className = "selected";
      const name = document.createElement("td");
      name.textContent = entry.platform + (isSelected ? " (selected)" : "");
      const digest = document.createElement("td");
      const code = document.createElement("code");
      code.textContent = shortDigest(entry.digest);
      code.title = entry.digest || "";
      digest.append(code);
      const action = document.createElement("td");
      const use = document.createElement("button");
      use.type = "button";
      use.textContent = "Use";
      use.setAttribute("aria-label", "Use platform " + entry.platform);
      use.addEventListener("click", () => choosePlatform(entry.platform));
      action.append(use);
      row.append(name, digest, action);
      addPlatformOption(entry.platform);
      return row;
    });
    $("describe-platforms").tBodies[0].replaceChildren(...rows);
    $("describe-result").hidden = false;
  }

  function addPlatformOption(platform) {
    const select = $("platform");
    if ([...select.options].some((o) => o.value === platform)) return;
    const option = document.createElement("option");
    option.value = platform;
    option.textContent = platform + " (in this image)";
    select.append(option);
  }

  function choosePlatform(platform) {
    addPlatformOption(platform);
    $("platform").value = platform;
    build();
    runDescribe();
  }

  // -- Copy buttons ------------------------------------------------------------------

  async function copyText(text) {
    // The Clipboard API needs a secure context; plain-HTTP pages fall back to execCommand.
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        return true;
      } catch (error) {
        /* fall through */
      }
    }
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch (error) {
      copied = false;
    }
    area.remove();
    return copied;
  }

  async function onCopy(event) {
    const button = event.currentTarget;
    const source = $(button.dataset.copy);
    const copied = await copyText(source.textContent);
    if (!copied) {
      // Leave the text selected so Ctrl+C works.
      const range = document.createRange();
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    button.textContent = copied ? "Copied" : "Press Ctrl+C";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  }

  // -- A full reference pasted into the image field -----------------------------------

  function splitPastedReference() {
    const field = $("image");
    let value = field.value.trim();
    let scheme = null;
    const schemeMatch = /^(https?):\/\//i.exec(value);
    if (schemeMatch) {
      scheme = schemeMatch[1].toLowerCase();
      value = value.slice(schemeMatch[0].length);
    }
    let digest = null;
    let tag = null;
    const at = value.indexOf("@");
    if (at >= 0) {
      digest = value.slice(at + 1);
      value = value.slice(0, at);
    }
    const colon = value.lastIndexOf(":");
    if (colon > value.lastIndexOf("/")) {
      tag = value.slice(colon + 1);
      value = value.slice(0, colon);
    }
    const first = value.split("/")[0];
    const hasHost = value.includes("/") &&
      (first.includes(".") || first.includes(":") || first === "localhost");
    if (hasHost) {
      value = value.slice(first.length + 1);
      chooseRegistry(first.toLowerCase(), scheme);
    }
    if (!hasHost && !tag && !digest) return;
    field.value = value;
    if (tag || digest) $("tag").value = tag && digest ? tag + "@" + digest : digest || tag;
  }

  function chooseRegistry(hostport, scheme) {
    const select = $("registry");
    const server = new URL(info.registry.url);
    const self = [base.host, info.pullHost].filter(Boolean);
    if ((info.hosted || []).length && self.includes(hostport)) {
      select.value = "hosted"; // this server's own name: a hosted image
    } else if (HUB_ALIASES.includes(hostport)) {
      select.value = info.registry.url === HUB_URL ? "server" : "dockerhub";
    } else if (hostport === server.host && (!scheme || scheme + ":" === server.protocol)) {
      select.value = "server";
    } else if (hostport === "ghcr.io") {
      select.value = "ghcr";
    } else {
      select.value = "custom";
      const colon = hostport.lastIndexOf(":");
      const hasPort = colon > hostport.lastIndexOf("]");
      $("custom-host").value = hasPort ? hostport.slice(0, colon) : hostport;
      $("custom-port").value = hasPort ? hostport.slice(colon + 1) : "";
      $("custom-scheme").value = scheme || "https";
    }
    syncRegistryFields();
  }

  function syncRegistryFields() {
    $("custom-registry").hidden = $("registry").value !== "custom";
  }

  // -- Wiring ------------------------------------------------------------------------

  async function loadInfo() {
    try {
      const response = await fetch(new URL("ui/info", base), { cache: "no-store" });
      if (response.ok) info = await response.json();
    } catch (error) {
      /* keep the defaults: the page still builds URLs */
    }
    const hosted = info.hosted || [];
    $("registry-hosted-option").hidden = hosted.length === 0;
    $("registry-hosted-option").textContent = "This server's hosted area (" +
      hosted.join(", ") + ")";
    $("registry-server-option").textContent = "This server's registry (" +
      info.registry.name + ")";
    $("server-registry").textContent = info.registry.name + " (" + info.registry.url + ")";
    $("platform-default").textContent = "Server default (" + info.defaultPlatform + ")";
    if (info.clientAuth === "required") {
      $("cred-client").checked = true;
    }
    build();
  }

  function start() {
    const form = $("builder");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      build();
    });
    form.addEventListener("input", build);
    $("image").addEventListener("paste", () => setTimeout(() => {
      splitPastedReference();
      build();
    }, 0));
    form.addEventListener("change", (event) => {
      if (event.target.id === "image") splitPastedReference();
      if (event.target.id === "registry") syncRegistryFields();
      build();
    });
    // Every copy button, the console's included (they come and go).
    document.addEventListener("click", (event) => {
      const button = event.target.closest("button.copy");
      if (button) onCopy({ currentTarget: button });
    });
    $("describe-button").addEventListener("click", runDescribe);
    $("md5-button").addEventListener("click", fillMd5);
    syncRegistryFields();
    build();
    loadInfo();
  }

  start();
})();
