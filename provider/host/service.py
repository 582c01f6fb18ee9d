"""Run the agent as a per-user launchd service (a LaunchAgent) on macOS.

:func:`install` writes ``~/Library/LaunchAgents/<label>.plist`` (see
:func:`build_plist`; ``deploy/com.mlx-provider.agent.plist`` is the same
document as a template) and loads it into the user's GUI domain with
``launchctl bootstrap``. :func:`uninstall`, :func:`start`, :func:`stop`,
:func:`restart` and :func:`logs` manage it from there.

Every function returns a process exit code and reports on stdout (errors on
stderr). With ``dry_run=True`` it prints each file it would write and each
command it would run, and touches nothing.

On other systems the launchd functions print one line saying so, the
systemd user unit to use instead (``deploy/mlx-provider.service``, also
:func:`systemd_unit`) with the commands to install it, and return 1.
``platform`` (default: ``$MLXP_PLATFORM``, else :data:`sys.platform`) picks
the branch, so tests exercise the macOS path anywhere; ``launchctl`` is
whatever is first on ``PATH``.
"""

from __future__ import annotations

import difflib
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec

from provider.logs import LOG_FILE_NAME, default_log_dir

__all__ = [
    "DEFAULT_LABEL",
    "PLATFORM_ENV",
    "LaunchAgent",
    "ServiceState",
    "build_plist",
    "host_platform",
    "install",
    "logs",
    "parse_launchctl_print",
    "restart",
    "service_state",
    "start",
    "stop",
    "systemd_unit",
    "uninstall",
]

DEFAULT_LABEL = "com.mlx-provider.agent"
#: Environment variable overriding :data:`sys.platform` for this module.
#: (Not ``MLX_PROVIDER_*``: the config loader rejects unknown keys there.)
PLATFORM_ENV = "MLXP_PLATFORM"
#: The config's default ``drain_timeout_s``.
DEFAULT_DRAIN_TIMEOUT_S = 300.0
#: Time allowed on top of the drain before the service manager kills the agent.
STOP_MARGIN_S = 30
THROTTLE_INTERVAL_S = 10
#: How often :func:`install` asks launchd whether a booted-out job is gone.
BOOTOUT_POLL_S = 0.25
SYSTEMD_UNIT_NAME = "mlx-provider.service"

P = ParamSpec("P")


class ServiceError(Exception):
    """A step failed; ``str()`` says which and what to do."""


def host_platform(platform: str | None = None) -> str:
    """``platform``, else ``$MLXP_PLATFORM``, else :data:`sys.platform`."""
    return platform or os.environ.get(PLATFORM_ENV) or sys.platform


@dataclass(frozen=True)
class LaunchAgent:
    """Where a LaunchAgent lives: its label, the user's home and uid."""

    label: str = DEFAULT_LABEL
    home: Path | None = None
    uid: int | None = None

    @property
    def home_dir(self) -> Path:
        return self.home if self.home is not None else Path.home()

    @property
    def domain(self) -> str:
        """``gui/<uid>``: the logged-in user's domain, where agents see the GPU."""
        return f"gui/{self.uid if self.uid is not None else os.getuid()}"

    @property
    def target(self) -> str:
        """``gui/<uid>/<label>``, the service target of ``launchctl``."""
        return f"{self.domain}/{self.label}"

    @property
    def plist_path(self) -> Path:
        return self.home_dir / "Library" / "LaunchAgents" / f"{self.label}.plist"

    @property
    def log_dir(self) -> Path:
        return default_log_dir(platform="darwin", home=self.home_dir)

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "stderr.log"


