"""The systemd units of dist/systemd/ (docs/systemd.md).

* The shipped files use the documented layout and users (``systemd-sysusers`` makes them), keep
  every secret in a credential, and order anonticket after the wallet and tor.
* ``systemd-analyze verify`` finds nothing to say about either unit (its exit code is 0 on an
  unknown key, so its output is read too), with the documented system tor drop-in as well;
  the executables must exist for it, so it checks copies whose ``ExecStart=`` program is this
  checkout's ``twistd`` and the installed ``monero-wallet-rpc``.
* ``systemd-analyze security --offline=true --threshold=30`` (tenths: 3.0) passes, and the
  score it prints is 3.0 or lower.
* The units' command lines work as systemd runs them (systemd is not running here: the test
  stands in for it, from the parsed unit file, with its environment, credentials, directories,
  umask, NoNewPrivileges= and MemoryDenyWriteExecute=): monero-wallet-rpc opens a real view-only
  regtest wallet (made with the documented command) from the wallet file and a password file,
  takes its RPC login from the config file so that neither password is in ``/proc/PID/cmdline``
  (what ``ps`` shows), answers only with that login, and its ``ExecStartPost=`` lets the unit
  be active only once it listens; ``twistd anonticket`` reads the login from its credential and
  polls that wallet.
* ``KillMode=mixed``: SIGTERM to twistd alone removes the onion and stops the launched tor with
  no warning; SIGTERM to every process at once (what ``control-group`` does) does not.
* Why anonticket.service has no ``MemoryDenyWriteExecute=``: pyOpenSSL's callbacks fail under it.

The tests that start processes are marked slow one by one; the others take a few seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from anonticket.config import SETTINGS

from . import monero_regtest, tor_privnet
from .children import dies_with_parent
from .daemonproc import Daemon
from .monero_regtest import AuthError, Regtest, RPCError, WalletRPC, _Client, free_port

REPO = Path(__file__).resolve().parent.parent
DIST = REPO / "dist" / "systemd"
DOCS = REPO / "docs" / "systemd.md"
ANONTICKET_UNIT = DIST / "anonticket.service"
WALLET_UNIT = DIST / "monero-wallet-rpc.service"
SYSTEM_TOR_DROPIN = DIST / "anonticket-system-tor.conf"
SYSUSERS = DIST / "anonticket-sysusers.conf"
WALLET_CONFIG_EXAMPLE = DIST / "monero-wallet-rpc.conf.example"
ENV_EXAMPLE = DIST / "anonticket.env.example"
VENV_BIN = Path(sys.executable).parent

# The documented install layout (docs/systemd.md).
TWISTD_INSTALLED = "/opt/anonticket/bin/twistd"
WALLET_RPC_INSTALLED = "/usr/bin/monero-wallet-rpc"

ANALYZE = shutil.which("systemd-analyze")
SYSUSERS_TOOL = shutil.which("systemd-sysusers")
WALLET_RPC = shutil.which(monero_regtest.WALLET_RPC)

needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)
needs_monero = pytest.mark.skipif(
    not monero_regtest.available(), reason="monerod / monero-wallet-rpc not installed"
)
slow = pytest.mark.slow

# The exposure systemd-analyze security may give a unit; --threshold counts in tenths.
MAX_EXPOSURE = 3.0
# What a service gets from systemd, besides its own settings (systemd.exec(5), "Environment").
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_MDWE = 65  # Linux 6.3+
_PR_MDWE_REFUSE_EXEC_GAIN = 1


# -- reading unit files ----------------------------------------------------------------------


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, section: str, key: str) -> str:
        """The setting's last assignment (the one systemd uses for a single-valued key)."""
        found = self.values(section, key)
        assert found, f"{self.path.name}: no {key}= in [{section}]"
        return found[-1]

    def words(self, section: str, key: str) -> list[str]:
        """Every word of every assignment of a list-valued key (After=, Wants=, ...)."""
        return [w for v in self.values(section, key) for w in v.split()]

    def environment(self, credentials: Path) -> dict[str, str]:
        """``Environment=`` as the service sees it, with ``%d`` as *credentials*."""
        env: dict[str, str] = {}
        for value in self.values("Service", "Environment"):
            for assignment in shlex.split(value):
                name, _, setting = assignment.partition("=")
                env[name] = expand(setting, credentials)
        return env

    def credentials(self) -> dict[str, str]:
        """``LoadCredential=`` as {name: the file systemd reads}."""
        return dict(v.split(":", 1) for v in self.values("Service", "LoadCredential"))

    def exec_line(
        self, key: str, credentials: Path, env: dict[str, str] | None = None
    ) -> list[str]:
        """An ``Exec*=`` command line as systemd runs it: %d, ``${VAR}`` from *env* (default:
        the unit's Environment=), ``$$`` for a literal ``$``."""
        env = self.environment(credentials) if env is None else env
        return [
            substitute(expand(w, credentials), env) for w in shlex.split(self.value("Service", key))
        ]

    def exec_start(self, credentials: Path, env: dict[str, str] | None = None) -> list[str]:
        return self.exec_line("ExecStart", credentials, env)


