from __future__ import annotations

import plistlib
import sys
from pathlib import Path

import pytest

from provider.host import service
from provider.host.service import (
    LaunchAgent,
    build_plist,
    parse_launchctl_print,
    render_plist,
    systemd_unit,
)
from tests.service.helpers import FakeBin, read_calls

REPO = Path(__file__).resolve().parents[2]
UID = 501
LABEL = "com.mlx-provider.agent"
TARGET = f"gui/{UID}/{LABEL}"

# A launchctl that remembers whether the service is loaded, like the real one.
# Like the real one, bootout returns while the job is still exiting (it
# drains first): the job stays loaded for $BOOTOUT_LINGER more `print` calls
# (default 0), and a bootstrap meanwhile fails with "5: Input/output error".
FAKE_LAUNCHCTL = r"""
loaded="$(dirname "$0")/launchctl.loaded"
linger="$(dirname "$0")/launchctl.linger"
case "$1" in
print)
    if [ -f "$linger" ]; then
        left=$(cat "$linger")
        if [ "$left" -le 0 ]; then rm -f "$linger" "$loaded"
        else echo $((left - 1)) > "$linger"; fi
    fi
    [ -f "$loaded" ] || { echo "Could not find service \"$2\"" >&2; exit 113; }
    state=running; [ -f "$linger" ] && state=exiting
    printf '%s = {\n\tstate = %s\n\tpid = 4321\n\tlast exit code = 0\n}\n' "$2" "$state";;
bootstrap)
    [ -f "$loaded" ] && { echo "Bootstrap failed: 5: Input/output error" >&2; exit 5; }
    msg="Bootstrap failed: 125: Domain does not support specified action"
    [ -n "$FAIL_BOOTSTRAP" ] && { echo "$msg" >&2; exit 125; }
    touch "$loaded";;
bootout)
    [ -f "$loaded" ] || { echo "Boot-out failed: 3: No such process" >&2; exit 3; }
    [ -f "$linger" ] && exit 0
    if [ "${BOOTOUT_LINGER:-0}" -gt 0 ]; then echo "$BOOTOUT_LINGER" > "$linger"
    else rm "$loaded"; fi;;
esac
exit 0
"""


@pytest.fixture
def launchctl(fake_bin: FakeBin) -> Path:
    return fake_bin.recorder("launchctl", body=FAKE_LAUNCHCTL)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def config(home: Path) -> Path:
    path = home / ".config" / "mlx-provider" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('coordinator_url = "wss://c.example/ws/provider"\n')
    return path


def mac(**kwargs):
    return {"home": kwargs.pop("home"), "uid": UID, "platform": "darwin", **kwargs}


