"""The filename table: every form the reference service documents, and every rule."""

from __future__ import annotations

import pytest

from passthrough.errors import BadRequest
from passthrough.oci.endpoint import RegistryEndpoint
from passthrough.oci.reference import (
    ImageReference,
    familiar_name,
    parse_filename,
    qualify,
    quote_input,
)

HUB = RegistryEndpoint("https://registry-1.docker.io", "docker.io")
PRIVATE = RegistryEndpoint("http://registry2.example.com:5000", "registry2.example.com:5000")


@pytest.mark.parametrize(
    ("filename", "registry", "namespace", "repository", "tag"),
    [
        ("nginx_latest.tar", HUB, None, "library/nginx", "latest"),
        ("team__platform__api_2026.06.tar", HUB, None, "team/platform/api", "2026.06"),
        ("myrepo_myimage_v1.0.tar", HUB, None, "myrepo/myimage", "v1.0"),
        ("nginx_latest.tar", PRIVATE, None, "nginx", "latest"),
        ("nginx_latest.tar", PRIVATE, "team", "team/nginx", "latest"),
        ("nginx_latest.tar", HUB, "myorg", "myorg/nginx", "latest"),
        ("org_app_1.2.3-rc.1.tar", PRIVATE, "team", "org/app", "1.2.3-rc.1"),
        ("a.b-c__d_v.tar", PRIVATE, None, "a.b-c/d", "v"),
        ("x_y_z_1.tar", PRIVATE, None, "x/y/z", "1"),
        ("busybox_1.36.1-musl.tar", HUB, None, "library/busybox", "1.36.1-musl"),
        ("app__sub_name_v2.tar", PRIVATE, None, "app/sub/name", "v2"),
    ],
)
def test_filename_table(filename, registry, namespace, repository, tag):
    ref = qualify(parse_filename(filename), registry, namespace)
    assert ref == ImageReference(repository, tag=tag)
    assert ref.reference == tag


@pytest.mark.parametrize(
    ("filename", "rule"),
    [
        ("nginx_latest.tgz", "must end in .tar"),
        ("nginx_latest", "must end in .tar"),
        ("nginx.tar", "<image>_<tag>.tar"),
        ("_latest.tar", "<image>_<tag>.tar"),
        ("nginx_.tar", "empty tag"),
        ("Nginx_latest.tar", "lowercase"),
        ("ngi$nx_latest.tar", "lowercase"),
        ("nginx_-bad.tar", "tag"),
        ("nginx_.hidden.tar", "tag"),
        ("nginx_" + "a" * 129 + ".tar", "tag"),
        ("_a_b.tar", "empty path component"),
        ("a___b_c.tar", "empty path component"),
        ("a" * 300 + "_b.tar", "longer than"),
        ("nginx_la test.tar", "tag"),
        ("nginx_lat\r\nSet-Cookie: x.tar", "tag"),
    ],
)
def test_bad_filenames_name_the_rule(filename, rule):
    with pytest.raises(BadRequest) as raised:
        parse_filename(filename)
    assert raised.value.status == 400
    assert rule in raised.value.message
    assert "\n" not in raised.value.message and "\r" not in raised.value.message


def test_familiar_names():
    assert familiar_name(HUB, "library/nginx") == "nginx"
    assert familiar_name(HUB, "team/api") == "team/api"
    assert familiar_name(PRIVATE, "team/api") == "registry2.example.com:5000/team/api"


def test_quote_input_escapes_controls_and_cuts():
    quoted = quote_input("a\r\nb\0" + "x" * 200)
    assert "\r" not in quoted and "\n" not in quoted and "\0" not in quoted
    assert len(quoted) < 100