def parse_unit(path: Path) -> Unit:
    """Sections, keys and values of a unit file (backslash continuations joined, comments out)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: not a setting: {line!r}"
        current.append((key.strip(), value.strip()))
    return Unit(path, sections)


def expand(word: str, credentials: Path) -> str:
    """systemd's specifiers as the units use them: %d is the credentials directory."""
    assert not re.search(r"%[^d%]", word), f"a specifier this test does not know: {word!r}"
    return word.replace("%d", str(credentials)).replace("%%", "%")


def substitute(word: str, env: dict[str, str]) -> str:
    """systemd's ``${VAR}`` in a command line; ``$$`` is a ``$`` left for the program."""
    parts = word.split("$$")
    parts = [re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], part) for part in parts]
    assert not any(re.search(r"\$\w", part) for part in parts), word  # $VAR: not used here
    return "$".join(parts)


def relocate(word: str, places: dict[str, Path]) -> str:
    """*word* (a path, or ``--option=path``) with a unit's directory (a key of *places*) moved
    to its place in the test."""
    option, sep, path = word.partition("=") if word.startswith("-") else ("", "", word)
    for unit_dir, place in places.items():
        if path == unit_dir or path.startswith(unit_dir + "/"):
            return option + sep + str(place) + path[len(unit_dir) :]
    return word


def system_dirs(unit: Unit, root: Path) -> dict[str, Path]:
    """StateDirectory=, LogsDirectory=, RuntimeDirectory= of *unit*, made under *root*."""
    places = {}
    for key, base in (
        ("StateDirectory", "/var/lib"),
        ("LogsDirectory", "/var/log"),
        ("RuntimeDirectory", "/run"),
    ):
        for name in unit.words("Service", key):
            place = root / key / name
            place.mkdir(parents=True, mode=0o700)
            places[f"{base}/{name}"] = place
    return places


def with_executable(unit_text: str, program: str) -> str:
    new, count = re.subn(r"(?m)^(ExecStart=)(\S+)", lambda m: m[1] + program, unit_text)
    assert count == 1
    return new


ANONTICKET = parse_unit(ANONTICKET_UNIT)
WALLET = parse_unit(WALLET_UNIT)


# -- the shipped files -----------------------------------------------------------------------