def plist_path(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def set_loaded(fake_bin: FakeBin) -> None:
    (fake_bin.path / "launchctl.loaded").touch()


def test_plist_contents(home: Path) -> None:
    agent = LaunchAgent(home=home, uid=UID)
    plist = build_plist(
        agent,
        config_path=Path("/etc/mlx/config.toml"),
        python="/venv/bin/python",
        log_file=home / "Library/Logs/mlx-provider/provider.log",
        drain_timeout_s=120,
    )
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == [
        "/venv/bin/python", "-m", "provider", "serve", "--config", "/etc/mlx/config.toml",
    ]  # fmt: skip
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 10
    assert plist["ExitTimeOut"] == 150
    assert plist["ProcessType"] == "Interactive"
    env = plist["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == "/venv/bin" and "/usr/bin" in env["PATH"].split(":")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HOME"] == str(home)
    assert env["MLX_PROVIDER_LOG_FILE"] == str(home / "Library/Logs/mlx-provider/provider.log")
    assert plist["StandardOutPath"] == str(home / "Library/Logs/mlx-provider/stdout.log")
    assert plist["StandardErrorPath"] == str(home / "Library/Logs/mlx-provider/stderr.log")
    defaults = build_plist(agent, config_path=Path("/c.toml"))
    assert defaults["ProgramArguments"][0] == sys.executable
    assert defaults["ExitTimeOut"] == 330
    assert "MLX_PROVIDER_LOG_FILE" not in defaults["EnvironmentVariables"]


def test_deploy_template_agrees_with_build_plist() -> None:
    template = (REPO / "deploy" / "com.mlx-provider.agent.plist").read_text()
    values = {
        "@PYTHON@": "/Users/ann/venv/bin/python3",
        "@PYTHON_BIN@": "/Users/ann/venv/bin",
        "@CONFIG@": "/Users/ann/.config/mlx-provider/config.toml",
        "@HOME@": "/Users/ann",
        "@LOG_FILE@": "/Users/ann/Library/Logs/mlx-provider/provider.log",
        "@LABEL@": LABEL,
    }
    for placeholder, value in values.items():
        template = template.replace(placeholder, value)
    expected = build_plist(
        LaunchAgent(home=Path("/Users/ann")),
        config_path=Path(values["@CONFIG@"]),
        python=values["@PYTHON@"],
        log_file=Path(values["@LOG_FILE@"]),
    )
    assert plistlib.loads(template.encode()) == expected


def test_deploy_systemd_unit() -> None:
    unit = (REPO / "deploy" / "mlx-provider.service").read_text()
    assert unit == systemd_unit()
    lines = unit.splitlines()
    assert (
        "ExecStart=%h/.local/bin/mlx-provider serve --config %h/.config/mlx-provider/config.toml"
        in lines
    )
    assert "Restart=on-failure" in lines
    assert "KillSignal=SIGTERM" in lines
    stop_timeout = next(int(ln.split("=")[1]) for ln in lines if ln.startswith("TimeoutStopSec="))
    assert stop_timeout > service.DEFAULT_DRAIN_TIMEOUT_S


def test_install_fresh(
    launchctl: Path, home: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = home / "Library/Logs/mlx-provider/provider.log"
    assert service.install(config, log_file=log_file, **mac(home=home)) == 0
    plist = plistlib.loads(plist_path(home).read_bytes())
    assert plist["ProgramArguments"][-2:] == ["--config", str(config)]
    assert plist_path(home).stat().st_mode & 0o777 == 0o644
    assert (home / "Library/Logs/mlx-provider").is_dir()
    assert read_calls(launchctl) == [
        ["print", TARGET],
        ["bootstrap", f"gui/{UID}", str(plist_path(home))],
        ["kickstart", TARGET],
    ]
    out = capsys.readouterr().out
    assert f"wrote {plist_path(home)}" in out
    assert f"running: launchctl bootstrap gui/{UID} {plist_path(home)}" in out


def test_install_again_is_idempotent_and_reloads(
    launchctl: Path, home: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.install(config, **mac(home=home)) == 0
    before = plist_path(home).read_bytes()
    launchctl.unlink()
    capsys.readouterr()
    assert service.install(config, **mac(home=home)) == 0
    assert plist_path(home).read_bytes() == before
    assert f"{plist_path(home)} is up to date" in capsys.readouterr().out
    assert read_calls(launchctl) == [
        ["print", TARGET],
        ["bootout", TARGET],
        ["print", TARGET],  # gone: bootstrap at once
        ["bootstrap", f"gui/{UID}", str(plist_path(home))],
        ["kickstart", TARGET],
    ]


def test_reinstall_waits_until_the_draining_job_is_gone(
    launchctl: Path,
    home: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert service.install(config, **mac(home=home)) == 0
    launchctl.unlink()
    capsys.readouterr()
    # The running agent drains after bootout: launchd still lists it for 3 polls.
    monkeypatch.setenv("BOOTOUT_LINGER", "3")
    monkeypatch.setattr(service, "BOOTOUT_POLL_S", 0.01)
    assert service.install(config, **mac(home=home)) == 0, capsys.readouterr().err
    calls = read_calls(launchctl)
    assert calls[:2] == [["print", TARGET], ["bootout", TARGET]]
    # Polled until `print` stopped finding it, and only then bootstrapped.
    assert calls[2:6] == [["print", TARGET]] * 4
    assert calls[6:] == [["bootstrap", f"gui/{UID}", str(plist_path(home))], ["kickstart", TARGET]]
    out = capsys.readouterr().out
    assert "waiting for the running agent to finish its jobs and exit (up to 340 s)" in out


def test_reinstall_gives_up_on_a_job_that_never_goes(
    launchctl: Path,
    home: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert service.install(config, **mac(home=home)) == 0
    launchctl.unlink()
    capsys.readouterr()
    monkeypatch.setenv("BOOTOUT_LINGER", "1000000")
    monkeypatch.setattr(service, "BOOTOUT_POLL_S", 0.05)
    assert service.install(config, bootout_timeout_s=0.6, **mac(home=home)) == 1
    err = capsys.readouterr().err
    assert f"error: {LABEL} is still loaded 0.6 s after `launchctl bootout`" in err
    assert f"`launchctl print {TARGET}` no longer finds it" in err
    assert "bootstrap" not in {call[0] for call in read_calls(launchctl)}


def test_install_over_a_different_plist_shows_the_diff(
    launchctl: Path, home: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.install(config, python="/old/bin/python", **mac(home=home)) == 0
    capsys.readouterr()
    assert service.install(config, python="/new/bin/python", **mac(home=home)) == 0
    out = capsys.readouterr().out
    assert "differs from the new version" in out
    assert "-\t\t<string>/old/bin/python</string>" in out
    assert "+\t\t<string>/new/bin/python</string>" in out
    plist = plistlib.loads(plist_path(home).read_bytes())
    assert plist["ProgramArguments"][0] == "/new/bin/python"


def test_install_dry_run_touches_nothing(
    launchctl: Path, home: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert service.install(config, dry_run=True, **mac(home=home)) == 0
    assert not (home / "Library").exists()
    assert read_calls(launchctl) == []
    out = capsys.readouterr().out
    assert f"would write {plist_path(home)}:" in out
    assert "<key>KeepAlive</key>" in out
    assert f"would create directory {home / 'Library/Logs/mlx-provider'}" in out
    assert f"would run: launchctl bootout {TARGET}" in out
    assert "would wait until it is gone (up to 340 s)" in out
    assert f"would run: launchctl bootstrap gui/{UID} {plist_path(home)}" in out
    assert f"would run: launchctl kickstart {TARGET}" in out


def test_install_needs_the_config_file(
    launchctl: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = home / "nope.toml"
    assert service.install(missing, **mac(home=home)) == 1
    assert f"error: config file {missing} does not exist" in capsys.readouterr().err
    assert not plist_path(home).exists()
    assert read_calls(launchctl) == []


def test_install_reports_launchctl_failure(
    launchctl: Path,
    home: Path,
    config: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAIL_BOOTSTRAP", "1")
    assert service.install(config, **mac(home=home)) == 1
    err = capsys.readouterr().err
    assert f"`launchctl bootstrap gui/{UID} {plist_path(home)}` failed (exit 125)" in err
    assert "Domain does not support specified action" in err


def test_uninstall(launchctl: Path, fake_bin: FakeBin, home: Path, config: Path, capsys) -> None:
    service.install(config, **mac(home=home))
    launchctl.unlink()
    assert service.uninstall(**mac(home=home)) == 0
    assert not plist_path(home).exists()
    assert read_calls(launchctl) == [["print", TARGET], ["bootout", TARGET]]
    assert f"removed {plist_path(home)}" in capsys.readouterr().out
    assert service.uninstall(**mac(home=home)) == 0
    assert f"{LABEL} is not installed" in capsys.readouterr().out


def test_uninstall_dry_run(launchctl: Path, home: Path, config: Path, capsys) -> None:
    service.install(config, **mac(home=home))
    launchctl.unlink()
    capsys.readouterr()
    assert service.uninstall(dry_run=True, **mac(home=home)) == 0
    assert plist_path(home).exists()
    assert read_calls(launchctl) == []
    out = capsys.readouterr().out
    assert f"would run: launchctl bootout {TARGET}" in out
    assert f"would remove {plist_path(home)}" in out


def test_start_stop_restart(
    launchctl: Path, fake_bin: FakeBin, home: Path, config: Path, capsys
) -> None:
    service.install(config, **mac(home=home))
    launchctl.unlink()
    assert service.stop(**mac(home=home)) == 0
    assert service.start(**mac(home=home)) == 0
    assert service.restart(**mac(home=home)) == 0
    assert read_calls(launchctl) == [
        ["print", TARGET],
        ["kill", "SIGTERM", TARGET],
        ["print", TARGET],
        ["kickstart", TARGET],
        ["kickstart", "-k", TARGET],
    ]
    assert "sent SIGTERM" in capsys.readouterr().out


def test_start_bootstraps_an_unloaded_service(
    launchctl: Path, fake_bin: FakeBin, home: Path, config: Path
) -> None:
    service.install(config, **mac(home=home))
    (fake_bin.path / "launchctl.loaded").unlink()  # booted out by hand
    launchctl.unlink()
    assert service.start(**mac(home=home)) == 0
    assert read_calls(launchctl) == [
        ["print", TARGET],
        ["bootstrap", f"gui/{UID}", str(plist_path(home))],
        ["kickstart", TARGET],
    ]


@pytest.mark.parametrize("command", ["start", "stop", "restart"])
def test_commands_need_an_installed_service(
    launchctl: Path, home: Path, command: str, capsys
) -> None:
    assert getattr(service, command)(**mac(home=home)) == 1
    assert "is not installed" in capsys.readouterr().err
    assert read_calls(launchctl) == []


@pytest.mark.parametrize(
    ("command", "systemctl"),
    [
        ("install", "systemctl --user enable --now mlx-provider"),
        ("uninstall", "systemctl --user disable --now mlx-provider"),
        ("start", "systemctl --user start mlx-provider"),
        ("stop", "systemctl --user stop mlx-provider"),
        ("restart", "systemctl --user restart mlx-provider"),
    ],
)
def test_not_macos_points_to_systemd(
    launchctl: Path, home: Path, config: Path, command: str, systemctl: str, capsys
) -> None:
    func = getattr(service, command)
    args = (config,) if command == "install" else ()
    assert func(*args, home=home, uid=UID, platform="linux") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"mlx-provider {command}: launchd services are macOS-only (this is linux); "
        "use the systemd user unit deploy/mlx-provider.service instead."
    )
    assert f"  {systemctl}" in err
    assert read_calls(launchctl) == []
    assert not (home / "Library").exists()


def test_platform_from_environment(
    launchctl: Path, home: Path, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(service.PLATFORM_ENV, "darwin")
    assert service.install(config, home=home, uid=UID) == 0
    assert plist_path(home).exists()


def test_logs_prints_the_tail_of_each_file(home: Path, capsys) -> None:
    log_dir = home / "Library/Logs/mlx-provider"
    log_dir.mkdir(parents=True)
    (log_dir / "provider.log").write_text("".join(f"line {i}\n" for i in range(100)))
    (log_dir / "stderr.log").write_text("Traceback: boom\n")
    assert service.logs(lines=2, home=home, platform="darwin") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"==> {log_dir / 'provider.log'} <==",
        "line 98",
        "line 99",
        "",
        f"==> {log_dir / 'stderr.log'} <==",
        "Traceback: boom",
    ]


def test_logs_follow_runs_tail(fake_bin: FakeBin, home: Path) -> None:
    tail = fake_bin.recorder("tail")
    log_file = home / "custom.log"
    log_file.write_text("x\n")
    assert service.logs(follow=True, lines=20, log_file=log_file, home=home, platform="darwin") == 0
    assert read_calls(tail) == [["-n", "20", "-F", str(log_file)]]


def test_logs_when_there_are_none(home: Path, capsys) -> None:
    assert service.logs(home=home, platform="darwin") == 1
    assert "no logs yet" in capsys.readouterr().err


def test_parse_launchctl_print() -> None:
    text = (
        f"{TARGET} = {{\n"
        "\tactive count = 1\n"
        "\tpath = /Users/ann/Library/LaunchAgents/com.mlx-provider.agent.plist\n"
        "\tstate = running\n"
        "\n"
        "\tprogram = /Users/ann/venv/bin/python\n"
        "\tenvironment = {\n"
        "\t\tstate = nested-ignored\n"
        "\t}\n"
        "\tpid = 8123\n"
        "\tlast exit code = (never exited)\n"
        "}\n"
    )
    state = parse_launchctl_print(text)
    assert state == service.ServiceState("running", 8123, "(never exited)")
    stopped = parse_launchctl_print("x = {\n\tstate = not running\n\tlast exit code = 1\n}\n")
    assert stopped == service.ServiceState("not running", None, "1")


def test_render_is_stable(home: Path) -> None:
    agent = LaunchAgent(home=home)
    one = render_plist(build_plist(agent, config_path=Path("/c.toml"), python="/p"))
    two = render_plist(build_plist(agent, config_path=Path("/c.toml"), python="/p"))
    assert one == two
