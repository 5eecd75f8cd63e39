"""A throwaway Request Tracker 5 on 127.0.0.1, for tests and the demo (`handoff rt start`).

Debian's packages (request-tracker5, rt5-db-sqlite, rt5-standalone) are installed when absent.
The package initialises an SQLite database of its own; each instance gets a copy of it in its
home folder, with a site configuration of its own (RT_SITE_CONFIG_DIR), so the system's RT stays
untouched. The first start sets the admin password and creates the support-tier custom field,
then keeps that database as `rt.initial.sqlite`: `reset` brings an instance back to it in about a
second. Starting an instance that already answers only prints its URL.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from integrations.helpdesk.support_tier import TIER_FIELD, TIERS

PACKAGES = ("request-tracker5", "rt5-db-sqlite", "rt5-standalone")
RT_SERVER = Path("/usr/share/request-tracker5/libexec/rt-server")
RT_LIB = Path("/usr/share/request-tracker5/lib")
PACKAGE_DATABASE = Path("/var/lib/dbconfig-common/sqlite3/request-tracker5/rtdb")
INSTALL_LOCK = Path("/tmp/handoff-rt-install.lock")
ADMIN_USER = "root"
START_TIMEOUT = 90.0

# Sets the admin password and creates the tier field (applied to all users); run once per instance.
_PREPARE = r"""
use strict; use warnings;
use RT; RT::LoadConfig(); RT::Init();
my $root = RT::User->new(RT->SystemUser); $root->Load($ENV{RT_ADMIN_USER});
my ($ok, $msg) = $root->SetPassword($ENV{RT_ADMIN_PASSWORD}); die "password: $msg\n" unless $ok;
my $cf = RT::CustomField->new(RT->SystemUser);
($ok, $msg) = $cf->Create(Name => $ENV{RT_TIER_FIELD}, Type => 'Select', MaxValues => 1,
    LookupType => RT::User->CustomFieldLookupType,
    Description => 'Set by handoff from the ERP: paid invoices over the last 12 months');