def test_units_use_the_documented_layout():
    docs = DOCS.read_text()
    assert ANONTICKET.exec_start(Path("/C"))[:4] == [
        TWISTD_INSTALLED,
        "--nodaemon",
        "--pidfile=",
        "anonticket",
    ]
    assert WALLET.exec_start(Path("/C"))[0] == WALLET_RPC_INSTALLED
    for unit, user in ((ANONTICKET, "anonticket"), (WALLET, "monero-wallet-rpc")):
        assert unit.value("Service", "User") == unit.value("Service", "Group") == user
        assert int(unit.value("Service", "LimitNOFILE")) >= 4096
        assert unit.value("Service", "UMask") == "0077"
        assert unit.value("Install", "WantedBy") == "multi-user.target"
        for source in unit.credentials().values():
            assert source in docs, f"docs/systemd.md does not say where {source} comes from"
    assert ANONTICKET.value("Service", "KillMode") == "mixed"
    env = ANONTICKET.environment(Path("/C"))
    assert env["ANONTICKET_DATA_DIR"] == "/var/lib/anonticket"
    assert ANONTICKET.value("Service", "StateDirectory") == "anonticket"
    assert ANONTICKET.value("Service", "WorkingDirectory") == "/var/lib/anonticket"
    assert env["ANONTICKET_LOG_FORMAT"] == "journal"
    for path in (TWISTD_INSTALLED, WALLET_RPC_INSTALLED, "/var/lib/anonticket"):
        assert path in docs
    # The wallet test makes its wallet with the documented command.
    assert " ".join(GENERATE_WALLET.split()) in " ".join(docs.replace("\\\n", " ").split())


def test_units_order_against_the_wallet_and_tor():
    assert "monero-wallet-rpc.service" in ANONTICKET.words("Unit", "After")
    assert "monero-wallet-rpc.service" in ANONTICKET.words("Unit", "Wants")
    # Never Requires=/BindsTo= the wallet: a wallet restart must not stop the daemon.
    assert not ANONTICKET.values("Unit", "Requires") and not ANONTICKET.values("Unit", "BindsTo")
    # Debian's tor.service is a oneshot /bin/true; the tor itself is tor@default.service.
    assert {"tor.service", "tor@default.service"} <= set(ANONTICKET.words("Unit", "After"))
    # The wallet unit is active only once its RPC port listens, where anonticket looks for it.
    assert WALLET.values("Service", "ExecStartPost")
    port = WALLET.environment(Path("/C"))["MONERO_WALLET_RPC_PORT"]
    assert ANONTICKET.environment(Path("/C"))["ANONTICKET_WALLET_RPC"] == f"http://127.0.0.1:{port}"
    drop_in = parse_unit(SYSTEM_TOR_DROPIN)
    assert "tor.service" in drop_in.words("Unit", "Wants")
    assert drop_in.environment(Path("/C"))["ANONTICKET_TOR_CONTROL"] == "unix:/run/tor/control"
    assert drop_in.value("Service", "SupplementaryGroups") == "debian-tor"


def test_secrets_are_credentials_never_on_a_command_line():
    # The daemon: the login comes from the credential systemd copies for it.
    assert ANONTICKET.credentials() == {"wallet-rpc-login": "/etc/anonticket/wallet-rpc-login"}
    env = ANONTICKET.environment(Path("/C"))
    assert env["ANONTICKET_WALLET_RPC_LOGIN_FILE"] == "/C/wallet-rpc-login"
    assert "ANONTICKET_WALLET_RPC_LOGIN" not in env
    # The wallet: every secret is a file named on its command line, none is on it.
    argv = WALLET.exec_start(Path("/C"))
    options = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    assert not {"--rpc-login", "--password", "--daemon-login"} & {a.split("=")[0] for a in argv}
    credentials = WALLET.credentials()
    assert options["--config-file"] == f"/C/{_key_for(credentials, 'monero-wallet-rpc.conf')}"
    assert options["--password-file"] == f"/C/{_key_for(credentials, 'wallet-password')}"
    assert options["--wallet-file"].startswith(
        f"/var/lib/{WALLET.value('Service', 'StateDirectory')}/"
    )
    for source in [*ANONTICKET.credentials().values(), *credentials.values()]:
        assert source.startswith(("/etc/anonticket/", "/etc/monero-wallet-rpc/"))
    # The example config carries the login, so the command line need not.
    assert re.search(r"(?m)^rpc-login=\S+:\S+$", WALLET_CONFIG_EXAMPLE.read_text())


