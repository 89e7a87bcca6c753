"""Lines of Debian's own `htpasswd` binary (apache2-utils), not a reimplementation.

The fast tier starts no process, so the lines its tests use were made by the binary once
and are kept in RECORDED (by the arguments given to `htpasswd -n -b`); a line asked for
with other arguments is made by the binary then and there, which only the full tier
allows. `python -m tests.support.htpasswd` prints the table afresh (paste it below when
adding arguments); the full tier checks that the binary still makes lines of the shape
recorded (tests/e2e/test_rig_htpasswd.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

HTPASSWD = "/usr/bin/htpasswd"


def run_htpasswd(*args: str) -> str:
    """One line of `htpasswd -n -b ARGS` output, made by the binary now."""
    assert shutil.which(HTPASSWD), "htpasswd is missing: apt-get install apache2-utils"
    out = subprocess.run(
        [HTPASSWD, "-n", "-b", *args], check=True, capture_output=True, text=True
    ).stdout
    return out.strip()


def htpasswd(*args: str) -> str:
    """One line of `htpasswd -n -b ARGS` output: the recorded one, else the binary's."""
    recorded = RECORDED.get(args)
    return recorded if recorded is not None else run_htpasswd(*args)


def bcrypt_line(user: str, password: str) -> str:
    # Cost 4, the least htpasswd makes: the tests check logic, not bcrypt's slowness.
    return htpasswd("-B", "-C", "4", user, password)


def shape(line: str) -> str:
    """The line with its salt and hash masked (they differ from run to run)."""
    return re.sub(r"[./0-9A-Za-z+=]{8,}", "*", line)


# fmt: off
RECORDED: dict[tuple[str, ...], str] = {
    ('-B', '-C', '4', 'alice', '1'):
        'alice:$2y$04$J5g0SERIDGsn0eGQTkv.MOZBFCyibfFVCv5JxzBrmPu2LUNbofolW',
    ('-B', '-C', '4', 'alice', '2'):
        'alice:$2y$04$sK0bRangsf0Qt1LNUGD/N.0Nm1EShZMMkwvGfFwhu8GqQw/LKD.1i',
    ('-B', '-C', '4', 'alice', 'a'):
        'alice:$2y$04$TnyZs1NHMfZnL9UAEp4CH.qbg/qRN44/kV8Omo410HW.CUSYPWjdK',
    ('-B', '-C', '4', 'alice', 'alice-pw'):
        'alice:$2y$04$cqKc.CoQLEnZQSNeF6gcrujbkwX/7FEvBnOKIsmPXxoFaJZtWyVUa',
    ('-B', '-C', '4', 'alice', 'alice-pw-7Hq'):
        'alice:$2y$04$MutoLgV9rtNp/qJXX2xPZOnPGxtQ/uAV7ZHRr0C2YFvpOfIdqzPJq',
    ('-B', '-C', '4', 'alice', 'new-pw'):
        'alice:$2y$04$29Ssute7R06HoVbRdmtileYRA7cTLxOLuy4/sV8XDk2ovEsPdkCs2',
    ('-B', '-C', '4', 'alice', 'old-pw'):
        'alice:$2y$04$7KeOfwBAOX7DqhzM3tste..WrwCTrNXI5GOwS1gn2xwqG2vk8mMqa',
    ('-B', '-C', '4', 'alice', 'pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp-ignored-by-bcrypt'):  # noqa: E501
        'alice:$2y$04$JAiICKXBQCiY/wF/UIl6KuNXvISQma1s.G.yxe9iMKY8RJRI276E6',
    ('-B', '-C', '4', 'alice', 'pw'):
        'alice:$2y$04$w5tH5TMMUBThYAb1YMID2utSTwTwH94bstKPiY66RO4iEGMVK5oqK',
    ('-B', '-C', '4', 'alice', 'pw-kept-nowhere'):
        'alice:$2y$04$W9UTleqoFLiuzaBfIoqMAOSU1u6f9KghwICV5ecZ8IISjqpvZ2jke',
    ('-B', '-C', '4', 'alice', 'ünïcödé pw'):
        'alice:$2y$04$Tl2XwaUmj4PiBNGBT4VGWuVLMZF/86h9ITQcLK1YNiEUZ65WLNGbC',
    ('-B', '-C', '4', 'bob', 'bob-pw'):
        'bob:$2y$04$CU4dILYilsjS4JMRnX.FA.i8Xza3Y36LqsNKW4D6FxcIEkgKsv6NS',
    ('-B', '-C', '4', 'bob', 'bob-pw-3Zx'):
        'bob:$2y$04$LeE2yWwH2KbZybrAUI1D5.hK.wTvcAfOXRrqevlpNuHgvygq8Dn6C',
    ('-B', '-C', '4', 'bob', 'pw'):
        'bob:$2y$04$hgGSR8y5ICemZ8UedfxIHOg3pRg2poBBWpdo0AiZFVtcqM5FMxKKO',
    ('-B', '-C', '4', 'carol', 'carol-pw-9Lm'):
        'carol:$2y$04$3S5CDtSlx/Vdy.c2GzW3KOIn02VbBMAIgA9Eb5L0.lWFTkBCSFrL6',
    ('-B', 'dave', 'dave-pw'):
        'dave:$2y$05$fhi2jqxPIn5/rDbtWQ5lHe9z0vTcV6/HEMgPGyaXaJBFbV39.UbkW',
    ('-d', 'mallory', 'weak-pw'):
        'mallory:lEjVpnKkr85Pg',
    ('-m', 'alice', 'pw'):
        'alice:$apr1$fAOm2ouy$EmIvXag1xL/7GOE9mFgYQ0',
    ('-m', 'bob', 'b'):
        'bob:$apr1$/TZGLolh$5AMTu6FPKneTNPH6dV8b2/',
    ('-m', 'mallory', 'weak-pw'):
        'mallory:$apr1$07PzAJu6$ucJiLYk6i9E4RhzztB2ww.',
    ('-p', 'mallory', 'weak-pw'):
        'mallory:weak-pw',
    ('-s', 'mallory', 'weak-pw'):
        'mallory:{SHA}xyHBfXNmZGekNonBfEshTyF9FPc=',
}
# fmt: on


if __name__ == "__main__":
    sys.stdout.write("RECORDED: dict[tuple[str, ...], str] = {\n")
    for key in sorted(RECORDED):
        sys.stdout.write(f"    {key!r}:\n        {run_htpasswd(*key)!r},\n")
    sys.stdout.write("}\n")