def build_plist(
    agent: LaunchAgent,
    *,
    config_path: Path,
    python: str | None = None,
    log_file: Path | None = None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The launchd job description for ``python -m provider serve --config <config_path>``.

    ``python`` defaults to :data:`sys.executable`, the interpreter running
    now, so the service runs in the same environment (venv) it was installed
    from. With ``log_file``, the job's environment sets
    ``MLX_PROVIDER_LOG_FILE`` to it. ``extra_env`` is added to the job's
    environment (e.g. ``HF_HOME``).
    """
    # Not resolved: a venv's python is a symlink, and following it would
    # leave the venv and lose its packages.
    python = os.path.abspath(python or sys.executable)
    home = agent.home_dir
    # launchd starts jobs with PATH=/usr/bin:/bin:/usr/sbin:/sbin; put the
    # interpreter's bin dir (console scripts) and Homebrew ahead of it.
    system = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    path = ":".join([os.path.dirname(python), "/opt/homebrew/bin", "/usr/local/bin", *system])
    env = {"PATH": path, "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    if log_file is not None:
        env["MLX_PROVIDER_LOG_FILE"] = str(log_file)
    env.update(extra_env or {})
    return {
        "Label": agent.label,
        "ProgramArguments": [python, "-m", "provider", "serve", "--config", str(config_path)],
        "EnvironmentVariables": env,
        "WorkingDirectory": str(home),
        "RunAtLoad": True,
        # Restart after a crash (non-zero exit), not after a clean drain
        # (exit 0 on SIGTERM or a coordinator drain): stopping must stick.
        "KeepAlive": {"SuccessfulExit": False},
        # At most one start every 10 s, so a crash loop does not spin.
        "ThrottleInterval": THROTTLE_INTERVAL_S,
        # On bootout launchd sends SIGTERM, then SIGKILL after this long: let
        # the agent finish its drain first.
        "ExitTimeOut": int(drain_timeout_s) + STOP_MARGIN_S,
        # Interactive, not Background: launchd throttles Background jobs' CPU
        # and I/O and, on Apple Silicon, keeps them on the efficiency cores,
        # which would slow every buyer's tokens. Interactive jobs get the
        # same treatment as a foreground app.
        "ProcessType": "Interactive",
        # The agent writes its config (provider_id) and logs: owner-only.
        "Umask": 0o077,
        "StandardOutPath": str(agent.stdout_path),
        "StandardErrorPath": str(agent.stderr_path),
    }


def render_plist(plist: dict[str, Any]) -> bytes:
    """``plist`` as XML, keys sorted, so the same job always gives the same bytes."""
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=True)


def systemd_unit() -> str:
    """The systemd user unit for Linux; ``deploy/mlx-provider.service`` holds the same text."""
    return _SYSTEMD_UNIT


_SYSTEMD_UNIT = f"""\
# systemd user unit for the mlx-provider agent (Linux).
#
# Install:
#   mkdir -p ~/.config/systemd/user
#   cp deploy/mlx-provider.service ~/.config/systemd/user/
#   systemctl --user daemon-reload
#   systemctl --user enable --now mlx-provider
#   loginctl enable-linger "$USER"   # keep serving after you log out
# Logs:
#   journalctl --user -u mlx-provider -f
#
# ExecStart assumes the console script is in ~/.local/bin (pipx, pip --user);
# use the output of `command -v mlx-provider` if yours is elsewhere.

[Unit]
Description=mlx-provider compute marketplace agent
# No network-online.target: a user manager cannot order against it, and the
# agent retries its connection with backoff anyway.

[Service]
Type=exec
ExecStart=%h/.local/bin/mlx-provider serve --config %h/.config/mlx-provider/config.toml
Environment=PYTHONUNBUFFERED=1
# Restart after a crash, not after a clean drain (exit 0).
Restart=on-failure
RestartSec={THROTTLE_INTERVAL_S}
# SIGTERM makes the agent drain in-flight jobs, then exit 0. Allow the
# config's drain_timeout_s ({DEFAULT_DRAIN_TIMEOUT_S:g} s by default) plus a margin before SIGKILL;
# raise this if you raise drain_timeout_s.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={int(DEFAULT_DRAIN_TIMEOUT_S) + STOP_MARGIN_S}
UMask=0077

[Install]
WantedBy=default.target
"""

_SYSTEMCTL = {
    "install": ["systemctl --user daemon-reload", "systemctl --user enable --now mlx-provider"],
    "uninstall": [
        "systemctl --user disable --now mlx-provider",
        f"rm ~/.config/systemd/user/{SYSTEMD_UNIT_NAME}",
    ],
    "start": ["systemctl --user start mlx-provider"],
    "stop": ["systemctl --user stop mlx-provider"],
    "restart": ["systemctl --user restart mlx-provider"],
}


def _not_macos(command: str, platform: str) -> int:
    print(
        f"mlx-provider {command}: launchd services are macOS-only (this is {platform}); "
        f"use the systemd user unit deploy/{SYSTEMD_UNIT_NAME} instead.",
        file=sys.stderr,
    )
    steps = list(_SYSTEMCTL[command])
    if command == "install":
        steps[:0] = [
            "mkdir -p ~/.config/systemd/user",
            f"cp deploy/{SYSTEMD_UNIT_NAME} ~/.config/systemd/user/",
        ]
    for step in steps:
        print(f"  {step}", file=sys.stderr)
    return 1


def _exit_code(func: Callable[P, int]) -> Callable[P, int]:
    # ServiceError is how the steps below stop: one line on stderr, exit 1.
    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return func(*args, **kwargs)
        except ServiceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _launchctl(*args: str, dry_run: bool = False, when: str = "") -> None:
    """Run ``launchctl args``; raise :exc:`ServiceError` if it fails.

    A dry run prints the command instead, followed by ``when`` (the condition
    it would run under) in parentheses.
    """
    command = shlex.join(["launchctl", *args])
    if dry_run:
        print(f"would run: {command}" + (f"  ({when})" if when else ""))
        return
    exe = shutil.which("launchctl")
    if exe is None:
        raise ServiceError("launchctl not found on PATH (is this macOS?)")
    print(f"running: {command}")
    proc = subprocess.run([exe, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()
        raise ServiceError(f"`{command}` failed (exit {proc.returncode}): {output}")


def _launchctl_print(agent: LaunchAgent) -> str | None:
    """``launchctl print`` of the service, or ``None`` when it is not loaded."""
    exe = shutil.which("launchctl")
    if exe is None:
        raise ServiceError("launchctl not found on PATH (is this macOS?)")
    proc = subprocess.run([exe, "print", agent.target], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@dataclass(frozen=True)
class ServiceState:
    """What ``launchctl print`` says about a loaded service."""

    state: str
    pid: int | None
    last_exit_code: str | None


def parse_launchctl_print(text: str) -> ServiceState:
    """Read ``state``, ``pid`` and ``last exit code`` from ``launchctl print`` output."""
    fields: dict[str, str] = {}
    # Top-level properties are indented by one tab; nested blocks by more.
    for match in re.finditer(r"^\t([a-z][a-z ]*?) = (.*)$", text, re.MULTILINE):
        fields.setdefault(match.group(1), match.group(2).strip())
    pid = fields.get("pid", "")
    return ServiceState(
        state=fields.get("state", "unknown"),
        pid=int(pid) if pid.isdigit() else None,
        last_exit_code=fields.get("last exit code"),
    )


def service_state(agent: LaunchAgent) -> ServiceState | None:
    """The service's state, or ``None`` when it is not loaded. macOS only."""
    text = _launchctl_print(agent)
    return None if text is None else parse_launchctl_print(text)


def _show_file(path: Path, content: bytes, *, dry_run: bool) -> bool:
    """Say what writing ``content`` to ``path`` changes; return whether it must be written."""
    old = path.read_bytes() if path.exists() else None
    if old == content:
        print(f"{path} is up to date")
        return False
    if old is not None:
        diff = difflib.unified_diff(
            old.decode(errors="replace").splitlines(keepends=True),
            content.decode().splitlines(keepends=True),
            fromfile=f"{path} (installed)",
            tofile=f"{path} (new)",
        )
        print(f"{path} differs from the new version:")
        sys.stdout.writelines(diff)
    if dry_run:
        print(f"would write {path}:")
        print(content.decode(), end="")
    return True


def _installed_exit_timeout(path: Path) -> int | None:
    """``ExitTimeOut`` of the plist installed at ``path``, if it has a readable one."""
    try:
        value = plistlib.loads(path.read_bytes()).get("ExitTimeOut")
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None
    return value if isinstance(value, int) else None


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.chmod(0o644)  # launchd ignores agents writable by others
    os.replace(tmp, path)


def _wait_until_gone(agent: LaunchAgent, timeout_s: float) -> None:
    """Return once ``launchctl print`` no longer finds the service; at most ``timeout_s``.

    ``bootout`` returns while a job that is draining is still exiting, and a
    ``bootstrap`` of the same label before it is gone fails with ``5:
    Input/output error``.
    """
    if _launchctl_print(agent) is None:
        return
    print(
        f"waiting for the running agent to finish its jobs and exit (up to {timeout_s:g} s)",
        flush=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(BOOTOUT_POLL_S)
        if _launchctl_print(agent) is None:
            return
    raise ServiceError(
        f"{agent.label} is still loaded {timeout_s:g} s after `launchctl bootout`; wait until "
        f"`launchctl print {agent.target}` no longer finds it, then install again"
    )


@_exit_code
def install(
    config_path: Path,
    *,
    # Which service.
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    uid: int | None = None,
    # What it runs.
    python: str | None = None,
    log_file: Path | None = None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
    # How.
    dry_run: bool = False,
    platform: str | None = None,
    bootout_timeout_s: float | None = None,
) -> int:
    """Install and (re)start the LaunchAgent for the config file ``config_path``.

    Writes the plist (saying so when it is unchanged, showing a unified diff
    when it replaces a different one), creates the log directory, then
    ``launchctl bootout`` (only if loaded, so the new plist is read) and
    waits until ``launchctl print`` no longer finds the job: bootout of an
    agent that is draining returns before the agent is gone, and an
    immediate bootstrap would fail. The wait is bounded by
    ``bootout_timeout_s`` (default: the old job's ``ExitTimeOut``, after
    which launchd kills it, plus 10 s). Then ``launchctl bootstrap
    gui/<uid> <plist>`` and ``launchctl kickstart gui/<uid>/<label>``.
    ``RunAtLoad`` makes bootstrap start the agent and kickstart then only
    makes sure; ``-k`` would kill the fresh instance while it loads its
    model. ``config_path`` must exist (except in a dry run). See
    :func:`build_plist` for the other options.
    """
    if (plat := host_platform(platform)) != "darwin":
        return _not_macos("install", plat)
    agent = LaunchAgent(label, home, uid)
    config_path = Path(config_path).expanduser().absolute()
    if not config_path.is_file():
        message = f"config file {config_path} does not exist; create it, then check it with "
        message += f"`mlx-provider doctor --config {config_path}`"
        if not dry_run:
            raise ServiceError(message)
        print(f"warning: {message}")
    plist = build_plist(
        agent,
        config_path=config_path,
        python=python,
        log_file=log_file,
        drain_timeout_s=drain_timeout_s,
        extra_env=extra_env,
    )
    content = render_plist(plist)
    old_exit_timeout = _installed_exit_timeout(agent.plist_path)
    if bootout_timeout_s is None:
        bootout_timeout_s = max(old_exit_timeout or 0, plist["ExitTimeOut"]) + 10
    must_write = _show_file(agent.plist_path, content, dry_run=dry_run)
    if dry_run:
        if not agent.log_dir.is_dir():
            print(f"would create directory {agent.log_dir}")
        _launchctl("bootout", agent.target, dry_run=True, when="if it is loaded already")
        print(f"would wait until it is gone (up to {bootout_timeout_s:g} s)")
    else:
        if must_write:
            _write_atomically(agent.plist_path, content)
            print(f"wrote {agent.plist_path}")
        agent.log_dir.mkdir(parents=True, exist_ok=True)
        if _launchctl_print(agent) is not None:
            _launchctl("bootout", agent.target)
            _wait_until_gone(agent, bootout_timeout_s)
    _launchctl("bootstrap", agent.domain, str(agent.plist_path), dry_run=dry_run)
    _launchctl("kickstart", agent.target, dry_run=dry_run)
    if not dry_run:
        print(f"installed {agent.label}; logs: mlx-provider logs -f, state: mlx-provider status")
    return 0


@_exit_code
def uninstall(
    *,
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    uid: int | None = None,
    dry_run: bool = False,
    platform: str | None = None,
) -> int:
    """Stop and unload the service (``launchctl bootout``), then remove its plist.

    bootout sends SIGTERM, so the agent drains; launchd kills it after the
    plist's ``ExitTimeOut``. Logs are kept. Uninstalling what is not
    installed says so and succeeds.
    """
    if (plat := host_platform(platform)) != "darwin":
        return _not_macos("uninstall", plat)
    agent = LaunchAgent(label, home, uid)
    if dry_run:
        _launchctl("bootout", agent.target, dry_run=True, when="if it is loaded")
        if agent.plist_path.exists():
            print(f"would remove {agent.plist_path}")
        return 0
    loaded = _launchctl_print(agent) is not None
    if loaded:
        _launchctl("bootout", agent.target)
    if agent.plist_path.exists():
        agent.plist_path.unlink()
        print(f"removed {agent.plist_path}")
    elif not loaded:
        print(f"{agent.label} is not installed")
    return 0


def _require_installed(agent: LaunchAgent) -> None:
    if not agent.plist_path.exists():
        raise ServiceError(
            f"{agent.label} is not installed ({agent.plist_path} does not exist); "
            "run `mlx-provider install --config PATH`"
        )


@_exit_code
def start(
    *,
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    uid: int | None = None,
    dry_run: bool = False,
    platform: str | None = None,
) -> int:
    """Start the installed service: ``launchctl kickstart gui/<uid>/<label>``.

    A service that is installed but not loaded (booted out by hand) is
    bootstrapped first. Starting a running service does nothing.
    """
    if (plat := host_platform(platform)) != "darwin":
        return _not_macos("start", plat)
    agent = LaunchAgent(label, home, uid)
    _require_installed(agent)
    if not dry_run and _launchctl_print(agent) is None:
        _launchctl("bootstrap", agent.domain, str(agent.plist_path))
    _launchctl("kickstart", agent.target, dry_run=dry_run)
    return 0


@_exit_code
def stop(
    *,
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    uid: int | None = None,
    dry_run: bool = False,
    platform: str | None = None,
) -> int:
    """Ask the agent to drain and exit: ``launchctl kill SIGTERM gui/<uid>/<label>``.

    SIGTERM, not bootout: the agent finishes its in-flight jobs (up to
    ``drain_timeout_s``) and exits 0, which ``KeepAlive = {SuccessfulExit =
    false}`` leaves stopped. The service stays loaded, so :func:`start` (or
    the next login, through ``RunAtLoad``) starts it again; bootout would
    unload it and SIGKILL a long drain after ``ExitTimeOut``. Returns at once;
    ``mlx-provider status`` shows the drain.
    """
    if (plat := host_platform(platform)) != "darwin":
        return _not_macos("stop", plat)
    agent = LaunchAgent(label, home, uid)
    _require_installed(agent)
    if not dry_run and _launchctl_print(agent) is None:
        print(f"{agent.label} is not loaded; nothing to stop")
        return 0
    _launchctl("kill", "SIGTERM", agent.target, dry_run=dry_run)
    if not dry_run:
        print("sent SIGTERM: the agent finishes in-flight jobs, then exits")
    return 0


@_exit_code
def restart(
    *,
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    uid: int | None = None,
    dry_run: bool = False,
    platform: str | None = None,
) -> int:
    """Restart now: ``launchctl kickstart -k gui/<uid>/<label>``.

    In-flight jobs are cut off (the coordinator retries them elsewhere); to
    let them finish, :func:`stop`, wait for ``mlx-provider status`` to say
    it is not running, then :func:`start`.
    """
    if (plat := host_platform(platform)) != "darwin":
        return _not_macos("restart", plat)
    agent = LaunchAgent(label, home, uid)
    _require_installed(agent)
    _launchctl("kickstart", "-k", agent.target, dry_run=dry_run)
    return 0


def log_files(agent: LaunchAgent, log_file: Path | None = None) -> list[Path]:
    """The agent's log (``log_file``, default ``<log dir>/provider.log``), then launchd's stderr."""
    return [log_file or agent.log_dir / LOG_FILE_NAME, agent.stderr_path]


def _tail(path: Path, lines: int) -> list[str]:
    # Log files rotate at 10 MiB: reading one whole is fine.
    with path.open(errors="replace") as f:
        return f.read().splitlines()[-lines:] if lines > 0 else []


def logs(
    *,
    follow: bool = False,
    lines: int = 50,
    log_file: Path | None = None,
    label: str = DEFAULT_LABEL,
    home: Path | None = None,
    platform: str | None = None,
) -> int:
    """Print the last ``lines`` lines of each log file; with ``follow``, keep printing.

    The files are :func:`log_files`: the agent's own (rotated) log and the
    service's stderr, where a crash before logging starts ends up. ``follow``
    runs ``tail -F`` (which survives rotation) until interrupted. Elsewhere
    than macOS only the agent's log is read (systemd keeps stderr in the
    journal: ``journalctl --user -u mlx-provider``).
    """
    plat = host_platform(platform)
    agent = LaunchAgent(label, home)
    candidates = log_files(agent, log_file)
    if plat != "darwin":
        candidates = [log_file or default_log_dir(platform=plat, home=home) / LOG_FILE_NAME]
    files = [p for p in candidates if p.exists()]
    if not files:
        where = ", ".join(str(p) for p in candidates)
        print(f"no logs yet (looked for {where})", file=sys.stderr)
        if plat != "darwin":
            print("under systemd: journalctl --user -u mlx-provider", file=sys.stderr)
        return 1
    if follow:
        tail = shutil.which("tail")
        if tail is None:
            print("error: `tail` not found on PATH", file=sys.stderr)
            return 1
        try:
            return subprocess.run([tail, "-n", str(lines), "-F", *map(str, files)]).returncode
        except KeyboardInterrupt:
            return 0
    for i, path in enumerate(files):
        if len(files) > 1:
            print(f"==> {path} <==" if i == 0 else f"\n==> {path} <==")
        for line in _tail(path, lines):
            print(line)
    return 0