def _key_for(credentials: dict[str, str], name: str) -> str:
    assert name in credentials, credentials
    return name


def test_every_anonticket_variable_is_an_option():
    known = {s.env for s in SETTINGS}
    files = [ANONTICKET_UNIT, SYSTEM_TOR_DROPIN, ENV_EXAMPLE]
    used = {v for f in files for v in re.findall(r"\bANONTICKET_[A-Z_]+\b", f.read_text())}
    assert used and used <= known, used - known


@pytest.mark.skipif(SYSUSERS_TOOL is None, reason="systemd-sysusers is not installed")
def test_sysusers_makes_the_users_the_units_run_as(tmp_path):
    assert SYSUSERS_TOOL is not None
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).touch()
    subprocess.run(
        [SYSUSERS_TOOL, f"--root={tmp_path}", str(SYSUSERS)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    }
    for unit in (ANONTICKET, WALLET):
        entry = users[unit.value("Service", "User")]
        # A system user (below 1000) with no login shell, at home in its state directory.
        assert int(entry[2]) < 1000 and entry[6].endswith("nologin")
        assert entry[5] == f"/var/lib/{unit.value('Service', 'StateDirectory')}"


# -- systemd-analyze ------------------------------------------------------------------------


def local_copy(unit_path: Path, directory: Path, drop_ins: dict[str, str] | None = None) -> Path:
    """*unit_path* copied into *directory* with its ExecStart= program found on this machine
    (verify requires it to exist), and drop-ins beside it, where systemd-analyze reads them."""
    programs = {"twistd": VENV_BIN / "twistd", "monero-wallet-rpc": WALLET_RPC}
    unit = parse_unit(unit_path)
    program = programs[Path(unit.exec_start(Path("/C"))[0]).name]
    if program is None or not Path(program).exists():
        pytest.skip(f"{unit_path.name}: its program is not installed here")
    copy = directory / unit_path.name
    copy.write_text(with_executable(unit_path.read_text(), str(program)))
    if drop_ins:
        (directory / f"{unit_path.name}.d").mkdir()
        for name, text in drop_ins.items():
            (directory / f"{unit_path.name}.d" / name).write_text(text)
    return copy


def verify(unit: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit code and what it said about *unit* or its drop-ins."""
    assert ANALYZE is not None
    run = subprocess.run(
        [ANALYZE, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = (run.stdout + run.stderr).splitlines()
    print("\n".join(said))
    ours = [line for line in said if str(unit.parent) in line or unit.name in line]
    return run.returncode, ours


VARIANTS = {
    "anonticket": (ANONTICKET_UNIT, {}),
    "anonticket+system-tor": (ANONTICKET_UNIT, {"system-tor.conf": SYSTEM_TOR_DROPIN}),
    "monero-wallet-rpc": (WALLET_UNIT, {}),
}


@needs_analyze
@pytest.mark.parametrize("variant", VARIANTS)
def test_systemd_analyze_verify_says_nothing(variant, tmp_path):
    unit_path, drop_ins = VARIANTS[variant]
    copy = local_copy(unit_path, tmp_path, {k: v.read_text() for k, v in drop_ins.items()})
    code, ours = verify(copy)
    assert code == 0 and ours == []


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_typo(tmp_path):
    """The check above can fail.  systemd 252's verify exits 0 on an unknown key unless
    --recursive-errors= is given, but it always says so: the output is what is checked."""
    copy = local_copy(ANONTICKET_UNIT, tmp_path, {"typo.conf": "[Service]\nKilMode=mixed\n"})
    _code, ours = verify(copy)
    assert any("Unknown key 'KilMode'" in line for line in ours), ours


def security(unit: Path, threshold: int) -> tuple[int, float, str]:
    """systemd-analyze security --offline: exit code, overall exposure, the whole report."""
    assert ANALYZE is not None
    run = subprocess.run(
        [
            ANALYZE,
            "security",
            "--offline=true",
            f"--threshold={threshold}",
            "--no-pager",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = run.stdout + run.stderr
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", report)
    assert found, report
    return run.returncode, float(found[1]), report


@needs_analyze
@pytest.mark.parametrize("variant", VARIANTS)
def test_systemd_analyze_security_is_at_most_3(variant, tmp_path, capsys):
    unit_path, drop_ins = VARIANTS[variant]
    unit = unit_path
    if drop_ins:  # the shipped unit with the drop-in beside it, as systemd would read them
        unit = tmp_path / unit_path.name
        shutil.copy(unit_path, unit)
        (tmp_path / f"{unit.name}.d").mkdir()
        for name, source in drop_ins.items():
            shutil.copy(source, tmp_path / f"{unit.name}.d" / name)
    code, exposure, report = security(unit, round(MAX_EXPOSURE * 10))
    with capsys.disabled():
        print(f"\n[systemd-analyze security] {variant}: {exposure}", flush=True)
    assert code == 0 and exposure <= MAX_EXPOSURE, report
    # --threshold bites: just below the score, the same unit fails.
    if exposure > 0:
        assert security(unit, round(exposure * 10) - 1)[0] != 0


# -- the units' command lines, run as systemd would ------------------------------------------


def sandbox_preexec(unit: Unit, umask: int) -> Callable[[], None]:
    """What of the unit's sandbox a child can do to itself: the umask, NoNewPrivileges=, and
    MemoryDenyWriteExecute= through prctl(PR_SET_MDWE) where the kernel has it (6.3+; the
    effect on a program is the same: no writable and executable memory)."""
    base = dies_with_parent(umask=umask)
    libc = ctypes.CDLL(None, use_errno=True)
    nnp = unit.value("Service", "NoNewPrivileges") == "yes"
    mdwe = unit.values("Service", "MemoryDenyWriteExecute")[-1:] == ["yes"]

    def preexec() -> None:
        base()
        if nnp:
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if mdwe:
            libc.prctl(_PR_SET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)

    return preexec


def service_env(unit: Unit, credentials: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": SYSTEMD_PATH,
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "CREDENTIALS_DIRECTORY": str(credentials),
        **unit.environment(credentials),
    }


def proc_text(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


@dataclass
class WalletService:
    rt: Regtest
    merchant: WalletRPC
    process: subprocess.Popen[bytes]
    port: int
    login: tuple[str, str]
    wallet_password: str
    output: Path
    ready_after: float  # seconds from ExecStart= until ExecStartPost= let the unit be active
    run: Callable[[list[str]], subprocess.Popen[bytes]]  # another command of the unit


def write_credential(directory: Path, name: str, text: str) -> None:
    """As systemd leaves one: in a directory only the service's user can read, mode 0400."""
    path = directory / name
    path.write_text(text)
    path.chmod(0o400)


# The one-off step of docs/systemd.md that makes the view-only wallet (it prompts for the
# address and the secret view key); HEIGHT is the restore height.
GENERATE_WALLET = (
    "monero-wallet-cli --offline --generate-from-view-key /var/lib/monero-wallet-rpc/wallet "
    "--password-file /etc/monero-wallet-rpc/wallet-password --restore-height HEIGHT "
    "--command address"
)


@pytest.fixture(scope="module")
def wallet_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletService]:
    """monero-wallet-rpc.service's ExecStart= with its credentials and directories, on a
    regtest chain, with a drop-in's Environment=MONERO_WALLET_RPC_PORT= of a free port; its
    ExecStartPost= run as systemd runs it, before the unit counts as started."""
    if not monero_regtest.available():
        pytest.skip("monerod / monero-wallet-rpc not installed")
    root = tmp_path_factory.mktemp("wallet-unit")
    with Regtest() as rt:
        merchant = rt.wallet("merchant")
        places = system_dirs(WALLET, root)
        credentials = root / "credentials"
        credentials.mkdir(mode=0o700)
        port = free_port()
        login = ("anonticket", "rpc-" + secrets.token_urlsafe(12))
        wallet_password = "wallet-" + secrets.token_urlsafe(12)
        config = WALLET_CONFIG_EXAMPLE.read_text()
        for key, value in (("daemon-address", rt.daemon_address), ("rpc-login", ":".join(login))):
            config, count = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", config)
            assert count == 1, f"the example config has no {key}= line"
        names = WALLET.credentials()
        write_credential(credentials, _key_for(names, "monero-wallet-rpc.conf"), config)
        write_credential(credentials, _key_for(names, "wallet-password"), wallet_password + "\n")

        # The operator's one-off step, as documented, with this test's places for the files.
        sources = {source: credentials / name for name, source in names.items()}
        command = GENERATE_WALLET.replace("HEIGHT", "0")
        generate = [str(sources.get(w, relocate(w, places))) for w in shlex.split(command)]
        made = subprocess.run(
            generate,
            input=f"{merchant.address}\n{merchant.view_key()}\n",
            capture_output=True,
            text=True,
            cwd=root,
            env={"PATH": SYSTEMD_PATH, "HOME": str(root), "LANG": "C.UTF-8"},
            timeout=120,
            check=False,
        )
        assert made.returncode == 0 and merchant.address in made.stdout, made

        env = service_env(WALLET, credentials, Path(places["/var/lib/monero-wallet-rpc"]))
        env["MONERO_WALLET_RPC_PORT"] = str(port)
        cwd = relocate(WALLET.value("Service", "WorkingDirectory"), places)
        output = root / "journal"
        preexec = sandbox_preexec(WALLET, int(WALLET.value("Service", "UMask"), 8))

        def run(argv: list[str]) -> subprocess.Popen[bytes]:
            with open(output, "ab") as sink:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    preexec_fn=preexec,
                )

        argv = [relocate(a, places) for a in WALLET.exec_start(credentials, env)]
        assert argv[0] == WALLET_RPC_INSTALLED
        argv[0] = str(WALLET_RPC)
        started = time.monotonic()
        process = run(argv)
        try:
            post = run(WALLET.exec_line("ExecStartPost", credentials, env))
            timeout = float(WALLET.value("Service", "TimeoutStartSec").removesuffix("min")) * 60
            assert post.wait(timeout) == 0, output.read_text(errors="replace")
            service = WalletService(
                rt,
                merchant,
                process,
                port,
                login,
                wallet_password,
                output,
                time.monotonic() - started,
                run,
            )
            yield service
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@slow
@needs_monero
def test_wallet_unit_is_started_only_once_its_rpc_answers(wallet_service, capsys):
    with capsys.disabled():
        print(f"\n[wallet unit] active after {wallet_service.ready_after:.1f} s", flush=True)
    client = _Client(wallet_service.port, wallet_service.login)
    try:  # at once: no retry needed once ExecStartPost= has let the unit be active
        assert client.jsonrpc("get_version")["version"] > 0
    finally:
        client.close()
    # ...and ExecStartPost= keeps waiting while nothing listens on the port.
    idle = free_port()
    probe = WALLET.exec_line("ExecStartPost", Path("/C"), {"MONERO_WALLET_RPC_PORT": str(idle)})
    waited = subprocess.run(["timeout", "2", *probe], capture_output=True, timeout=30, check=False)
    assert waited.returncode == 124  # timeout's code: still waiting


