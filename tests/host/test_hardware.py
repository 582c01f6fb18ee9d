"""Hardware facts: the chip table, the parsers, the Mac and Linux readers, this machine."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from provider.host import hardware
from provider.host.hardware import (
    ChipSpecs,
    HardwareFacts,
    apple_chip_specs,
    clean_chip_name,
    parse_cpuinfo,
    parse_ioreg_gpu_cores,
    parse_system_profiler_gpu_cores,
    read_darwin_hardware,
    read_hardware,
    read_linux_hardware,
    run_command,
)

from . import fixtures as fx


@pytest.mark.parametrize(
    ("chip", "specs"),
    [
        # The official provider's table (COORDINATOR.md 6.4), tier by generation.
        ("Apple M1", ChipSpecs(68, 0.040, 10)),
        ("Apple M2", ChipSpecs(100, 0.040, 10)),
        ("Apple M3", ChipSpecs(100, 0.040, 10)),
        ("Apple M4", ChipSpecs(120, 0.040, 10)),
        ("Apple M1 Pro", ChipSpecs(200, 0.065, 19)),
        ("Apple M4 Pro", ChipSpecs(273, 0.065, 20)),
        ("Apple M2 Max", ChipSpecs(400, 0.095, 32)),
        ("Apple M3 Max", ChipSpecs(400, 0.095, 40)),
        ("Apple M4 Max", ChipSpecs(546, 0.095, 40)),
        ("Apple M2 Ultra", ChipSpecs(800, 0.120, 60)),
        ("Apple M3 Ultra", ChipSpecs(819, 0.120, 80)),
        ("apple m5 max", ChipSpecs(546, 0.095, 40)),
    ],
)
def test_chip_table(chip: str, specs: ChipSpecs) -> None:
    assert apple_chip_specs(chip) == specs


@pytest.mark.parametrize(
    "chip", ["AMD EPYC 7B13 64-Core Processor", "Intel(R) Xeon(R) Pro", "Apple", "M3 Max", ""]
)
def test_no_table_entry_off_apple_silicon(chip: str) -> None:
    # "Processor" contains "pro": the table must not read it as an M-series Pro.
    assert apple_chip_specs(chip) is None


def test_chip_names_are_cleaned_and_never_a_bare_architecture() -> None:
    for generic in ("arm", "arm64", "aarch64", "x86_64", "i386", "", "  ", None):
        assert clean_chip_name(generic) is None
    assert clean_chip_name("  Apple\tM3   Max\n") == "Apple M3 Max"
    assert clean_chip_name("Apple M3\x1b[31m Max") == "Apple M3 [31m Max"
    long = clean_chip_name("é" * 100)
    assert long is not None and len(long.encode()) <= 120 and long == "é" * 60


def test_parsers_against_mac_outputs() -> None:
    assert parse_ioreg_gpu_cores(fx.IOREG_AGX) == 40
    assert parse_ioreg_gpu_cores("") is None and parse_ioreg_gpu_cores(None) is None
    assert parse_system_profiler_gpu_cores(fx.SYSTEM_PROFILER_DISPLAYS) == 19
    assert parse_system_profiler_gpu_cores('{"SPDisplaysDataType": [{"_name": "x"}]}') is None
    assert parse_system_profiler_gpu_cores("not json") is None


def test_cpuinfo_model_name_and_physical_cores() -> None:
    assert parse_cpuinfo(fx.CPUINFO_X86) == ("AMD EPYC 7B13 64-Core Processor", 2)
    # No model name and no core ids (many ARM machines): no name, count processors.
    assert parse_cpuinfo(fx.CPUINFO_ARM) == (None, 2)


def test_darwin_reader_from_command_outputs() -> None:
    calls, run = fx.runner(fx.darwin_outputs())
    facts = read_darwin_hardware(run)  # type: ignore[arg-type]
    assert facts == HardwareFacts("Apple M3 Max", 16, 40, 400, 0.095)
    assert ("system_profiler", "SPDisplaysDataType", "-json") not in calls  # ioreg answered


def test_darwin_reader_falls_back_to_system_profiler_then_the_table() -> None:
    _, run = fx.runner(fx.darwin_outputs({"ioreg -r -d 1 -w 0 -c AGXAccelerator": None}))
    assert read_darwin_hardware(run).gpu_cores == 19  # type: ignore[arg-type]
    _, run = fx.runner(
        fx.darwin_outputs(
            {
                "ioreg -r -d 1 -w 0 -c AGXAccelerator": None,
                "system_profiler SPDisplaysDataType -json": None,
            }
        )
    )
    assert read_darwin_hardware(run).gpu_cores == 40  # type: ignore[arg-type]


def test_darwin_reader_with_nothing_answering_says_unknown() -> None:
    _, run = fx.runner({})
    facts = read_darwin_hardware(run)  # type: ignore[arg-type]
    assert facts.chip is None and facts.gpu_cores is None and facts.bandwidth_gb_per_s is None
    assert facts.cpu_cores == os.cpu_count()


def test_linux_reader_from_a_proc_tree(tmp_path: Path) -> None:
    proc = fx.write_tree(tmp_path, {"cpuinfo": fx.CPUINFO_X86})
    assert read_linux_hardware(proc) == HardwareFacts("AMD EPYC 7B13 64-Core Processor", 2)
    assert read_hardware("linux", proc=proc) == read_linux_hardware(proc)
    empty = read_linux_hardware(tmp_path / "missing")
    assert empty.chip is None and empty.cpu_cores == os.cpu_count()


def test_this_machine() -> None:
    facts = read_hardware()
    assert facts.chip is None or (0 < len(facts.chip.encode()) <= 120 and facts.chip != "arm")
    assert facts.cpu_cores is None or 1 <= facts.cpu_cores <= 1024
    if sys.platform.startswith("linux"):
        assert facts.gpu_cores is None and facts.network_power_kw is None
    assert hardware.total_ram_bytes() > 0 and hardware.rss_bytes() > 0


def test_run_command_is_bounded_and_never_raises() -> None:
    assert run_command([sys.executable, "-c", "print('hi')"]) == "hi\n"
    assert run_command([sys.executable, "-c", "import sys; sys.exit(3)"]) is None
    assert run_command(["/nonexistent/command"]) is None
    started = time.monotonic()
    assert run_command([sys.executable, "-c", "import time; time.sleep(30)"], 0.5) is None
    assert time.monotonic() - started < 10