die "custom field: $msg\n" unless $ok;
for my $value (split /,/, $ENV{RT_TIER_VALUES}) {
    ($ok, $msg) = $cf->AddValue(Name => $value); die "value $value: $msg\n" unless $ok;
}
($ok, $msg) = $cf->AddToObject(RT::User->new(RT->SystemUser)); die "apply: $msg\n" unless $ok;
"""


class LocalRtError(Exception):
    """The local RT could not be installed or started; the message says what to do."""


def installed() -> bool:
    answer = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\n", *PACKAGES], capture_output=True, text=True
    )
    lines = answer.stdout.splitlines()
    return (
        answer.returncode == 0
        and len(lines) == len(PACKAGES)
        and all(line.endswith(" installed") for line in lines)
    )


def ensure_installed() -> None:
    """Install the RT5 packages non-interactively unless they are there (needs root)."""
    if installed():
        return
    if os.geteuid() != 0:
        raise LocalRtError(
            f"Request Tracker 5 is not installed; as root, run: apt-get install -y "
            f"--no-install-recommends {' '.join(PACKAGES)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        *PACKAGES,
    ]
    with INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions installing at once wait for each other
        if installed():
            return
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            answer = subprocess.run(install, env=env, capture_output=True, text=True)
            if answer.returncode != 0:
                raise LocalRtError(f"apt-get could not install RT5: {answer.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class LocalRt:
    """One instance, living in `home`: config, database, password, pid, port and log."""

    home: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._read('port')}"

    @property
    def user(self) -> str:
        return ADMIN_USER

    @property
    def password(self) -> str:
        return self._read("password")

    def start(self, password: str | None = None) -> str:
        """Install, initialise (first time) and start; returns the base URL once REST2 answers."""
        ensure_installed()
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.home / "rt.initial.sqlite").exists():
            self._initialise(password or os.environ.get("RT_PASSWORD") or secrets.token_urlsafe(18))
        elif password and password != self.password:
            raise LocalRtError(
                f"the RT in {self.home} has another admin password; remove the folder to start over"
            )
        if self._pid() is not None and self._answers():
            return self.base_url
        self._serve()
        return self.base_url

    def stop(self, graceful: bool = True) -> None:
        pid = self._pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            # rt-server leads its own process group: its workers go with it.
            os.killpg(pid, signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = time.monotonic() + 15
        while self._alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        (self.home / "rt-server.pid").unlink(missing_ok=True)

    def reset(self) -> str:
        """Back to the freshly initialised database (users and tickets gone), same port."""
        self.stop(graceful=False)  # its database is thrown away anyway
        shutil.copyfile(self.home / "rt.initial.sqlite", self.home / "rt.sqlite")
        return self.start()

    # --- internals ---------------------------------------------------------------------------

    def _read(self, name: str) -> str:
        return (self.home / name).read_text().strip()

    def _environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "RT_SITE_CONFIG": str(self.home / "RT_SiteConfig.pm"),
            "RT_SITE_CONFIG_DIR": str(self.home / "RT_SiteConfig.d"),
        }

    def _initialise(self, password: str) -> None:
        if not PACKAGE_DATABASE.exists():
            raise LocalRtError(
                f"{PACKAGE_DATABASE} is missing: reinstall rt5-db-sqlite (dpkg-reconfigure "
                "request-tracker5 initialises it)"
            )
        secret = self.home / "password"
        secret.touch(mode=0o600)
        secret.write_text(password + "\n")
        (self.home / "port").write_text(f"{free_port()}\n")
        shutil.copyfile(PACKAGE_DATABASE, self.home / "rt.sqlite")
        self._configure()
        answer = subprocess.run(
            ["perl", f"-I{RT_LIB}", "-e", _PREPARE],
            env={
                **self._environment(),
                "RT_ADMIN_USER": ADMIN_USER,
                "RT_ADMIN_PASSWORD": password,
                "RT_TIER_FIELD": TIER_FIELD,
                "RT_TIER_VALUES": ",".join(TIERS),
            },
            capture_output=True,
            text=True,
        )
        if answer.returncode != 0:
            raise LocalRtError(f"preparing RT failed: {answer.stderr[-2000:]}")
        shutil.copyfile(self.home / "rt.sqlite", self.home / "rt.initial.sqlite")

    def _configure(self, port: int | None = None) -> None:
        port = port or int(self._read("port"))
        folder = self.home / "RT_SiteConfig.d"
        folder.mkdir(exist_ok=True)
        (self.home / "RT_SiteConfig.pm").write_text("1;\n")
        (folder / "99-handoff.pm").write_text(
            "\n".join(
                [
                    "Set($rtname, 'handoff');",
                    "Set($Organization, 'handoff.local');",
                    "Set($Timezone, 'UTC');",
                    "Set($DatabaseType, 'SQLite');",
                    f"Set($DatabaseName, '{self.home / 'rt.sqlite'}');",
                    "Set($WebDomain, '127.0.0.1');",
                    f"Set($WebPort, {port});",
                    "Set($WebPath, '');",
                    f"Set($WebBaseURL, 'http://127.0.0.1:{port}');",
                    # REST2 checks the password's bcrypt hash on every request: at RT's default
                    # cost (12) that is 0.25 s a request; a throwaway instance can afford cost 4.
                    "Set($BcryptCost, 4);",
                    "Set($LogToSTDERR, 'warning');",
                    "Set($LogToSyslog, undef);",
                    # Mail RT would send (autoreplies) goes to a file in its log folder, not out.
                    "Set($MailCommand, 'mbox');",
                    f"Set($LogDir, '{self.home}');",
                    "1;",
                ]
            )
            + "\n"
        )

    def _serve(self) -> None:
        for attempt in range(3):
            if attempt:  # the port was taken meanwhile: take another one
                (self.home / "port").write_text(f"{free_port()}\n")
            self._configure()
            log = (self.home / "rt-server.log").open("ab")
            process = subprocess.Popen(
                [
                    str(RT_SERVER),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    self._read("port"),
                    "--max-workers",
                    "3",
                ],
                env=self._environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            log.close()
            (self.home / "rt-server.pid").write_text(f"{process.pid}\n")
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and process.poll() is None:
                if self._answers():
                    return
                time.sleep(0.2)
            if process.poll() is None:
                self.stop()
                break
            (self.home / "rt-server.pid").unlink(missing_ok=True)
        tail = (self.home / "rt-server.log").read_text(errors="replace")[-2000:]
        raise LocalRtError(f"rt-server did not answer on {self.base_url}/REST/2.0/: {tail}")

    def _pid(self) -> int | None:
        try:
            pid = int(self._read("rt-server.pid"))
        except (FileNotFoundError, ValueError):
            return None
        return pid if self._alive(pid) else None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: ask the kernel whether it exists
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        return finished == 0

    def _answers(self) -> bool:
        credentials = base64.b64encode(f"{ADMIN_USER}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            f"{self.base_url}/REST/2.0/rt", headers={"Authorization": f"Basic {credentials}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