@slow
@needs_monero
def test_wallet_unit_keeps_both_passwords_off_its_command_line(wallet_service):
    pid = wallet_service.process.pid
    secrets_ = [wallet_service.login[1].encode(), wallet_service.wallet_password.encode()]
    cmdline = proc_text(pid, "cmdline")
    shown = subprocess.run(
        ["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, check=True, timeout=10
    ).stdout
    assert b"--config-file=" in cmdline and b"--password-file=" in cmdline  # the real one
    for secret in secrets_:
        assert secret not in cmdline and secret not in shown
        assert secret not in proc_text(pid, "environ")
    assert b"--rpc-login" not in cmdline


@slow
@needs_monero
def test_wallet_unit_opens_the_view_only_wallet_and_answers_only_with_its_login(wallet_service):
    port = wallet_service.port
    client = _Client(port, wallet_service.login)
    try:
        # The wallet file it opened at start, without an open_wallet call.
        address = client.jsonrpc("get_address", {"account_index": 0})["address"]
        assert address == wallet_service.merchant.address
        with pytest.raises(RPCError, match="watch-only"):
            client.jsonrpc("query_key", {"key_type": "spend_key"})
    finally:
        client.close()
    for login in (None, (wallet_service.login[0], "not-" + wallet_service.login[1])):
        stranger = _Client(port, login)
        try:
            with pytest.raises(AuthError):
                stranger.jsonrpc("get_address")
        finally:
            stranger.close()


def start_unit_daemon(
    root: Path, credential: str, settings: dict[str, str], *, public: str | None = None
) -> Daemon:
    """``twistd anonticket`` as anonticket.service starts it: its ExecStart=, Environment= with
    the credential in %d, its working and state directories, and *settings* as
    /etc/anonticket/anonticket.env would give them (they win over Environment=)."""
    places = system_dirs(ANONTICKET, root)
    credentials = root / "credentials"
    credentials.mkdir(mode=0o700)
    write_credential(
        credentials, _key_for(ANONTICKET.credentials(), "wallet-rpc-login"), credential
    )
    argv = ANONTICKET.exec_start(credentials)
    assert argv[0] == TWISTD_INSTALLED
    argv[0] = str(VENV_BIN / "twistd")
    env = service_env(ANONTICKET, credentials, root)
    env = {k: relocate(v, places) for k, v in env.items()}
    data_dir = Path(env["ANONTICKET_DATA_DIR"])
    daemon = Daemon(data_dir, public=public)
    env |= {"ANONTICKET_PUBLIC": daemon.public, "ANONTICKET_INTERNAL": daemon.internal}
    env |= settings
    with open(daemon.log, "ab") as log:
        daemon.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=relocate(ANONTICKET.value("Service", "WorkingDirectory"), places),
            env=env,
            preexec_fn=sandbox_preexec(ANONTICKET, int(ANONTICKET.value("Service", "UMask"), 8)),
        )
    daemon.wait_listening()
    return daemon


