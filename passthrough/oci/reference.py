"""Stage 1, parse: a download filename such as ``team__platform__api_2026.06.tar`` becomes
an image reference, checked against the distribution reference grammar before any
upstream call.

Filename rules (those of the reference service):

- it ends in ``.tar``; the last ``_`` separates the image from the tag;
- ``__`` separates repository path components (``team__platform__api`` is team/platform/api);
- a single ``_`` keeps the ``namespace_image`` shorthand (``myrepo_myimage`` is myrepo/myimage).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from passthrough.errors import BadRequest
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.oci.platforms import Platform

# github.com/distribution/reference: path components and tags.
PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
MAX_REPOSITORY_LENGTH = 255
MAX_FILENAME_LENGTH = 512


def quote_input(value: str, limit: int = 80) -> str:
    """Client input as it may appear in an error message: JSON-quoted (so CR, LF, NUL and
    other controls are escaped and can never reach a header or split a log line) and cut."""
    cut = value if len(value) <= limit else value[:limit] + "…"
    return json.dumps(cut)


@dataclass(frozen=True)
class ImageReference:
    """A fully qualified image: repository path on one registry, plus a tag or a digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag}"


def validate_repository(path: str) -> str:
    """Check a repository path against the grammar; answer 400 naming the rule broken."""
    if not path:
        raise BadRequest("the image name is empty")
    if len(path) > MAX_REPOSITORY_LENGTH:
        raise BadRequest(f"the repository name is longer than {MAX_REPOSITORY_LENGTH} characters")
    for component in path.split("/"):
        if not component:
            raise BadRequest(f"the repository {quote_input(path)} has an empty path component")
        if not PATH_COMPONENT_RE.fullmatch(component):
            raise BadRequest(
                f"invalid repository component {quote_input(component)}: components are lowercase "
                "letters and digits, separated by '.', '_', '__' or '-' "
                "(distribution reference grammar)"
            )
    return path


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise BadRequest(
            f"invalid tag {quote_input(tag)}: a tag is 1 to 128 characters of [A-Za-z0-9_.-] "
            "and does not start with '.' or '-'"
        )
    return tag


def validate_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise BadRequest(
            f"invalid digest {quote_input(digest)}: expected sha256:<64 lowercase hex digits>"
        )
    return digest


def _strip_tar(text: str, what: str, example: str) -> str:
    """The part before ``.tar``, after the length and suffix rules both route forms share."""
    if len(text) > MAX_FILENAME_LENGTH:
        raise BadRequest(f"the {what} is longer than {MAX_FILENAME_LENGTH} characters")
    if not text.endswith(".tar"):
        raise BadRequest(f"the {what} {quote_input(text)} must end in .tar, as in {example}")
    return text[: -len(".tar")]


def parse_filename(filename: str) -> ImageReference:
    """``myrepo_myimage_v1.0.tar`` → myrepo/myimage:v1.0 (unqualified: no default namespace)."""
    stem = _strip_tar(filename, "filename", "nginx_latest.tar")
    image, separator, tag = stem.rpartition("_")
    if not separator or not image:
        raise BadRequest(
            f"the filename {quote_input(filename)} must be <image>_<tag>.tar, "
            "as in nginx_latest.tar"
        )
    if not tag:
        raise BadRequest(
            f"the filename {quote_input(filename)} has an empty tag after the last '_'"
        )
    # `__` separates path components; what is left of single `_` is the namespace shorthand.
    components: list[str] = []
    for part in image.split("__"):
        components.extend(part.split("_"))
    if any(not c for c in components):
        raise BadRequest(
            f"the image part of {quote_input(filename)} has an empty path component "
            "(a stray '_' at the start or end, or three in a row)"
        )
    return ImageReference(validate_repository("/".join(components)), tag=validate_tag(tag))


def qualify(
    ref: ImageReference, registry: RegistryEndpoint, default_namespace: str | None
) -> ImageReference:
    """Apply the registry's defaults to a one-component name: REGISTRY_DEFAULT_NAMESPACE when
    set, else Docker Hub's ``library/``; other registries take the name as it is."""
    if "/" in ref.repository:
        return ref
    if default_namespace:
        namespace = default_namespace
    elif registry.is_docker_hub:
        namespace = "library"
    else:
        return ref
    qualified = validate_repository(f"{namespace}/{ref.repository}")
    return ImageReference(qualified, tag=ref.tag, digest=ref.digest)


def familiar_name(registry: RegistryEndpoint, repository: str) -> str:
    """The name docker shows: ``nginx`` for docker.io/library/nginx, ``host:5000/team/api``
    elsewhere."""
    if registry.is_docker_hub:
        return repository.removeprefix("library/")
    return f"{registry.name}/{repository}"


def parse_reference_path(text: str) -> ImageReference:
    """``team/api:v1_beta.tar`` or ``team/api@sha256:….tar`` (``/ref/`` routes), where a
    tag may hold underscores and a digest pins the content. ``repo:tag@digest`` keeps the
    tag for the archive's name and pins the digest."""
    body = _strip_tar(text, "reference", "team/api:v1.tar")
    name, at, digest = body.partition("@")
    tag: str | None = None
    if ":" in name:
        name, _, tag = name.rpartition(":")
        validate_tag(tag)
    if at:
        validate_digest(digest)
    elif tag is None:
        raise BadRequest(
            f"the reference {quote_input(text)} needs a tag or a digest: "
            "<repository>:<tag>.tar or <repository>@sha256:<hex>.tar"
        )
    return ImageReference(validate_repository(name), tag=tag, digest=digest if at else None)


def synthetic_tag(ref: ImageReference) -> str:
    """The tag written to RepoTags: the real one, or for a digest-only download
    ``sha256-<hex>`` (docker load rejects RepoTags that hold a digest)."""
    if ref.tag:
        return ref.tag
    assert ref.digest is not None
    return ref.digest.replace(":", "-")


def archive_filename(ref: ImageReference) -> str:
    """A safe download filename for any reference: the /docker/ form when it round-trips."""
    tag = ref.tag or (ref.digest or "").replace(":", "-")[:19]
    return ref.repository.replace("/", "__") + "_" + tag + ".tar"


def platform_filename(filename: str, platform: Platform, default: Platform) -> str:
    """``nginx_latest.tar`` as ``nginx_latest_linux-arm64.tar`` for a platform other than
    the server's default, so that two platforms' archives do not overwrite each other on
    a device's flash; the default platform's name is left as it is."""
    if platform.matches(default):
        return filename
    stem = filename.removesuffix(".tar")
    return f"{stem}_{str(platform).replace('/', '-')}.tar"