@slow
@needs_monero
def test_daemon_unit_takes_the_wallet_login_from_its_credential(wallet_service, tmp_path):
    settings = {
        "ANONTICKET_WALLET_RPC": f"http://127.0.0.1:{wallet_service.port}",
        "ANONTICKET_POLL_INTERVAL": "0.2",
    }
    daemon = start_unit_daemon(tmp_path, ":".join(wallet_service.login) + "\n", settings)
    try:
        health = daemon.wait_for_height(wallet_service.rt.daemon_height())
        assert health["monitor"] == "ok"
        pid = daemon.process.pid if daemon.process else 0
        password = wallet_service.login[1].encode()
        assert password not in proc_text(pid, "cmdline")
        assert password not in proc_text(pid, "environ")
    finally:
        code = daemon.stop()
    log = daemon.log_text()
    assert code in (0, -signal.SIGTERM), log
    assert wallet_service.login[1] not in log and "Traceback" not in log


@slow
@needs_monero
def test_daemon_unit_with_a_wrong_credential_is_refused_by_the_wallet(wallet_service, tmp_path):
    settings = {
        "ANONTICKET_WALLET_RPC": f"http://127.0.0.1:{wallet_service.port}",
        "ANONTICKET_POLL_INTERVAL": "0.2",
    }
    wrong = "not-" + wallet_service.login[1]
    daemon = start_unit_daemon(tmp_path, f"{wallet_service.login[0]}:{wrong}\n", settings)
    try:
        deadline = time.monotonic() + 30
        while "wallet poll failed (auth)" not in daemon.log_text():
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.1)
        assert daemon.health()["monitor"] == "starting"
    finally:
        daemon.stop()
    assert wrong not in daemon.log_text()


# -- KillMode=mixed --------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def onion_daemon(root: Path) -> tuple[Daemon, int]:
    """The unit's daemon with its own tor (the default), kept off the Tor network; returns it
    once the onion is added, with the tor's PID."""
    torrc = root / "offline.torrc"
    torrc.write_text("DisableNetwork 1\n")
    settings = {"ANONTICKET_NO_MONITOR": "1", "ANONTICKET_TOR_CONFIG": str(torrc)}
    daemon = start_unit_daemon(root, "anonticket:unused\n", settings, public="onion:80")
    assert daemon.process is not None
    deadline = time.monotonic() + 60
    while not re.search(r"onion service \S+\.onion created", daemon.log_text()):
        assert time.monotonic() < deadline, daemon.log_text()
        time.sleep(0.1)
    tors = children_of(daemon.process.pid)
    assert len(tors) == 1, tors
    return daemon, tors[0]


def stop_like_systemd(daemon: Daemon, tor: int, kill_mode: str) -> int:
    """SIGTERM as KillMode= sends it, then wait up to the unit's TimeoutStopSec= for twistd.
    mixed: twistd alone.  control-group: every process of the unit at once, tor too, and
    which reacts first is a race; here tor goes first (its exit is awaited), so that the
    outcome does not depend on the race: every way it goes, twistd loses tor under it."""
    assert daemon.process is not None
    if kill_mode == "control-group":
        os.kill(tor, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while running(tor):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    daemon.process.send_signal(signal.SIGTERM)
    timeout = float(ANONTICKET.value("Service", "TimeoutStopSec").removesuffix("s"))
    code = daemon.process.wait(timeout)
    daemon.process = None
    return code


def complaints(log: str) -> list[str]:
    """Lines at warning priority or worse: journal format (``<N>`` prefix, what the unit sets)
    or twistd's text format."""
    return [
        line
        for line in log.splitlines()
        if re.match(r"<[0-4]>", line) or re.search(r"#(warn|error|critical)\]", line)
    ]


@slow
@pytest.mark.skipif(not tor_privnet.available(), reason="tor is not installed")
@pytest.mark.parametrize("kill_mode", ["mixed", "control-group"])
def test_kill_mode_mixed_lets_the_daemon_remove_its_onion(kill_mode, tmp_path):
    daemon, tor = onion_daemon(tmp_path)
    before = len(daemon.log_text())
    try:
        code = stop_like_systemd(daemon, tor, kill_mode)
    finally:
        daemon.stop()
    log = daemon.log_text()
    assert code in (0, -signal.SIGTERM), log
    at_stop = complaints(log[before:])
    if kill_mode == "mixed":  # what the unit does
        assert ANONTICKET.value("Service", "KillMode") == "mixed"
        assert at_stop == [] and "onion service removed from tor" in log, log
        # twistd stopped its tor before exiting: nothing is left for systemd's SIGKILL.
        assert not running(tor)
    else:  # the default the unit overrides: tor is gone under the running daemon
        assert at_stop, log


# -- why anonticket.service has no MemoryDenyWriteExecute= -----------------------------------


def test_memory_deny_write_execute_would_break_tls_callbacks():
    """cffi makes writable and executable memory for every callback into Python; pyOpenSSL
    makes one to verify certificates (Twisted's TLS: https:// webhooks, the mutual-TLS internal
    site).  Under PR_SET_MDWE, the kernel's form of MemoryDenyWriteExecute=, that fails; the
    monero-wallet-rpc unit keeps the setting (its tests run under it)."""
    probe = (
        "import ctypes, sys\n"
        f"if ctypes.CDLL(None).prctl({_PR_SET_MDWE}, {_PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):\n"
        "    sys.exit(3)\n"
        "from OpenSSL import SSL\n"
        "SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *a: True)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    if run.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert run.returncode != 0 and "write+execute memory" in run.stderr, run.stderr
    assert not ANONTICKET.values("Service", "MemoryDenyWriteExecute")
    assert WALLET.value("Service", "MemoryDenyWriteExecute") == "yes"
